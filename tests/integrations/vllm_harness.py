"""vLLM's own v1 Scheduler and KV connector machinery, in this process, for hook-level tests.

The connector is loaded as vLLM loads it (``KVConnectorFactory`` from ``kv_connector_module_path``),
the scheduler is vLLM's, requests are vLLM ``Request`` objects; only the model runner is
replaced by `runner_output`, which says what a step produced (tokens, finished transfers, load
errors) the way the worker's ``KVConnectorOutput`` does.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm_engines import HEAD_DIM, KV_HEADS  # noqa: E402

CONNECTOR = {"kv_connector": "CpkvConnector", "kv_connector_module_path": "cpkv.integrations.vllm"}


def make_config(model, role: str, *, block_size: int = 32, batched_tokens: int = 512,
                policy: str = "recompute", kv_port: int = 14579, extra: dict | None = None,
                layout: str = "LBHNC", engine_id: str | None = None,
                prefix_caching: bool = False) -> VllmConfig:
    model_config = ModelConfig(model=str(model), dtype="bfloat16", seed=0,
                               skip_tokenizer_init=True, max_model_len=512)
    scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=batched_tokens,
                                       max_model_len=512, enable_chunked_prefill=True,
                                       is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching)
    cache_config.kv_cache_layout = layout  # resolved by the engine core before connectors
    kv = KVTransferConfig(**CONNECTOR, kv_role=role, kv_load_failure_policy=policy,
                          kv_port=kv_port, engine_id=engine_id,
                          kv_connector_extra_config=extra or {})
    return VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                      cache_config=cache_config, kv_transfer_config=kv,
                      device_config=DeviceConfig("cpu"))


def kv_spec(block_size: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                             dtype=torch.bfloat16)


def make_scheduler(config: VllmConfig, num_blocks: int = 64) -> Scheduler:
    block_size = config.cache_config.block_size
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"],
                                                                      kv_spec(block_size))])
    config.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=config, kv_cache_config=kv_cache_config, log_stats=False,
                     structured_output_manager=StructuredOutputManager(config),
                     block_size=block_size)


def make_request(rid: str, prompt: list[int], params: dict | None, max_tokens: int = 4,
                 block_size: int | None = None) -> Request:
    """A vLLM request; with ``block_size``, hashed per block as the engine does (prefix
    caching finds its blocks)."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        extra_args={"kv_transfer_params": params} if params else None)
    hasher = None
    if block_size is not None:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        init_none_hash(sha256)
        hasher = get_request_block_hasher(block_size, sha256)
    return Request(rid, prompt, sp, None, block_hasher=hasher)


def runner_output(scheduler: Scheduler, scheduler_output, token: int = 7, *,
                  finished_sending=None, finished_recving=None,
                  invalid_block_ids=None) -> ModelRunnerOutput:
    """What a model runner hands back for one step: a token for each request whose prompt is
    computed (none for a partial prefill chunk), and the connector's report."""
    ids = list(scheduler_output.num_scheduled_tokens)
    kv = None
    if finished_sending or finished_recving or invalid_block_ids:
        kv = KVConnectorOutput(finished_sending=set(finished_sending or ()),
                               finished_recving=set(finished_recving or ()),
                               invalid_block_ids=set(invalid_block_ids or ()))
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[token] if _prompt_done(scheduler, r) else []
                                                for r in ids], logprobs=None,
                             prompt_logprobs_dict={}, pooler_output=None,
                             kv_connector_output=kv)


def _prompt_done(scheduler: Scheduler, rid: str) -> bool:
    req = scheduler.requests[rid]
    return req.num_computed_tokens >= req.num_prompt_tokens


def free_blocks(scheduler: Scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


class CallLog:
    """Records the order of the connector hooks the scheduler calls (names, per step)."""

    HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
             "request_finished", "update_connector_output")

    def __init__(self, connector):
        self.calls: list[str] = []
        for name in self.HOOKS:
            original = getattr(connector, name)
            setattr(connector, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def hook(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return hook

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def allocate(config: VllmConfig, num_layers: int, memory: int = 1 << 20,
             kernel_block_size: int | None = None) -> tuple:
    """vLLM's own KV cache allocation for ``num_layers`` attention layers: the
    ``KVCacheConfig`` (``get_kv_cache_config_from_groups``, in the config's resolved layout)
    and the per-layer views ``register_kv_caches`` receives (``allocate_kv_cache``), in the
    attention kernel's block size (default: the block size)."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.worker.utils import allocate_kv_cache

    block_size = config.cache_config.block_size
    names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    groups = [KVCacheGroupSpec(names, kv_spec(block_size))]
    kv_cache_config = get_kv_cache_config_from_groups(config, groups, memory)
    layout = config.cache_config.get_resolved_kv_cache_layout()
    caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout,
                               [kernel_block_size or block_size])
    return kv_cache_config, caches
