"""One lifecycle for every object that owns a resource (`cpkv._closing.Closing`): ``with``
closes it, and so does garbage collection as a last resort."""

import gc

import pytest
import torch

from cpkv._closing import Closing
from cpkv.integrations.transport import KVTransport
from cpkv.staging import StagingArena
from cpkv.store import KVStore, MasterProcess
from cpkv.transfer import KVReceiver, KVSender, TransferEngine


def test_every_resource_owner_has_the_one_lifecycle():
    for owner in (StagingArena, KVStore, MasterProcess, TransferEngine, KVSender, KVReceiver,
                  KVTransport):
        assert issubclass(owner, Closing), owner.__name__


def test_an_engine_nobody_closed_unregisters_at_collection():
    engine = TransferEngine()
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    engine.register(buf)
    registered = engine._registered
    assert registered
    del engine
    gc.collect()
    assert registered == {}, "a dropped engine kept its registrations"


@pytest.mark.mp
@pytest.mark.slow
def test_with_closes_an_engine_and_a_master():
    with TransferEngine() as engine:
        engine.register(torch.zeros(4096, dtype=torch.uint8))
    assert engine.closed and engine._registered == {}
    with MasterProcess() as master:
        assert master.running
    assert not master.running
