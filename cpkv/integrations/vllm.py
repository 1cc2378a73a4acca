"""cpkv as a vLLM KV connector (``KVConnectorBase_V1``), loaded out of tree::

    --kv-transfer-config '{"kv_connector": "CpkvConnector",
                           "kv_connector_module_path": "cpkv.integrations.vllm",
                           "kv_role": "kv_producer", "kv_port": 14600}'   # or kv_consumer

Push model: the decode engine reserves blocks and publishes where a request lands; the
prefill engine ships each layer's KV as its forward pass writes it, packed (tokens, not
blocks: the two engines' block sizes may differ). A router (``examples/vllm_proxy.py``) gives
both engines the same prompt and matching ``kv_transfer_params``:

- decode: ``{"do_remote_prefill": True, "cpkv_transfer_id": N}``;
- prefill (``max_tokens=1``): ``{"do_remote_decode": True, "cpkv_transfer_id": N,
  "cpkv_peer": "<decode host>:<decode kv_port>"}``.

The decode side loads every prompt token but the last (vLLM recomputes that one to sample the
next token), so the prefill side sends ``len(prompt) - 1`` tokens. A failed transfer (a
timeout, a refused notification, a dead peer) is reported to vLLM as a load error on the
request's blocks (``get_block_ids_with_load_errors``): with ``kv_load_failure_policy=
"recompute"`` vLLM recomputes the request, with ``"fail"`` (vLLM's default) it ends it with an
error; it is never decoded over wrong KV. How the hooks map, call by call, is in docs/vllm.md.

Extra config (``kv_connector_extra_config``): ``cpkv_host`` (the address this consumer serves
its control plane on and peers reach, default 127.0.0.1; the port is ``kv_port`` + TP rank),
``cpkv_timeout`` (seconds a transfer may take, default 30), ``cpkv_arena_bytes`` (staging
memory per sender / receiver, default 64 MiB).

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
from .transport import KVTransport, TransferState, parse_address

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["CpkvConnector", "CpkvConnectorMetadata", "RecvSpec", "SendSpec"]

logger = init_logger(__name__)

# vLLM attention backend name (AttentionBackend.get_name()) -> cpkv.adapters.from_vllm backend
_BACKENDS = {"CPU_ATTN": "cpu", "FLASH_ATTN": "flash_attn", "FLASHINFER": "flashinfer",
             "TRITON_ATTN": "triton_attn"}


@dataclass
class SendSpec:
    """Prefill side: ship ``num_tokens`` tokens in ``block_ids`` (this engine's blocks, in
    request order) to the consumer at ``peer`` under ``transfer_id``."""
    req_id: str
    transfer_id: int
    peer: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class RecvSpec:
    """Decode side: expect ``num_tokens`` tokens into ``block_ids`` under ``transfer_id``."""
    req_id: str
    transfer_id: int
    block_ids: list[int]
    num_tokens: int


@dataclass
class CpkvConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one step: the sends whose prefill ends in this step's forward and
    the receives whose blocks were allocated since the last step."""
    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)


@dataclass
class _Prefill:
    """Scheduler side: a request whose KV this engine sends."""
    transfer_id: int
    peer: str
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    started: bool = False


def _transfer_id(params: dict, req_id: str) -> int | None:
    tid = params.get("cpkv_transfer_id")
    if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0:
        return tid
    logger.error("request %s: kv_transfer_params need a non-negative int cpkv_transfer_id, "
                 "got %r: no transfer", req_id, tid)
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        self._recving: dict[str, list[int]] = {}
        self._finished: set[str] = set()
        self._load_errors: set[int] = set()

    # == scheduler side ====================================================================

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Decode side: every prompt token but the last comes from the prefill engine,
        asynchronously. A local prefix hit is not combined with a remote prefill yet: the
        request is then computed here (see docs/vllm.md)."""
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_prefill") or request.request_id in self._recv_planned:
            return 0, False
        n = len(request.prompt_token_ids or ()) - 1
        if n <= 0 or num_computed_tokens > 0 or \
                _transfer_id(params, request.request_id) is None:
            return 0, False
        return n, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if params.get("do_remote_decode") and rid not in self._prefills:
            tid = _transfer_id(params, rid)
            try:
                peer = params.get("cpkv_peer")
                parse_address(peer, "cpkv_peer")
            except ValueError as e:
                logger.error("request %s: %s: no transfer", rid, e)
                tid = None
            if tid is not None:
                self._prefills[rid] = _Prefill(tid, peer, len(request.prompt_token_ids or ()))
        if num_external_tokens > 0 and params.get("do_remote_prefill") \
                and rid not in self._recv_planned:
            block_ids = blocks.get_block_ids()[0][:_cdiv(num_external_tokens, self.block_size)]
            self._recvs.append(RecvSpec(rid, _transfer_id(params, rid), list(block_ids),
                                        num_external_tokens))
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
                meta.sends.append(SendSpec(rid, p.transfer_id, p.peer,
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
        return True, {"cpkv_transfer_id": p.transfer_id, "cpkv_tokens": p.prompt_len - 1}

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for rid in connector_output.finished_sending or ():
            self._held.discard(rid)

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping while held blocks wait for their transfer's end."""
        return bool(self._held)

    # == worker side =======================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """View vLLM's pool (``cpkv.adapters.from_vllm``) and open the transport: a consumer
        serves its control plane on ``cpkv_host:kv_port + tp rank``."""
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
        serve = None
        if self._kv_transfer_config.is_kv_consumer:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            port = self._kv_transfer_config.kv_port + get_tensor_model_parallel_rank()
            serve = f"{self.host}:{port}"
        self.transport = self.make_transport(self.cache, serve)
        logger.info("CpkvConnector: %s pool %s, %d layers, page size %d%s", backend,
                    self.cache.layout, self.cache.num_layers, self.cache.page_size,
                    f", serving {self.transport.address}" if serve else "")

    def make_transport(self, cache, serve: str | None) -> KVTransport:
        """The transport this worker moves pages with (a subclass may wrap it)."""
        return KVTransport(cache, serve=serve, timeout=self.timeout,
                           arena_bytes=self.arena_bytes)

    def _pages(self, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, int]:
        """A request's first ``num_tokens`` tokens in vLLM blocks as (cpkv page ids, cpkv
        tokens). Token-row pools: the registered tensors may be in smaller kernel blocks
        (block b is pages [b * r, (b + 1) * r)). Whole-block pools (CPU): a cpkv token is a
        block, the last one partly filled (its tail is never read before it is written)."""
        ids = torch.tensor(block_ids, dtype=torch.int64)
        if self._whole_blocks:
            n = _cdiv(num_tokens, self.block_size)
            return ids[:n].to(self.cache.device), n
        r = self.block_size // self.cache.page_size
        if r > 1:
            ids = (ids[:, None] * r + torch.arange(r)).reshape(-1)
        return ids[:_cdiv(num_tokens, self.cache.page_size)].to(self.cache.device), num_tokens

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._saved = set()
        self._step_sends = {s.req_id: (s, 0) for s in getattr(connector_metadata, "sends", ())}
        self._sending.update(self._step_sends)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Decode side: publish where each newly allocated request lands."""
        meta = self._get_connector_metadata()
        for spec in meta.recvs:
            self._recving[spec.req_id] = spec.block_ids
            self.transport.expect(spec.req_id, spec.transfer_id,
                                  *self._pages(spec.block_ids, spec.num_tokens))

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
                self.transport.send_layers(rid, spec.transfer_id, spec.peer,
                                           *self._pages(spec.block_ids, spec.num_tokens), upto,
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
