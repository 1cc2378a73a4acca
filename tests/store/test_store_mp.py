"""The store tier across real processes: a CP prefill group of two writers and a reader of
another page size, each with its own Mooncake Store client, one `mooncake_master` on loopback."""

import pytest
from mp import assert_ok, spawn_group
from store_worker import rank_main

from cpkv.store import MasterProcess

pytestmark = [pytest.mark.mp, pytest.mark.slow]

NAMES = ["cp-writers-reader-mha", "cp-writers-reader-mla", "match-agreement", "closed"]


@pytest.fixture(scope="module")
def results():
    with MasterProcess() as master:
        yield spawn_group(rank_main, 3, master.address, timeout=240)


@pytest.mark.parametrize("name", NAMES)
def test_rank_reports(results, name):
    assert_ok(results, name)
