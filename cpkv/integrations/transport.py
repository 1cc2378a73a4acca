"""The seam between a runner connector and cpkv's transfer API: one class, `KVTransport`.

A connector (``cpkv.integrations.vllm``) says, by the runner's request id, "send these pages
layer by layer to that decode peer", "expect these pages from a prefill source", "how is it
going", "how many layers are in", "forget it"; this module turns that into `KVSender` /
`KVReceiver` calls. It is the only place a connector touches the transfer API, so moving to
another transfer API changes this file and nothing in the connector.

Today's API binds a sender to one receiver's control plane, so a producer keeps one `KVSender`
per decode peer it has sent to (created on first use, closed with the transport), and a
consumer serves one control plane that one prefill sender (coordinates dp0.cp0.tp0.pp0)
writes to. Request ids on the wire are non-negative ints (``transfer_id``), which the router
gives both sides in the request's transfer parameters.
"""

from __future__ import annotations

import enum
import threading

from ..transfer import ControlPlane, KVReceiver, KVSender, KVStatus

__all__ = ["KVTransport", "TransferState", "parse_address"]


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def parse_address(address, what: str = "address", *, any_port: bool = False) -> tuple[str, int]:
    """``"host:port"`` as (host, port), checked (``any_port``: 0, a free one, allowed)."""
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    low = 0 if any_port else 1
    if not host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"{what}: expected 'host:port' with a port in [{low}, 65536), "
                         f"got {address!r}")
    return host, int(port)


class KVTransport:
    """One worker's transfers, by runner request id (a str).

    Args:
        cache: this worker's pool (``PagedKVCache``, e.g. `cpkv.adapters.from_vllm` of what
            the runner registered).
        serve: ``"host:port"`` of the control plane this worker serves as a consumer (port 0:
            a free one, see `address`); None for a producer only.
        timeout: seconds a transfer may take (a receiver's wait for its sender, a sender's
            wait for its destination and verdict, connecting to a peer).
        arena_bytes: staging memory per sender / receiver.

    Producer: `send_layers`. Consumer: `expect`, `layers_ready`. Both: `state`, `reason`,
    `forget`, `close`.
    """

    def __init__(self, cache, *, serve: str | None = None, timeout: float = 30.0,
                 arena_bytes: int = 64 << 20):
        self.cache, self.timeout, self.arena_bytes = cache, float(timeout), arena_bytes
        self._lock = threading.Lock()
        self._senders: dict[str, KVSender] = {}
        self._ids: dict[str, tuple[object, int]] = {}  # rid -> (endpoint, transfer id)
        self._failed: dict[str, str] = {}  # rid -> reason, for what never reached an endpoint
        self._receiver = None
        self.address = None
        if serve is not None:
            host, port = parse_address(serve, "serve", any_port=True)
            control = ControlPlane(host, port, serve=True, timeout=self.timeout)
            self._receiver = KVReceiver(cache, control, timeout=self.timeout,
                                        arena_bytes=arena_bytes)
            self.address = f"{host}:{control.port}"

    # -- producer --------------------------------------------------------------------------

    def send_layers(self, rid: str, transfer_id: int, peer: str, page_ids, num_tokens: int,
                    upto: int, ready=None) -> None:
        """Ship the layers below ``upto`` of request ``rid`` (its first ``num_tokens`` tokens in
        ``page_ids``, this pool's ids in request order) to the consumer serving ``peer``;
        ``upto`` = every layer ends the request. ``ready``: the CUDA stream the layers were
        written on (CUDA pools). Never raises for a peer's fault: the request is then FAILED
        with the reason."""
        if rid in self._failed:
            return
        try:
            sender = self._sender(peer)
            self._ids[rid] = (sender, transfer_id)
            sender.send_layers(transfer_id, page_ids, upto, num_tokens=num_tokens,
                               last=upto == self.cache.num_layers, ready=ready)
        except Exception as e:  # an unreachable peer, a closed sender
            self._failed[rid] = f"send to {peer}: {type(e).__name__}: {e}"

    def _sender(self, peer: str) -> KVSender:
        with self._lock:
            sender = self._senders.get(peer)
            if sender is None:
                host, port = parse_address(peer)
                control = ControlPlane(host, port, timeout=self.timeout)
                sender = KVSender(self.cache, control, timeout=self.timeout,
                                  arena_bytes=self.arena_bytes)
                self._senders[peer] = sender
            return sender

    # -- consumer --------------------------------------------------------------------------

    def expect(self, rid: str, transfer_id: int, page_ids, num_tokens: int) -> None:
        """Reserve and publish where request ``rid``'s first ``num_tokens`` tokens land
        (``page_ids``: this pool's ids in request order). Problems fail the request."""
        if self._receiver is None:
            raise RuntimeError("expect: this transport serves no control plane (serve=None)")
        self._ids[rid] = (self._receiver, transfer_id)
        self._receiver.expect(transfer_id, page_ids, num_tokens=num_tokens)

    def layers_ready(self, rid: str) -> int:
        """Leading layers of the pool that hold every token of request ``rid``."""
        endpoint, tid = self._ids[rid]
        return endpoint.layers_ready(tid)

    # -- both ------------------------------------------------------------------------------

    def state(self, rid: str) -> TransferState:
        """Where request ``rid`` stands (non-blocking; advances a consumer's request)."""
        if rid in self._failed:
            return TransferState.FAILED
        endpoint, tid = self._ids[rid]
        status = endpoint.poll(tid)
        if status == KVStatus.Success:
            return TransferState.DONE
        return TransferState.FAILED if status == KVStatus.Failed else TransferState.PENDING

    def reason(self, rid: str) -> str | None:
        if rid in self._failed:
            return self._failed[rid]
        endpoint, tid = self._ids.get(rid, (None, None))
        return endpoint.reason(tid) if endpoint is not None else None

    def forget(self, rid: str) -> None:
        """Drop request ``rid`` (an open one fails first; a consumer writes no more of it)."""
        self._failed.pop(rid, None)
        endpoint, tid = self._ids.pop(rid, (None, None))
        if endpoint is not None:
            endpoint.forget(tid)

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
