"""Ship packed KV slots from prefill ranks to decode ranks through Mooncake."""

from .control import ControlPlane, ControlTimeout, ParallelRank
from .engine import TransferEngine, TransferError
from .receiver import KVReceiver
from .sender import KVSender
from .status import KVStatus, StatusCell, agree

__all__ = ["ControlPlane", "ControlTimeout", "KVReceiver", "KVSender", "KVStatus",
           "ParallelRank", "StatusCell", "TransferEngine", "TransferError", "agree"]
