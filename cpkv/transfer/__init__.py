"""Ship packed KV slots from prefill ranks to decode ranks through Mooncake.

One `KVSender` per prefill rank ships each request to the decode receivers the request names;
one `KVReceiver` per decode rank accepts any number of prefill instances. `protocol` is the one
description of the wire between them.
"""

from ..parallel import ParallelRank, ParallelSizes
from .cost import CostModel
from .direct import contiguous_runs
from .engine import TransferEngine, TransferError
from .mapping import Route, map_ranks
from .protocol import ModelSpec, ProtocolError
from .receiver import KVReceiver
from .sender import KVSender
from .status import KVStatus, StatusCell, agree

__all__ = ["CostModel", "KVReceiver", "KVSender", "KVStatus", "ModelSpec", "ParallelRank",
           "ParallelSizes", "ProtocolError", "Route", "StatusCell", "TransferEngine",
           "TransferError", "agree", "contiguous_runs", "map_ranks"]
