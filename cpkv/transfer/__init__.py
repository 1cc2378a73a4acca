"""Ship packed KV slots from prefill ranks to decode ranks through Mooncake."""

from .control import ControlPlane, ControlTimeout, ParallelRank
from .direct import contiguous_runs
from .engine import TransferEngine, TransferError
from .mapping import Layout, Route, map_ranks
from .policy import CostModel
from .receiver import KVReceiver
from .sender import KVSender
from .status import KVStatus, StatusCell, agree

__all__ = ["ControlPlane", "ControlTimeout", "CostModel", "KVReceiver", "KVSender", "KVStatus",
           "Layout", "ParallelRank", "Route", "StatusCell", "TransferEngine", "TransferError",
           "agree", "contiguous_runs", "map_ranks"]
