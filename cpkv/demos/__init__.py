"""The end-to-end demos behind `cpkv demo` (`transfer`: a CP prefill group hands requests to a
decode rank) and `cpkv demo --store` (`store`: CP writers store a prompt, a reader loads it).

`data` holds the transfer demo's reference K/V and the check of every byte; `common` what both
demos share (the extras they need, checked before any set-up; seeded bytes; cores per process).
The transfer demo's figure is `plots/plot_demo.py`, drawn from the CSV the demo writes.
"""
