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
        self._owns_engine, self._owns_arena = engine is None, arena is None
        self.engine = engine or TransferEngine()
        self.arena = arena or StagingArena(arena_bytes, device=cache.device)
        self.arena_addr = self.engine.register_arena(self.arena)  # once per arena
        self._pool_regs: list[int] = []

    def register_pool(self) -> None:
        """Register the pool's storages with the engine (direct mode reads/writes them);
        unregistered at close. Packed mode never exposes the pool."""
        for layers in self.cache.buffers.values():
            for t in layers:
                st = t.untyped_storage()
                if st.data_ptr() not in self._pool_regs:
                    self._pool_regs.append(self.engine.register_range(st.data_ptr(),
                                                                      st.nbytes(), t.device))

    def route_bytes_per_token(self, route) -> int:
        """Bytes one token of a route packs to (its heads and layers, every component)."""
        return len(route.src_layers) * len(route.src_heads) * sum(
            c.head_nbytes for c in self.cache.components)

    def _release_owned(self) -> None:
        """Unregister the pool, close what this endpoint created (the arena first: it
        unregisters itself)."""
        for addr in self._pool_regs:
            if not self.engine.closed:
                self.engine.unregister(addr)
        self._pool_regs = []
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
