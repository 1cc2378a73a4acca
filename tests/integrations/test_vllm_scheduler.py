"""The scheduler half of the cpkv connector inside vLLM's own v1 Scheduler (loaded through
``KVConnectorFactory`` from ``kv_connector_module_path``): hook order, the blocks a request
loads into or sends from, held and freed blocks, the recomputed last token, load errors."""

import pytest

pytest.importorskip("vllm", reason="vLLM is installed in the vLLM lane only (make test-vllm)")

from vllm.v1.request import RequestStatus  # noqa: E402
from vllm_engines import write_tiny_llama  # noqa: E402
from vllm_harness import (  # noqa: E402
    CallLog,
    free_blocks,
    make_config,
    make_request,
    make_scheduler,
    runner_output,
)

from cpkv.integrations.vllm import CpkvConnector, RecvSpec, SendSpec  # noqa: E402

pytestmark = pytest.mark.slow

BS, BLOCKS = 32, 64
PROMPT = list(range(3, 80))  # 77 tokens: 76 loaded (3 blocks, the last partial), 1 recomputed
TO = ["127.0.0.1:14600", "127.0.0.1:14601"]  # a decode engine's receivers (TP 2)
SOURCE = "prefill-0"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("sched") / "tiny-llama")


def scheduler(model, role, **kw):
    s = make_scheduler(make_config(model, role, block_size=BS, **kw), BLOCKS)
    assert type(s.connector) is CpkvConnector  # loaded by vLLM from the module path
    return s, CallLog(s.connector)


def step(s, **report):
    out = s.schedule()
    s.update_from_output(out, runner_output(s, out, **report))
    return out


