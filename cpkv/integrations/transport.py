"""The seam between a runner connector and cpkv's transfer agents: one class, `KVTransport`.

A connector (``cpkv.integrations.vllm``) says, by the runner's request id, "send these pages
layer by layer to those decode receivers", "expect these pages from that prefill instance",
"how is it going", "how many layers are in", "forget it"; this module turns that into calls
on this worker's two agents: one `KVSender` (a producer) and one `KVReceiver` (a consumer),
sharing one Mooncake engine. It is the only place a connector touches the transfer API.

A runner's request ids differ between the prefill and the decode engine (each engine names the
requests it gets), so the wire id is the router's: a ``transfer_id`` (a non-negative int or a
string, `cpkv.transfer.protocol.check_request_id`) that both sides find in the request's
transfer parameters. A producer ships to the receivers the request names (one per decode
TP/PP rank, `receiver_addresses`); a consumer expects from the prefill instance the request
names; routes between unequal TP/PP sizes follow from the two instances' sizes.
"""

from __future__ import annotations

import enum

from .._closing import Closing
from ..parallel import ParallelRank, ParallelSizes
from ..transfer import KVReceiver, KVSender, KVStatus, TransferEngine
from ..transfer.protocol import check_request_id

__all__ = ["KVTransport", "TransferState", "receiver_addresses", "receiver_port"]


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def receiver_port(kv_port: int, rank: ParallelRank, sizes: ParallelSizes, dp_index: int = 0) -> int:
    """The port a decode worker's receiver listens on: ``kv_port`` + its index among the
    engine's TP x PP workers (``pp * tp_size + tp``), after ``dp_index`` engines' worth (a
    vLLM data-parallel rank on the same host). The router derives the same with
    `receiver_addresses`."""
    per_engine = sizes.tp * sizes.pp
    port = kv_port + dp_index * per_engine + rank.pp * sizes.tp + rank.tp
    if not (0 < kv_port and port < 65536):
        raise ValueError(f"kv_port: expected ports {kv_port}..{port} to lie in (0, 65536)")
    return port


def receiver_addresses(host: str, kv_port: int, tp: int = 1, pp: int = 1,
                       dp_index: int = 0) -> list[str]:
    """The addresses of a decode engine's receivers (one per TP x PP worker, by port): what a
    router puts in a prefill request's ``cpkv_to``.

    >>> receiver_addresses("10.0.0.2", 14600, tp=2)
    ['10.0.0.2:14600', '10.0.0.2:14601']
    """
    sizes = ParallelSizes(tp=tp, pp=pp)
    ports = sorted(receiver_port(kv_port, r, sizes, dp_index) for r in sizes.ranks())
    return [f"{host}:{port}" for port in ports]


