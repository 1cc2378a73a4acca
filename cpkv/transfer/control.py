"""The control plane: registrations, request destinations and notifications over a TCPStore.

Built on torch.distributed's ``TCPStore`` (a key-value server with blocking ``wait`` and
non-blocking ``check``); values are JSON. Keys live under a namespace per decode receiver:

    {ns}/recv                         receiver: engine session, arena address, geometry
    {ns}/reg/dp{d}.cp{c}.tp{t}.pp{p}  each prefill sender, every parallel coordinate in the key
    {ns}/req/{rid}/dest               receiver: where request rid's bytes go
    {ns}/req/{rid}/note/{sender}/{k}  sender's k-th notification for rid (bytes landed, or none)
    {ns}/req/{rid}/status             receiver's final status (so senders learn of failures)
    {ns}/req/{rid}/fail/{sender}      a sender's failure reason
"""

from __future__ import annotations

import copy
import datetime
import json
import time

import torch.distributed as dist

from ..layout import PackedFormat
from ..parallel import ParallelRank  # noqa: F401  (imported from here by the sender)

__all__ = ["ControlPlane", "ControlTimeout"]


class ControlTimeout(TimeoutError):
    """A control-plane key did not appear in time (the peer is missing or dead)."""


class ControlPlane:
    """A client (or the server, with ``serve=True``) of the control-plane store.

    Args:
        host, port: the store's address (loopback in tests). ``port=0`` with ``serve=True``
            picks a free port; read it back from ``.port``.
        serve: host the store in this process.
        namespace: key prefix, one per decode receiver.
        timeout: seconds for connecting and for blocking reads.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, serve: bool = False,
                 namespace: str = "cpkv", timeout: float = 30.0):
        self.host, self.namespace, self.timeout = host, namespace, timeout
        self.store = dist.TCPStore(host, port, is_master=serve, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout),
                                   use_libuv=True)
        self.port = self.store.port

    def scoped(self, namespace: str) -> ControlPlane:
        """The same connection under another namespace (another receiver, another test).

        Reuse connections: TCPStore clients serialise their operations, and opening one now
        and then stalls ~5 s in its connect retry (seen with torch 2.13 on loopback)."""
        view = copy.copy(self)
        view.namespace = namespace
        return view

    def key(self, *parts) -> str:
        return "/".join([self.namespace, *map(str, parts)])

    def put(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def exists(self, key: str) -> bool:
        """Non-blocking."""
        return bool(self.store.check([key]))

    def get(self, key: str):
        """Non-blocking read of a key that exists."""
        return json.loads(self.store.get(key))

    def wait_get(self, key: str, timeout: float | None = None, *, cancelled=None):
        """Block until ``key`` exists (polling, so ``cancelled()`` can stop it), then read it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.0005
        while not self.exists(key):
            if cancelled is not None and cancelled():
                raise ControlTimeout(f"gave up waiting for {key!r}")
            if time.monotonic() >= deadline:
                raise ControlTimeout(f"{key!r} did not appear within "
                                     f"{self.timeout if timeout is None else timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.get(key)


def geometry(cache) -> dict:
    """A pool's geometry as exchanged. ``format`` is the slot description both sides must share
    (`PackedFormat.to_dict` of one token, head and layer: format version and each component's
    name, head_dim and dtype); ``page_size`` must match too; the local head and layer counts
    (which the routes must fit) and the layout (NHD/HND, for direct writes) are informative."""
    unit = cache.packed_format(1, layers=(0, 1), heads=(0, 1))
    return {"format": unit.to_dict(), "page_size": cache.page_size,
            "num_heads": cache.num_heads, "num_layers": cache.num_layers,
            "layout": cache.layout}


def check_geometry(mine: dict, theirs: dict, who: str) -> None:
    """Raise ValueError naming the first shared field where ``theirs`` differs from ``mine``:
    format version, page size, then the components (`PackedFormat.check_matches` over the two
    formats). A malformed geometry is refused the same way."""
    try:
        for field, here, there in (("version", mine["format"]["version"],
                                    theirs["format"]["version"]),
                                   ("page_size", mine["page_size"], theirs["page_size"])):
            if here != there:
                raise ValueError(f"{field} is {here} here, {there} there")
        try:
            PackedFormat.from_dict(theirs["format"]).check_matches(
                PackedFormat.from_dict(mine["format"]))
        except ValueError as e:
            raise ValueError(f"components: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"geometry mismatch with {who}: {e}") from None