def test_decode_loads_all_but_the_last_token_then_computes_it(model):
    s, log = scheduler(model, "kv_consumer")
    idle = free_blocks(s)
    s.add_request(make_request("d1", PROMPT, {"do_remote_prefill": True,
                                              "cpkv_transfer_id": "t-11", "cpkv_source": SOURCE}))
    out = s.schedule()
    assert log.take() == ["get_num_new_matched_tokens", "update_state_after_alloc",
                          "build_connector_meta"]
    req = s.requests["d1"]
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert out.num_scheduled_tokens == {}  # nothing computed while the KV is on its way
    blocks = s.kv_cache_manager.get_block_ids("d1")[0]
    assert out.kv_connector_metadata.recvs == [RecvSpec("d1", "t-11", SOURCE, blocks[:3], 76)]
    s.update_from_output(out, runner_output(s, out))
    # steps while the transfer runs: no load planned twice, the request waits
    out = step(s)
    assert out.kv_connector_metadata.recvs == [] and out.num_scheduled_tokens == {}
    log.take()
    # the worker reports the request received: it joins the batch with one token to compute
    out = s.schedule()
    s.update_from_output(out, runner_output(s, out, finished_recving={"d1"}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"d1": 1}
    assert s.requests["d1"].num_computed_tokens == 77
    s.update_from_output(out, runner_output(s, out))
    while "d1" in s.requests:
        step(s)
    assert "request_finished" in log.take()
    assert free_blocks(s) == idle


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_failed_load_is_recomputed_or_fails_the_request(model, policy):
    s, _ = scheduler(model, "kv_consumer", policy=policy)
    idle = free_blocks(s)
    s.add_request(make_request("d2", PROMPT, {"do_remote_prefill": True,
                                              "cpkv_transfer_id": 12, "cpkv_source": SOURCE}))
    out = s.schedule()
    blocks = out.kv_connector_metadata.recvs[0].block_ids
    s.update_from_output(out, runner_output(s, out))
    # the worker's verdict: finished receiving, every block a load error
    out = s.schedule()
    outputs = s.update_from_output(out, runner_output(s, out, finished_recving={"d2"},
                                                      invalid_block_ids=set(blocks)))
    if policy == "recompute":
        out = s.schedule()
        assert out.num_scheduled_tokens == {"d2": 77}  # the whole prompt, computed here
        assert out.kv_connector_metadata.recvs == []  # and never loaded again
        s.update_from_output(out, runner_output(s, out))
        while "d2" in s.requests:
            step(s)
    else:  # vLLM's default: the request ends with an error, nothing decoded
        ended = [(o.request_id, o.finish_reason.name) for eo in outputs.values()
                 for o in eo.outputs]
        assert ended == [("d2", "ERROR")] and "d2" not in s.requests
    assert free_blocks(s) == idle


def test_prefill_sends_when_its_last_chunk_runs_and_holds_its_blocks(model):
    """Chunked prefill (32 tokens a step): one send, in the step whose forward writes the last
    prompt token, of every block the request got across its chunks; the blocks stay held
    after the request finishes until the worker reports the send finished."""
    s, log = scheduler(model, "kv_producer", batched_tokens=32)
    idle = free_blocks(s)
    s.add_request(make_request("p1", PROMPT, {"do_remote_decode": True, "cpkv_transfer_id": 21,
                                              "cpkv_to": TO}, max_tokens=1))
    sends, calls = [], []
    for _ in range(3):
        out = step(s)
        sends.append(out.kv_connector_metadata.sends)
        calls.append(log.take())
    assert sends[:2] == [[], []]
    assert sends[2] == [SendSpec("p1", 21, TO, s.kv_cache_manager.get_block_ids("p1")[0], 76)]
    assert len(sends[2][0].block_ids) == 3
    assert calls == [["get_num_new_matched_tokens", "update_state_after_alloc",
                      "build_connector_meta"], ["build_connector_meta"],
                     ["build_connector_meta", "request_finished"]]
    assert "p1" in s.requests and s.requests["p1"].is_finished()
    assert free_blocks(s) == idle - 3  # held for the transfer
    assert s.has_requests() and s.connector.has_pending_push_work()
    step(s)  # the transfer still running: still held
    assert free_blocks(s) == idle - 3
    step(s, finished_sending={"p1"})
    assert free_blocks(s) == idle
    assert not s.connector.has_pending_push_work() and not s.has_requests()


def test_requests_without_params_and_bad_params_are_plain(model):
    s, _ = scheduler(model, "kv_consumer")
    idle = free_blocks(s)
    bad = {"no-id": {"do_remote_prefill": True, "cpkv_source": SOURCE},
           "negative-id": {"do_remote_prefill": True, "cpkv_transfer_id": -1,
                           "cpkv_source": SOURCE},
           "bool-id": {"do_remote_prefill": True, "cpkv_transfer_id": True,
                       "cpkv_source": SOURCE},
           "no-source": {"do_remote_prefill": True, "cpkv_transfer_id": 5}}
    for rid, params in [("plain", None), *bad.items(),
                        ("one-token", {"do_remote_prefill": True, "cpkv_transfer_id": 5,
                                       "cpkv_source": SOURCE})]:
        prompt = [9] if rid == "one-token" else PROMPT
        s.add_request(make_request(rid, prompt, params, max_tokens=2))
    out = s.schedule()
    assert out.kv_connector_metadata.recvs == []
    assert out.num_scheduled_tokens == {"plain": 77, **dict.fromkeys(bad, 77), "one-token": 1}
    s.update_from_output(out, runner_output(s, out))
    while s.requests:
        step(s)
    assert free_blocks(s) == idle


def test_a_prefill_with_bad_receivers_sends_nothing(model):
    s, _ = scheduler(model, "kv_producer")
    idle = free_blocks(s)
    for i, to in enumerate([None, [], "no-port", ["127.0.0.1:14600", "host:0"], [5]]):
        s.add_request(make_request(f"p{i}", PROMPT, {"do_remote_decode": True,
                                                     "cpkv_transfer_id": i, "cpkv_to": to},
                                   max_tokens=1))
    out = step(s)
    assert out.kv_connector_metadata.sends == [] and len(out.num_scheduled_tokens) == 5
    while s.requests:
        step(s)
    assert free_blocks(s) == idle and not s.connector.has_pending_push_work()


def test_a_local_prefix_hit_loads_only_the_rest(model):
    """Decode with prefix caching: a request whose first two blocks are cached here (an
    earlier request computed them) loads only the tokens after them, into the blocks after
    the shared ones, which the transfer never writes."""
    s, _ = scheduler(model, "kv_consumer", prefix_caching=True)
    idle = free_blocks(s)
    s.add_request(make_request("warm", PROMPT, None, max_tokens=1, block_size=BS))
    while s.requests:
        step(s)
    prompt = PROMPT[:2 * BS] + list(range(300, 321))  # 85 tokens: 64 cached, 20 loaded
    s.add_request(make_request("d4", prompt, {"do_remote_prefill": True, "cpkv_transfer_id": 4,
                                              "cpkv_source": SOURCE}, block_size=BS))
    out = s.schedule()
    blocks = s.kv_cache_manager.get_block_ids("d4")[0]
    assert out.kv_connector_metadata.recvs == [RecvSpec("d4", 4, SOURCE, blocks[:3], 84,
                                                        prefix=2 * BS)]
    assert s.requests["d4"].num_computed_tokens == 84  # the hit and the load
    s.update_from_output(out, runner_output(s, out))
    out = s.schedule()
    s.update_from_output(out, runner_output(s, out, finished_recving={"d4"}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"d4": 1}
    s.update_from_output(out, runner_output(s, out))
    while s.requests:
        step(s)
    assert free_blocks(s) == idle


def test_a_prefill_aborted_before_its_last_chunk_sends_nothing(model):
    s, _ = scheduler(model, "kv_producer", batched_tokens=32)
    idle = free_blocks(s)
    s.add_request(make_request("p2", PROMPT, {"do_remote_decode": True, "cpkv_transfer_id": 22,
                                              "cpkv_to": TO[0]}, max_tokens=1))
    out = step(s)
    assert out.kv_connector_metadata.sends == []
    s.finish_requests("p2", RequestStatus.FINISHED_ABORTED)
    out = step(s)
    assert out.kv_connector_metadata.sends == []
    assert free_blocks(s) == idle and not s.connector.has_pending_push_work()
