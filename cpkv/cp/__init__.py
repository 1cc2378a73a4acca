"""Context parallelism: page shares, token splits, and the KV all-gather into the paged pool."""

from .gather import GatherDone, GatherTimeoutError, all_gather_kv, gather_nbytes, split_token_map
from .partition import (
    SenderPolicy,
    SplitPlan,
    chunk_share,
    interleave_split,
    page_share,
    pages_sent_by,
    senders_for,  # noqa: F401 - the former name of pages_sent_by
    zigzag_split,
)

__all__ = ["GatherDone", "GatherTimeoutError", "SenderPolicy", "SplitPlan", "all_gather_kv",
           "chunk_share", "gather_nbytes", "interleave_split", "page_share", "pages_sent_by",
           "split_token_map", "zigzag_split"]
