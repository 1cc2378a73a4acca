"""Real processes: 2 CP prefill ranks -> 1 decode rank, Mooncake over TCP loopback; the
decode rank's receiver address reaches the prefill ranks through the group's folder. Ranks are
spawned once per group."""

import pytest
from mp import spawn_group
from tx_worker import CP, fault_rank, hetero_rank, main_rank, scenarios

pytestmark = [pytest.mark.mp, pytest.mark.slow]


@pytest.fixture(scope="module")
def main_results():
    return spawn_group(main_rank, CP + 1, timeout=240)


@pytest.fixture(scope="module")
def fault_results():
    return spawn_group(fault_rank, CP + 1, timeout=120)


def check(results, name, ranks):
    for r in ranks:
        res = results[r]
        assert name in res, f"rank {r} did not run {name!r} ({res.get('rank-setup', '')})"
        assert res[name] == "ok", f"rank {r}, {name}: {res[name]}"


@pytest.mark.parametrize("name", [s["name"] for s in scenarios()])
def test_prefill_group_to_decode_bit_exact(main_results, name):
    check(main_results, name, range(CP + 1))


def test_sender_killed_receiver_fails_within_timeout(fault_results):
    check(fault_results, "sender-dies", [0, 2])


def test_receiver_killed_sender_fails_within_timeout(fault_results):
    check(fault_results, "receiver-dies", [0])


@pytest.fixture(scope="module")
def hetero_results():
    return spawn_group(hetero_rank, 5, timeout=240)


@pytest.mark.parametrize("mode", ["packed", "direct"])
def test_tp2_cp2_prefill_to_tp1_decode_real_processes(hetero_results, mode):
    check(hetero_results, f"hetero-{mode}", range(5))
