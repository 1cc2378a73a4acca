"""The runner-shaped example runs as part of the suite: 2 CP ranks, spawned once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import runner_prefill  # noqa: E402

pytestmark = [pytest.mark.mp, pytest.mark.slow]


@pytest.fixture(scope="module")
def outcome():
    return runner_prefill.launch(world=2, timeout=180)


@pytest.mark.parametrize("pool", runner_prefill.POOLS)
def test_cp_prefill_then_decode_equals_unsplit_attention(outcome, pool):
    for rank, out in enumerate(outcome):
        assert "setup" not in out, f"rank {rank}: {out['setup']}"
        assert out[pool] == "ok", f"rank {rank}, {pool} pool: {out[pool]}"