class KVTransport(Closing):
    """One worker's transfers, by runner request id (a str).

    Args:
        cache: this worker's pool (``PagedKVCache``, e.g. `cpkv.adapters.from_vllm` of what
            the runner registered).
        instance: this engine's name: a prefill instance's is what decode requests give as
            their ``source``; a decode instance's names its receivers in logs and errors.
        rank, sizes: this worker's coordinates and the engine's parallel sizes.
        kind, num_kv_heads, num_layers: the model (``num_layers`` required with PP).
        send: open a sender (a producer).
        serve: the port a receiver listens on, on ``host`` (a consumer; 0: a free one, see
            `address`); None: no receiver.
        host: the address peers reach this worker on (its receiver and transfer engine).
        timeout: seconds a transfer may take (a receiver's wait for its senders, a sender's
            wait for its destination and verdict).
        arena_bytes: staging memory per agent.
        secret: the shared secret of the deployment (default ``CPKV_SECRET``).

    Producer: `send_layers`. Consumer: `expect`, `layers_ready`. Both: `state`, `reason`,
    `forget`, `close`. Nothing here raises for a request's problem: the request is FAILED
    with the reason.
    """

    def __init__(self, cache, *, instance: str, rank: ParallelRank | None = None,
                 sizes: ParallelSizes | None = None, kind: str = "mha",
                 num_kv_heads: int | None = None, num_layers: int | None = None,
                 send: bool = False, serve: int | None = None, host: str = "127.0.0.1",
                 timeout: float = 30.0, arena_bytes: int = 64 << 20, secret=None):
        self.cache, self.timeout = cache, float(timeout)
        self._ids: dict[str, tuple[object, object]] = {}  # rid -> (agent, transfer id)
        self._failed: dict[str, str] = {}  # rid -> reason, for what no agent took
        self.sender = self.receiver = self.engine = None
        self.address = None
        agent = dict(instance=instance, rank=rank, sizes=sizes, kind=kind,
                     num_kv_heads=num_kv_heads, num_layers=num_layers, timeout=self.timeout,
                     arena_bytes=arena_bytes, secret=secret)
        self.engine = TransferEngine(host)
        try:
            if send:
                self.sender = KVSender(cache, engine=self.engine, **agent)
            if serve is not None:
                self.receiver = KVReceiver(cache, engine=self.engine, host=host, port=serve,
                                           **agent)
                self.address = self.receiver.address
        except BaseException:
            self.close()
            raise

    # -- producer --------------------------------------------------------------------------

    def send_layers(self, rid: str, transfer_id, to: list[str], page_ids, num_tokens: int,
                    upto: int, ready=None) -> None:
        """Ship the layers below ``upto`` of request ``rid`` (its first ``num_tokens`` tokens
        in ``page_ids``, this pool's ids in request order) to the decode receivers ``to``
        under ``transfer_id``; ``upto`` = every layer is the request's last call. ``ready``:
        the CUDA stream the layers were written on (CUDA pools)."""
        if rid in self._failed:
            return
        try:
            if self.sender is None:
                raise RuntimeError("this transport has no sender (send=False)")
            self._ids[rid] = (self.sender, transfer_id)
            self.sender.send_layers(transfer_id, page_ids, upto, to=to, num_tokens=num_tokens,
                                    last=upto == self.cache.num_layers, ready=ready)
        except Exception as e:  # bad params, a closed sender
            self._failed[rid] = f"send to {to}: {type(e).__name__}: {e}"

    # -- consumer --------------------------------------------------------------------------

    def expect(self, rid: str, transfer_id, source: str, page_ids, num_tokens: int,
               prefix: int = 0) -> None:
        """Reserve a slot for request ``rid`` from prefill instance ``source`` and tell its
        senders where to write: its first ``num_tokens`` tokens land in ``page_ids`` (this
        pool's ids in request order), but for the first ``prefix`` (already there)."""
        try:
            if self.receiver is None:
                raise RuntimeError("this transport has no receiver (serve=None)")
            check_request_id(transfer_id, "transfer_id")
            self.receiver.expect(transfer_id, page_ids, source=source, num_tokens=num_tokens,
                                 prefix=prefix)
            self._ids[rid] = (self.receiver, transfer_id)
        except Exception as e:  # bad params, pages still receiving another request
            self._failed[rid] = f"expect from {source!r}: {type(e).__name__}: {e}"

    def layers_ready(self, rid: str) -> int:
        """Leading layers of the pool that hold every token of request ``rid``."""
        if rid in self._failed:
            return 0
        agent, tid = self._ids[rid]
        return agent.layers_ready(tid)

    # -- both ------------------------------------------------------------------------------

    def state(self, rid: str) -> TransferState:
        """Where request ``rid`` stands (non-blocking)."""
        if rid in self._failed:
            return TransferState.FAILED
        agent, tid = self._ids[rid]
        status = agent.poll(tid)
        if status == KVStatus.Success:
            return TransferState.DONE
        return TransferState.FAILED if status == KVStatus.Failed else TransferState.PENDING

    def reason(self, rid: str) -> str | None:
        if rid in self._failed:
            return self._failed[rid]
        agent, tid = self._ids.get(rid, (None, None))
        return agent.reason(tid) if agent is not None else None

    def forget(self, rid: str) -> None:
        """Drop request ``rid`` (an open one fails first; a consumer writes no more of it)."""
        self._failed.pop(rid, None)
        agent, tid = self._ids.pop(rid, (None, None))
        if agent is not None:
            agent.forget(tid)

    def close(self) -> None:
        """Close the agents (open requests fail, their peers are told), then the engine."""
        for agent in (self.sender, self.receiver):
            if agent is not None:
                agent.close()
        self.sender = self.receiver = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
