"""cpkv as a vLLM KV connector (``KVConnectorBase_V1``), loaded out of tree::

    --kv-transfer-config '{"kv_connector": "CpkvConnector",
                           "kv_connector_module_path": "cpkv.integrations.vllm",
                           "kv_role": "kv_producer", "engine_id": "prefill-0"}'
    --kv-transfer-config '{"kv_connector": "CpkvConnector",
                           "kv_connector_module_path": "cpkv.integrations.vllm",
                           "kv_role": "kv_consumer", "kv_port": 14600}'

Push model over cpkv's transfer agents: every prefill worker has one `KVSender` (the
instance's name is vLLM's ``engine_id``; its rank and sizes are the worker's TP/PP rank and
the engine's TP/PP sizes), every decode worker one `KVReceiver` listening on ``cpkv_host``,
port ``kv_port`` + its TP x PP index (`cpkv.integrations.transport.receiver_addresses`). Any
number of prefill engines may feed a decode engine, with other TP/PP sizes. The decode engine
reserves blocks and expects each request from the prefill instance it names; the prefill engine
ships each layer's KV as its forward pass writes it, packed (tokens, not blocks: the two
engines' block sizes may differ where vLLM's pools have token rows). A router
(``examples/vllm_proxy.py``) gives both engines the same prompt and matching
``kv_transfer_params``:

- decode: ``{"do_remote_prefill": True, "cpkv_transfer_id": T, "cpkv_source": "prefill-0"}``;
- prefill (``max_tokens=1``): ``{"do_remote_decode": True, "cpkv_transfer_id": T,
  "cpkv_to": ["<decode host>:<kv_port>", ...]}`` (one address per decode TP x PP worker);

``T`` is a non-negative int or a string, unique among the requests in flight. The decode side
loads every prompt token but the last (vLLM recomputes that one to sample the next), after any
prefix it holds already (a local prefix-cache hit: only the rest is sent), so the prefill side
sends ``len(prompt) - 1`` tokens. A failed transfer (a timeout, a refused notification, a
dead peer, a sender the receiver refuses) is reported to vLLM as a load error on the blocks it
was to fill (``get_block_ids_with_load_errors``): with ``kv_load_failure_policy="recompute"``
vLLM recomputes the request, with ``"fail"`` (vLLM's default) it ends it with an error; it is
never decoded over wrong KV. How the hooks map, call by call, is in docs/vllm.md.

Extra config (``kv_connector_extra_config``): ``cpkv_host`` (the address this worker listens
on and peers reach it at, default 127.0.0.1), ``cpkv_timeout`` (seconds a transfer may take,
default 30), ``cpkv_arena_bytes`` (staging memory per agent, default 64 MiB). The shared
secret, if any, comes from ``CPKV_SECRET``.

Moving pages goes through one seam, `cpkv.integrations.transport.KVTransport`; this module
only speaks vLLM. Only this module of cpkv imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from ..adapters import from_vllm
from ..parallel import ParallelRank, ParallelSizes, layers_of
from ..transfer.link import parse_address
from ..transfer.protocol import check_request_id
from .transport import KVTransport, TransferState, receiver_port

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["CpkvConnector", "CpkvConnectorMetadata", "RecvSpec", "SendSpec", "block_pages"]

logger = init_logger(__name__)

# vLLM attention backend name (AttentionBackend.get_name()) -> cpkv.adapters.from_vllm backend
_BACKENDS = {"CPU_ATTN": "cpu", "FLASH_ATTN": "flash_attn", "FLASHINFER": "flashinfer",
             "TRITON_ATTN": "triton_attn"}


@dataclass
class SendSpec:
    """Prefill side: ship ``num_tokens`` tokens in ``block_ids`` (this engine's blocks, in
    request order) to the decode receivers ``to`` under ``transfer_id``."""
    req_id: str
    transfer_id: int | str
    to: list[str]
    block_ids: list[int]
    num_tokens: int


@dataclass
class RecvSpec:
    """Decode side: expect ``num_tokens`` tokens into ``block_ids`` under ``transfer_id`` from
    prefill instance ``source``; the first ``prefix`` tokens are in the blocks already."""
    req_id: str
    transfer_id: int | str
    source: str
    block_ids: list[int]
    num_tokens: int
    prefix: int = 0


@dataclass
class CpkvConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one step: the sends whose prefill ends in this step's forward and
    the receives whose blocks were allocated since the last step."""
    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)


@dataclass
class _Prefill:
    """Scheduler side: a request whose KV this engine sends."""
    transfer_id: int | str
    to: list[str]
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    started: bool = False


