"""Prefill/decode disaggregation with real vLLM engines on the CPU and the cpkv connector.

Two engines in their own processes, started once for the module: a decode engine
(kv_consumer, the production connector) and a prefill engine (kv_producer) whose connector
breaks the transfer of requests with a transfer id >= BROKEN on purpose and passes every other
request to the production code unchanged (tests/integrations/broken_connector.py; today's
transfer API lets one decode engine take one prefill engine's sender, so the broken path
cannot be a third engine). Requests are routed as the example proxy does (examples/vllm_proxy.py):
the decode request first, then the prefill request (max_tokens 1), matching transfer params.
The oracle is a single engine computing the same prompts itself (greedy, the same weights).
"""

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is installed in the vLLM lane only (make test-vllm)")

from broken_connector import BROKEN  # noqa: E402
from mp import free_port  # noqa: E402
from vllm_engines import Engine, engine_args, write_tiny_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from vllm_proxy import new_transfer_id, transfer_params  # noqa: E402

BLOCK = 32
# a 1-token prompt (nothing to move), partial and full blocks, several blocks
PROMPTS = [[7], list(range(3, 8)), list(range(5, 36)), list(range(9, 41)), list(range(11, 44)),
           list(range(2, 79)), [(i * 37) % 500 + 3 for i in range(130)]]
MAX_TOKENS = 8


def connector(role: str, **extra) -> dict:
    return {"kv_connector": "CpkvConnector", "kv_connector_module_path": "cpkv.integrations.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"cpkv_timeout": 10, **extra}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = write_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")
    port = free_port()
    started = time.monotonic()
    prefill = {**connector("kv_producer"), "kv_connector": "BrokenCpkvConnector",
               "kv_connector_module_path": "broken_connector"}
    e = {"decode": Engine(engine_args(model, BLOCK, {**connector("kv_consumer"),
                                                      "kv_port": port})),
         "prefill": Engine(engine_args(model, BLOCK, prefill))}
    try:
        starts = {name: round(eng.wait_ready(), 1) for name, eng in e.items()}
        print(f"\nengine starts (s, after imports, 2 at once): {starts}; both ready after "
              f"{time.monotonic() - started:.1f} s")
        e["kv"] = f"127.0.0.1:{port}"
        e["reference"] = e["decode"].generate(PROMPTS, MAX_TOKENS)
        yield e
    finally:
        for name in ("prefill", "decode"):  # senders first: their receiver outlives them
            e[name].close()


def disaggregated(engines, prompts=PROMPTS, send=True, broken=False):
    """Route each prompt as the proxy does; the decode and prefill engines' results."""
    ids = [new_transfer_id() + (BROKEN if broken else 0) for _ in prompts]
    pairs = [transfer_params(t, engines["kv"]) for t in ids]
    engines["decode"].submit(prompts, MAX_TOKENS, [d for _, d in pairs])
    pre = engines["prefill"].generate(prompts, 1, [p for p, _ in pairs]) if send else None
    return engines["decode"].result(), pre, ids


def test_decode_tokens_equal_a_single_engine(engines):
    ref = engines["reference"]
    assert ref["cached"] == [0] * len(PROMPTS)
    dec, pre, ids = disaggregated(engines)
    assert dec["tokens"] == ref["tokens"]
    assert dec["finish"] == ["length"] * len(PROMPTS)
    # every prompt token but the last came from the prefill engine (vLLM recomputes the last)
    assert dec["cached"] == [len(p) - 1 for p in PROMPTS]
    # the prefill engine answered its one token and handed the params back
    assert [t[0] for t in pre["tokens"]] == [t[0] for t in ref["tokens"]]
    assert [p and p["cpkv_transfer_id"] for p in pre["kv_params"]] == \
        [None if len(p) == 1 else i for p, i in zip(PROMPTS, ids, strict=True)]
    # held blocks were released after the transfers' verdicts, on both sides
    assert not pre["pending"] and not dec["pending"]
    assert pre["free_blocks"] == dec["free_blocks"] == ref["free_blocks"]


def test_a_broken_transfer_decodes_other_tokens(engines):
    """The check above can fail: blocks shipped in reverse order land "successfully" and the
    multi-block prompts decode other tokens (single-block ones are unaffected)."""
    ref = engines["reference"]
    multi = [p for p in PROMPTS if len(p) - 1 > BLOCK]
    dec, _, _ = disaggregated(engines, multi, broken=True)
    assert dec["cached"] == [len(p) - 1 for p in multi]
    want = [t for p, t in zip(PROMPTS, ref["tokens"], strict=True) if len(p) - 1 > BLOCK]
    assert all(got != w for got, w in zip(dec["tokens"], want, strict=True))


def test_a_lost_transfer_is_a_load_error_and_is_recomputed(engines):
    """No prefill engine sends: the receiver times out, the connector reports the request's
    blocks as load errors, vLLM (kv_load_failure_policy "recompute") computes the prompt
    itself: the same tokens, none of them loaded."""
    prompts = PROMPTS[1:4]
    started = time.monotonic()
    dec, _, _ = disaggregated(engines, prompts, send=False)
    assert time.monotonic() - started >= 10  # cpkv_timeout
    assert dec["tokens"] == engines["reference"]["tokens"][1:4]
    assert dec["cached"] == [0, 0, 0]
    assert dec["free_blocks"] == engines["reference"]["free_blocks"]
