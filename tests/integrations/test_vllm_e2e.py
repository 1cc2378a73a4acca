"""Prefill/decode disaggregation with real vLLM engines on the CPU and the cpkv connector.

Three engines in their own processes, started once for the module: a decode engine
(kv_consumer) and two prefill engines (kv_producer) that feed it at once, requests routed to
them in turn and interleaved: "prefill-b" runs the production connector, "prefill-a" a
connector that breaks the transfer of requests whose transfer id says so and passes every other
request to the production code unchanged (tests/integrations/broken_connector.py). Requests are
routed as the example proxy does (examples/vllm_proxy.py): the decode request first, then the
prefill request (max_tokens 1), matching transfer params. The oracle is a single engine
computing the same prompts itself (greedy, the same weights).
"""

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is installed in the vLLM lane only (make test-vllm)")

from broken_connector import REVERSED, SHORT  # noqa: E402
from mp import free_port  # noqa: E402
from vllm_engines import Engine, engine_args, write_tiny_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from vllm_proxy import new_transfer_id, transfer_params  # noqa: E402

from cpkv.integrations.transport import receiver_addresses  # noqa: E402

pytestmark = [pytest.mark.mp, pytest.mark.slow]

BLOCK = 32
TIMEOUT = 15  # cpkv_timeout, seconds: how long a receive waits for a sender that never comes
# a 1-token prompt (nothing to move), partial and full blocks, several blocks
PROMPTS = [[7], list(range(3, 8)), list(range(5, 36)), list(range(9, 41)), list(range(11, 44)),
           list(range(2, 79)), [(i * 37) % 500 + 3 for i in range(130)]]
MAX_TOKENS = 8
PREFILLS = ("prefill-a", "prefill-b")


def connector(role: str, engine_id: str, **extra) -> dict:
    return {"kv_connector": "CpkvConnector", "kv_connector_module_path": "cpkv.integrations.vllm",
            "kv_role": role, "engine_id": engine_id, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"cpkv_timeout": TIMEOUT, **extra}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = write_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")
    port = free_port()
    started = time.monotonic()
    broken = {**connector("kv_producer", "prefill-a"), "kv_connector": "BrokenCpkvConnector",
              "kv_connector_module_path": "broken_connector"}
    e = {"decode": Engine(engine_args(model, BLOCK, {**connector("kv_consumer", "decode-0"),
                                                      "kv_port": port})),
         "prefill-a": Engine(engine_args(model, BLOCK, broken)),
         "prefill-b": Engine(engine_args(model, BLOCK, connector("kv_producer", "prefill-b")))}
    try:
        starts = {name: round(eng.wait_ready(), 1) for name, eng in e.items()}
        print(f"\nengine starts (s, after imports, 3 at once): {starts}; all ready after "
              f"{time.monotonic() - started:.1f} s")
        e["to"] = receiver_addresses("127.0.0.1", port)
        e["reference"] = e["decode"].generate(PROMPTS, MAX_TOKENS)
        yield e
    finally:
        for name in (*PREFILLS, "decode"):
            e[name].close()


def disaggregated(engines, prompts=PROMPTS, sources=None, tag="", send=True):
    """Route prompt i to prefill engine ``sources[i]`` (default: the two in turn) as the proxy
    does, every request in flight at once; the decode result, each prefill engine's result
    (its prompts' indices, its answer), the transfer ids."""
    sources = sources or [PREFILLS[i % 2] for i in range(len(prompts))]
    ids = [tag + new_transfer_id() for _ in prompts]
    pairs = [transfer_params(t, s, engines["to"]) for t, s in zip(ids, sources, strict=True)]
    engines["decode"].submit(prompts, MAX_TOKENS, [d for _, d in pairs])
    mine = {s: [i for i, x in enumerate(sources) if x == s] for s in PREFILLS}
    for s, idx in mine.items():
        if send and idx:
            engines[s].submit([prompts[i] for i in idx], 1, [pairs[i][0] for i in idx])
    pre = {s: (idx, engines[s].result()) for s, idx in mine.items() if send and idx}
    return engines["decode"].result(), pre, ids


def test_two_prefill_engines_feed_one_decode_engine(engines):
    """Requests alternate between the two prefill engines, all in flight together: every
    decode token equals the single engine's."""
    ref = engines["reference"]
    assert ref["cached"] == [0] * len(PROMPTS)
    dec, pre, ids = disaggregated(engines)
    assert dec["tokens"] == ref["tokens"]
    assert dec["finish"] == ["length"] * len(PROMPTS)
    # every prompt token but the last came from a prefill engine (vLLM recomputes the last)
    assert dec["cached"] == [len(p) - 1 for p in PROMPTS]
    assert not dec["pending"] and dec["free_blocks"] == ref["free_blocks"]
    for source, (idx, out) in pre.items():
        # each prefill engine answered its one token, handed its params back, and released
        # its held blocks after the receiver's verdicts
        assert [t[0] for t in out["tokens"]] == [ref["tokens"][i][0] for i in idx]
        assert out["kv_params"] == [None if len(PROMPTS[i]) == 1 else {
            "cpkv_transfer_id": ids[i], "cpkv_tokens": len(PROMPTS[i]) - 1,
            "cpkv_source": source} for i in idx]
        assert not out["pending"] and out["free_blocks"] == ref["free_blocks"]


def test_a_broken_transfer_decodes_other_tokens(engines):
    """The check above can fail: blocks shipped in reverse order land "successfully" and the
    multi-block prompts decode other tokens (single-block ones are unaffected)."""
    ref = engines["reference"]
    multi = [i for i, p in enumerate(PROMPTS) if len(p) - 1 > BLOCK]
    dec, _, _ = disaggregated(engines, [PROMPTS[i] for i in multi], ["prefill-a"] * len(multi),
                              tag=REVERSED)
    assert dec["cached"] == [len(PROMPTS[i]) - 1 for i in multi]
    assert all(got != ref["tokens"][i] for got, i in zip(dec["tokens"], multi, strict=True))


def test_failed_transfers_are_load_errors_and_are_recomputed(engines):
    """No prefill engine sends (the receive times out), or one announces fewer blocks than
    the decode engine reserved (the receiver refuses it at once): the connector reports the
    blocks as load errors, vLLM (kv_load_failure_policy "recompute") computes the prompts
    itself: the same tokens, none of them loaded."""
    ref = engines["reference"]
    multi = [i for i, p in enumerate(PROMPTS) if len(p) - 1 > BLOCK]
    started = time.monotonic()
    dec, pre, _ = disaggregated(engines, [PROMPTS[i] for i in multi], ["prefill-a"] * len(multi),
                                tag=SHORT)
    refused = time.monotonic() - started
    assert dec["tokens"] == [ref["tokens"][i] for i in multi]
    assert dec["cached"] == [0] * len(multi)
    assert not pre["prefill-a"][1]["pending"]  # the sender heard the verdict, freed its blocks
    started = time.monotonic()
    dec, _, _ = disaggregated(engines, PROMPTS[1:4], send=False)
    lost = time.monotonic() - started
    assert lost >= TIMEOUT
    assert dec["tokens"] == ref["tokens"][1:4]
    assert dec["cached"] == [0, 0, 0]
    assert dec["free_blocks"] == ref["free_blocks"]
    print(f"\nrefused by the receiver: {refused:.1f} s; no sender: {lost:.1f} s")