def _params(request: Request, side: str) -> dict | None:
    """The request's cpkv parameters for ``side`` ("decode": this engine sends, "prefill":
    it receives), checked: None (logged) if they are not usable, so the request runs plain."""
    params = request.kv_transfer_params or {}
    if not params.get(f"do_remote_{side}"):
        return None
    try:
        out = {"transfer_id": check_request_id(params.get("cpkv_transfer_id"),
                                               "cpkv_transfer_id")}
        if side == "decode":
            to = params.get("cpkv_to")
            to = [to] if isinstance(to, str) else to
            if not isinstance(to, list) or not to:
                raise TypeError(f"cpkv_to: expected the decode receivers' 'host:port' "
                                f"addresses, got {to!r}")
            for address in to:
                parse_address(address)
            out["to"] = list(to)
        else:
            source = params.get("cpkv_source")
            if not isinstance(source, str) or not source:
                raise TypeError(f"cpkv_source: expected the prefill instance's name (its "
                                f"engine_id), got {source!r}")
            out["source"] = source
        return out
    except (TypeError, ValueError) as e:
        logger.error("request %s: kv_transfer_params: %s: no transfer", request.request_id, e)
        return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_pages(block_ids: list[int], num_tokens: int, *, block_size: int, page_size: int,
                whole_blocks: bool, prefix: int = 0) -> tuple[torch.Tensor, int, int]:
    """A request's first ``num_tokens`` tokens in vLLM blocks (``block_size`` tokens each) as
    cpkv (page ids, tokens, prefix tokens). Token-row pools: the registered tensors may be in
    kernel blocks of ``page_size`` tokens (block b is pages [b * r, (b + 1) * r)). Whole-block
    pools (CPU): a cpkv token is a block, the last one partly filled (its tail is never read
    before it is written), and ``prefix`` (a local prefix-cache hit) is whole blocks."""
    ids = torch.tensor(block_ids, dtype=torch.int64)
    if whole_blocks:
        n = _cdiv(num_tokens, block_size)
        return ids[:n], n, prefix // block_size
    r = block_size // page_size
    if r > 1:
        ids = (ids[:, None] * r + torch.arange(r)).reshape(-1)
    return ids[:_cdiv(num_tokens, page_size)], num_tokens, prefix


