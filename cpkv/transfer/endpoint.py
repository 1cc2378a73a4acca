"""What a sender and a receiver share: a Mooncake engine and a registered staging arena, each
either borrowed (shared by the worker process, the usual case) or created and owned."""

from __future__ import annotations

from ..staging import StagingArena
from .control import ControlPlane, geometry
from .engine import TransferEngine


class Endpoint:
    def __init__(self, cache, control: ControlPlane, engine: TransferEngine | None,
                 arena: StagingArena | None, arena_bytes: int, timeout: float):
        self.cache, self.control, self.timeout = cache, control, timeout
        self.geometry = geometry(cache)
        self.bytes_per_token = cache.packed_nbytes(1)
        self._owns_engine, self._owns_arena = engine is None, arena is None
        self.engine = engine or TransferEngine()
        self.arena = arena or StagingArena(arena_bytes, device=cache.device)
        self.arena_addr = self.engine.register_arena(self.arena)  # once per arena

    def _release_owned(self) -> None:
        """Close what this endpoint created (the arena first: it unregisters itself)."""
        if self._owns_arena:
            self.arena.close()
        if self._owns_engine:
            self.engine.close()

    def close(self) -> None:
        self._release_owned()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
