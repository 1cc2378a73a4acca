"""What a sender and a receiver share: a Mooncake engine and a registered staging arena, each
either borrowed (shared by the worker process, the usual case) or created and owned; `wait`;
and the context-manager protocol."""

from __future__ import annotations

import time

import torch

from ..staging import StagingArena
from .control import ControlPlane, geometry
from .engine import TransferEngine
from .status import KVStatus

DONE = (KVStatus.Success, KVStatus.Failed)


def check_ready(ready, device: torch.device):
    """``ready`` (what the runner's writes are ordered by) as a CUDA event, or None: a
    ``torch.cuda.Event`` is used as is, a ``torch.cuda.Stream`` gets an event recorded now."""
    if ready is None:
        return None
    if device.type != "cuda":
        raise ValueError(f"ready: a CUDA stream or event orders CUDA pools only; this pool is "
                         f"on {device}")
    if isinstance(ready, torch.cuda.Event):
        return ready
    if isinstance(ready, torch.cuda.Stream):
        return ready.record_event()
    raise TypeError(f"ready: expected a torch.cuda.Event or torch.cuda.Stream, got "
                    f"{type(ready).__name__}")


class Endpoint:
    def __init__(self, cache, control: ControlPlane, engine: TransferEngine | None,
                 arena: StagingArena | None, arena_bytes: int, timeout: float):
        if not isinstance(control, ControlPlane):
            raise TypeError(f"control: expected a ControlPlane, got {type(control).__name__}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        self.cache, self.control, self.timeout = cache, control, float(timeout)
        self.geometry = geometry(cache)
        self._owns_engine, self._owns_arena = engine is None, arena is None
        self._pool_regs: list[int] = []
        self.engine = engine
        self.arena = arena
        try:
            self.engine = engine or TransferEngine()
            self.arena = arena or StagingArena(arena_bytes, device=cache.device)
            self.arena_addr = self.engine.register_arena(self.arena)  # once per arena
        except BaseException:
            self._release_owned()
            raise

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

    def wait(self, request_id: int, timeout: float | None = None) -> KVStatus:
        """Poll until the request is Success or Failed and return that status; with
        ``timeout`` (seconds), return whatever the status is then. Every request ends by
        itself within its own timeouts, so ``timeout=None`` does not hang."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while True:
            status = self.poll(request_id)
            if status in DONE or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def _release_owned(self) -> None:
        """Unregister the pool, close what this endpoint created (the arena first: it
        unregisters itself)."""
        for addr in self._pool_regs:
            if self.engine is not None and not self.engine.closed:
                self.engine.unregister(addr)
        self._pool_regs = []
        if self._owns_arena and self.arena is not None:
            self.arena.close()
        if self._owns_engine and self.engine is not None:
            self.engine.close()

    def close(self) -> None:
        self._release_owned()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
