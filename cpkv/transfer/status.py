"""The transfer status machine and its agreement across CP/TP groups.

``Failed=0 < Bootstrapping=1 < WaitingForInput=2 < Transferring=3 < Success=4``: updates only
move up, except Failed, which always wins; a group agrees by MIN.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence

from .._groups import group_min

__all__ = ["KVStatus", "StatusCell", "agree"]


class KVStatus(enum.IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class StatusCell:
    """A request's status on one rank, with the reason when it failed. Thread-safe."""

    def __init__(self):
        self._status, self.reason = KVStatus.Bootstrapping, None
        self._lock = threading.Lock()

    @property
    def status(self) -> KVStatus:
        return self._status

    def update(self, status: KVStatus) -> KVStatus:
        """Move up (never down); Failed always wins and stays."""
        with self._lock:
            if self._status is not KVStatus.Failed and (status is KVStatus.Failed
                                                         or status > self._status):
                self._status = KVStatus(status)
            return self._status

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._status is not KVStatus.Failed:
                self._status, self.reason = KVStatus.Failed, reason

    @property
    def done(self) -> bool:
        return self._status in (KVStatus.Failed, KVStatus.Success)


def agree(statuses: Sequence[KVStatus | int], groups: Sequence) -> list[KVStatus]:
    """Reduce a list of statuses by MIN over each group in turn (e.g. the CP group, then TP).

    Collective: every rank of every group passes a list of the same length, requests in the same
    order. A Failed anywhere is Failed everywhere. Works on gloo and NCCL groups
    (`cpkv._groups.group_min` puts the values where each group reduces).
    """
    return [KVStatus(v) for v in group_min(statuses, groups)]
