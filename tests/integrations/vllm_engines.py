"""Real vLLM engines on the CPU for the integration tests: a tiny Llama-shaped model written
at test time, and engines in their own processes driven over a pipe.

No hub, no tokenizer: ``HF_HUB_OFFLINE=1``, ``skip_tokenizer_init=True``, prompts as token ids.
Weights are random (seeded), not ``load_format="dummy"``: dummy weights give outputs that do
not depend on the KV cache, which would make the transfer tests unable to fail.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

from mp import wait_for

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "MC_LOG_LEVEL": "ERROR", "VLLM_LOGGING_LEVEL": "WARNING"}
VOCAB, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 512, 4, 2, 32, 2


def write_tiny_llama(path: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """config.json + model.safetensors of a Llama with random weights (~1 MB, bf16)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hidden, inter = HEADS * HEAD_DIM, 256
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 1024,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)

    def w(*shape):  # fan-in scaled, so attention is not uniform averaging
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    def ones():
        return torch.ones(hidden, dtype=torch.bfloat16)

    weights = {"model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g)
               .to(torch.bfloat16), "model.norm.weight": ones(), "lm_head.weight": w(VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, hidden),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, hidden),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, hidden),
            p + "self_attn.o_proj.weight": w(hidden, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": ones(),
            p + "post_attention_layernorm.weight": ones()})
    save_file(weights, str(path / "model.safetensors"))
    return path


def engine_args(model: Path, block_size: int, kv: dict | None = None, **extra) -> dict:
    args = dict(model=str(model), skip_tokenizer_init=True, enforce_eager=True,
                block_size=block_size, dtype="bfloat16", max_model_len=512, max_num_seqs=8,
                max_num_batched_tokens=512, kv_cache_memory_bytes=32 << 20, seed=0,
                enable_prefix_caching=False)
    if kv is not None:
        args["kv_transfer_config"] = kv
    args.update(extra)
    return args


def _serve(conn, args: dict) -> None:
    """The engine process: build the LLM, then answer commands until "close"."""
    os.environ.update(ENV)
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        started = time.monotonic()
        llm = LLM(**args)
        conn.send(("ready", time.monotonic() - started))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore
    while True:
        cmd, payload = conn.recv()
        if cmd == "close":
            break
        try:
            prompts, max_tokens, params = payload
            sps = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                  detokenize=False,
                                  extra_args={"kv_transfer_params": p} if p else None)
                   for p in params]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps,
                                use_tqdm=False)
            # held blocks (a producer waiting for its transfers' verdicts) drain as the
            # engine steps, as vLLM's busy loop does (scheduler.has_requests)
            def drained():
                if not core.scheduler.has_requests():
                    return True
                llm.llm_engine.step()
                return False

            wait_for(drained, 120, fail=False)  # reported below ("pending")
            free = core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
            conn.send(("ok", {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "finish": [o.outputs[0].finish_reason for o in outs],
                              "kv_params": [o.kv_transfer_params for o in outs],
                              "cached": [o.num_cached_tokens for o in outs],
                              "free_blocks": free,
                              "pending": core.scheduler.has_requests()}))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        conn.send(("closed", None))


class Engine:
    """A vLLM engine in its own (spawned) process; `wait_ready` returns its start time (s)."""

    def __init__(self, args: dict, timeout: float = 300.0):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, args), daemon=True)
        self.proc.start()
        self.timeout = timeout
        self.start_s = None

    def wait_ready(self) -> float:
        if self.start_s is None:
            self.start_s = self._reply()
        return self.start_s

    def _reply(self, timeout: float | None = None):
        if not self.conn.poll(self.timeout if timeout is None else timeout):
            raise TimeoutError(f"engine pid {self.proc.pid} did not answer")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"engine pid {self.proc.pid}:\n{value}")
        return value

    def submit(self, prompts, max_tokens: int, params=None) -> None:
        self.conn.send(("generate", (prompts, max_tokens, params or [None] * len(prompts))))

    def result(self, timeout: float | None = None) -> dict:
        return self._reply(timeout)

    def generate(self, prompts, max_tokens: int, params=None) -> dict:
        self.submit(prompts, max_tokens, params)
        return self.result()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", None))
                self.conn.poll(60)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
