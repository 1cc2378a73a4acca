"""A cpkv connector with a deliberately broken transfer for some requests, loaded by vLLM from
this module path in the end-to-end test (as one prefill engine's connector).

- transfer ids starting with ``REVERSED`` have their blocks shipped in reverse order: the
  transfer succeeds with every byte in the wrong place, and the test shows their tokens then
  differ from a single engine's, i.e. that the end-to-end check can fail;
- transfer ids starting with ``SHORT`` announce one block fewer than the decode engine
  expects: the receiver refuses the request at once (no timeout), a load error there.

Every other request goes through the production connector and transport unchanged.
"""

from cpkv.integrations.transport import KVTransport
from cpkv.integrations.vllm import CpkvConnector

REVERSED, SHORT = "reversed-", "short-"


class _BreakingTransport(KVTransport):
    def send_layers(self, rid, transfer_id, to, page_ids, num_tokens, upto, ready=None):
        if str(transfer_id).startswith(REVERSED):
            page_ids = page_ids.flip(0)
        elif str(transfer_id).startswith(SHORT):
            page_ids, num_tokens = page_ids[:-1], num_tokens - 1
        super().send_layers(rid, transfer_id, to, page_ids, num_tokens, upto, ready=ready)


class BrokenCpkvConnector(CpkvConnector):
    def make_transport(self, cache, **kwargs):
        return _BreakingTransport(cache, **kwargs)
