"""Ship packed KV slots from prefill ranks to decode ranks through Mooncake."""

from ..parallel import ParallelRank, ParallelSizes
from .control import ControlPlane, ControlTimeout
from .direct import contiguous_runs
from .engine import TransferEngine, TransferError
from .mapping import Route, map_ranks
from .policy import CostModel
from .receiver import KVReceiver
from .sender import KVSender
from .status import KVStatus, StatusCell, agree

__all__ = ["ControlPlane", "ControlTimeout", "CostModel", "KVReceiver", "KVSender", "KVStatus",
           "ParallelRank", "ParallelSizes", "Route", "StatusCell", "TransferEngine",
           "TransferError", "agree", "contiguous_runs", "map_ranks"]