class CpkvConnector(KVConnectorBase_V1):
    """cpkv's KV connector for vLLM: scheduler half and worker half, per ``role``."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        try:  # vLLM >= 0.31 counts external hits by source
            from vllm.v1.metrics.cache_hit_source import CacheHitSource
            self._cache_hit_source = CacheHitSource.P2P
        except ImportError:
            pass
        ktc = self._kv_transfer_config
        self.instance = ktc.engine_id  # vLLM appends "_dp<rank>" under data parallelism
        self.block_size = vllm_config.cache_config.block_size
        self.timeout = float(ktc.get_from_extra_config("cpkv_timeout", 30.0))
        self.host = ktc.get_from_extra_config("cpkv_host", "127.0.0.1")
        self.arena_bytes = int(ktc.get_from_extra_config("cpkv_arena_bytes", 64 << 20))
        # scheduler side
        self._prefills: dict[str, _Prefill] = {}
        self._held: set[str] = set()  # request_finished returned True, not yet sent
        self._recvs: list[RecvSpec] = []
        self._recv_planned: set[str] = set()
        # worker side
        self.transport: KVTransport | None = None
        self.cache = None
        self._whole_blocks = False
        self._layer_index: dict[str, int] = {}
        self._saved: set[int] = set()  # layers saved in this step's forward
        self._step_sends: dict[str, tuple[SendSpec, int]] = {}  # req -> (spec, upto sent)
        self._sending: set[str] = set()
        self._recving: dict[str, list[int]] = {}  # req -> the blocks its transfer fills
        self._finished: set[str] = set()
        self._load_errors: set[int] = set()

    # == scheduler side ====================================================================

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Decode side: every prompt token but the last that is not here already (a local
        prefix hit of ``num_computed_tokens``) comes from the prefill engine, asynchronously."""
        if request.request_id in self._recv_planned or _params(request, "prefill") is None:
            return 0, False
        n = len(request.prompt_token_ids or ()) - 1 - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        rid = request.request_id
        prompt_len = len(request.prompt_token_ids or ())
        if rid not in self._prefills:
            send = _params(request, "decode")
            if send is not None:
                self._prefills[rid] = _Prefill(send["transfer_id"], send["to"], prompt_len)
        if num_external_tokens > 0 and rid not in self._recv_planned:
            recv = _params(request, "prefill")
            if recv is not None:
                n = prompt_len - 1  # the local prefix hit, then the external tokens
                block_ids = blocks.get_block_ids()[0][:_cdiv(n, self.block_size)]
                self._recvs.append(RecvSpec(rid, recv["transfer_id"], recv["source"],
                                            list(block_ids), n, n - num_external_tokens))
                self._recv_planned.add(rid)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> CpkvConnectorMetadata:
        meta = CpkvConnectorMetadata(recvs=self._recvs)
        self._recvs = []
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            p = self._prefills.get(new.req_id)
            if p is not None:
                p.block_ids = list(new.block_ids[0])
                computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            p = self._prefills.get(rid)
            if p is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # a resumed request's list is all its blocks
                p.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                p.block_ids.extend(new_ids[0])
            computed[rid] = cached.num_computed_tokens[i]
        for rid, done in computed.items():
            p = self._prefills[rid]
            n = p.prompt_len - 1
            upto = done + scheduler_output.num_scheduled_tokens.get(rid, 0)
            if not p.started and upto >= p.prompt_len and n > 0:
                p.started = True  # this step's forward writes the last of the prompt
                meta.sends.append(SendSpec(rid, p.transfer_id, p.to,
                                           p.block_ids[:_cdiv(n, self.block_size)], n))
        return meta

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill side: hold the blocks of a request whose send started until the worker
        reports it finished sending (the receiver's verdict)."""
        rid = request.request_id
        self._recv_planned.discard(rid)
        p = self._prefills.pop(rid, None)
        if p is None or not p.started:
            return False, None
        self._held.add(rid)
        return True, {"cpkv_transfer_id": p.transfer_id, "cpkv_tokens": p.prompt_len - 1,
                      "cpkv_source": self.instance}

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for rid in connector_output.finished_sending or ():
            self._held.discard(rid)

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping while held blocks wait for their transfer's end."""
        return bool(self._held)

    # == worker side =======================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """View vLLM's pool (``cpkv.adapters.from_vllm``) and open this worker's agents: a
        producer's sender, a consumer's receiver on ``cpkv_host:kv_port + TP x PP index``."""
        from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
        names = {b.get_name() for b in get_current_attn_backends(self._vllm_config)}
        backend = "mla" if any("MLA" in n for n in names) else \
            _BACKENDS.get(next(iter(names)) if len(names) == 1 else "", None)
        if backend is None:
            raise ValueError(f"CpkvConnector: attention backends {sorted(names)}: expected one "
                             f"of {sorted(_BACKENDS)} or an MLA backend")
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        isa = None
        if backend == "cpu":  # the kernels' ISA decides the bytes inside a block
            layers = self._vllm_config.compilation_config.static_forward_context
            isa = getattr(layers.get(next(iter(kv_caches))), "isa", None)
        try:  # the installed release's layout, its shape checked
            self.cache = from_vllm(kv_caches, backend=backend, vllm_version=vllm.__version__,
                                   cpu_isa=isa)
        except ValueError as e:
            if not str(e).startswith("vllm_version"):
                raise
            logger.warning("CpkvConnector: %s; reading the layout from the tensors' shapes", e)
            self.cache = from_vllm(kv_caches, backend=backend, cpu_isa=isa)
        self._whole_blocks = backend == "cpu"
        if not self._whole_blocks and self.block_size % self.cache.page_size:
            raise ValueError(f"CpkvConnector: block_size {self.block_size} is not a multiple "
                             f"of the registered pages' {self.cache.page_size} tokens")
        rank, sizes, num_layers = self._coordinates(list(kv_caches))
        ktc = self._kv_transfer_config
        serve = receiver_port(ktc.kv_port, rank, sizes,
                              self._vllm_config.parallel_config.data_parallel_index) \
            if ktc.is_kv_consumer else None
        model = self._vllm_config.model_config
        self.transport = self.make_transport(
            self.cache, instance=self.instance, rank=rank, sizes=sizes,
            kind="mla" if backend == "mla" else "mha",
            num_kv_heads=None if backend == "mla" else model.get_total_num_kv_heads(),
            num_layers=num_layers, send=ktc.is_kv_producer, serve=serve, host=self.host,
            timeout=self.timeout, arena_bytes=self.arena_bytes)
        logger.info("CpkvConnector %s %s: %s pool %s, %d layers, page size %d%s", self.instance,
                    rank, backend, self.cache.layout, self.cache.num_layers,
                    self.cache.page_size, f", receiving on {self.transport.address}"
                    if serve is not None else "")

    def _coordinates(self, layer_names: list[str]) -> tuple[ParallelRank, ParallelSizes,
                                                            int | None]:
        """This worker's rank, the engine's sizes, and the model's layer count (with PP:
        cpkv's split of the layers must be vLLM's, checked on the registered layers)."""
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        parallel = self._vllm_config.parallel_config
        if parallel.decode_context_parallel_size > 1:
            raise ValueError(f"CpkvConnector: decode context parallelism (size "
                             f"{parallel.decode_context_parallel_size}) is not supported yet")
        sizes = ParallelSizes(tp=parallel.tensor_parallel_size,
                              pp=parallel.pipeline_parallel_size)
        rank = ParallelRank(tp=get_tensor_model_parallel_rank(),
                            pp=get_pp_group().rank_in_group if sizes.pp > 1 else 0)
        if sizes.pp == 1:
            return rank, sizes, None
        from vllm.model_executor.models.utils import extract_layer_index
        total = self._vllm_config.model_config.get_total_num_hidden_layers()
        held = [extract_layer_index(n) for n in layer_names]
        ours = layers_of(rank.pp, sizes.pp, total)
        if held != list(ours):
            raise ValueError(f"CpkvConnector: pp rank {rank.pp} of {sizes.pp} holds layers "
                             f"{held[0]}..{held[-1]} of {total}; cpkv splits them as "
                             f"{ours.start}..{ours.stop - 1} (balanced, the first stages one "
                             f"longer): set VLLM_PP_LAYER_PARTITION to that split")
        return rank, sizes, total

    def make_transport(self, cache, **kwargs) -> KVTransport:
        """The transport this worker moves pages with (a subclass may wrap it)."""
        return KVTransport(cache, **kwargs)

    def _pages(self, block_ids: list[int], num_tokens: int,
               prefix: int = 0) -> tuple[torch.Tensor, int, int]:
        ids, n, prefix = block_pages(block_ids, num_tokens, block_size=self.block_size,
                                     page_size=self.cache.page_size,
                                     whole_blocks=self._whole_blocks, prefix=prefix)
        return ids.to(self.cache.device), n, prefix

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._saved = set()
        self._step_sends = {s.req_id: (s, 0) for s in getattr(connector_metadata, "sends", ())}
        self._sending.update(self._step_sends)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Decode side: expect each newly allocated request (its senders learn where its
        tokens land as they connect or announce it)."""
        meta = self._get_connector_metadata()
        for spec in meta.recvs:
            # the blocks the transfer fills: a failure invalidates these, never the prefix.
            # Requests in flight share blocks only as cached prefixes (vLLM caches a request's
            # blocks once loaded), which the receiver never writes nor counts as busy.
            self._recving[spec.req_id] = spec.block_ids[spec.prefix // self.block_size:]
            ids, n, prefix = self._pages(spec.block_ids, spec.num_tokens, spec.prefix)
            self.transport.expect(spec.req_id, spec.transfer_id, spec.source, ids, n, prefix)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: a request loads while it waits outside the batch
        (``WAITING_FOR_REMOTE_KVS``) and joins it once every layer is in."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs) -> None:
        """Prefill side: the layers written so far ship while the next ones compute."""
        index = self._layer_index.get(layer_name)
        if index is None or not self._step_sends:
            return
        self._saved.add(index)
        upto = 0
        while upto in self._saved:
            upto += 1
        self._ship(upto)

    def wait_for_save(self) -> None:
        """The forward is over: every layer of this step's sends is written."""
        if self.cache is not None:
            self._ship(self.cache.num_layers)
        self._step_sends = {}

    def _ship(self, upto: int) -> None:
        ready = torch.cuda.current_stream() if self.cache.device.type == "cuda" else None
        for rid, (spec, sent) in list(self._step_sends.items()):
            if upto > sent:
                ids, n, _ = self._pages(spec.block_ids, spec.num_tokens)
                self.transport.send_layers(rid, spec.transfer_id, spec.to, ids, n, upto,
                                           ready=ready)
                self._step_sends[rid] = (spec, upto)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """Sends end in the receiver's verdict, and are reported once vLLM has finished the
        request; receives end in Success or, failed, with their blocks as load errors."""
        if self.transport is None:
            return set(), set()
        self._finished |= finished_req_ids & (self._sending | set(self._recving))
        sent, recvd = set(), set()
        for rid in list(self._sending):
            if rid in self._finished and self._ended(rid, "send") is not None:
                self._sending.discard(rid)
                sent.add(rid)
        for rid, blocks in list(self._recving.items()):
            if rid in self._finished:  # aborted while loading: stop writing its blocks
                self.transport.forget(rid)
                state = TransferState.DONE
            else:
                state = self._ended(rid, "receive")
            if state is not None:
                del self._recving[rid]
                recvd.add(rid)
                if state == TransferState.FAILED:
                    self._load_errors.update(blocks)
        self._finished -= sent | recvd
        return sent, recvd

    def _ended(self, rid: str, what: str) -> TransferState | None:
        """The request's final state (then forgotten), or None while it runs."""
        state = self.transport.state(rid)
        if state == TransferState.PENDING:
            return None
        if state == TransferState.FAILED:
            logger.warning("cpkv %s of request %s failed: %s", what, rid,
                           self.transport.reason(rid))
        self.transport.forget(rid)
        return state

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
