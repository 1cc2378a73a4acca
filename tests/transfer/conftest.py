import pytest

from cpkv.staging import StagingArena
from cpkv.transfer import TransferEngine


@pytest.fixture(scope="module")
def rig():
    """One Mooncake engine and two arenas (prefill side, decode side) per module, as in a
    deployment: a second engine in a process costs ~1 s to start."""
    engine = TransferEngine("127.0.0.1")
    send_arena, recv_arena = StagingArena(8 << 20), StagingArena(8 << 20)
    engine.register_arena(send_arena)
    engine.register_arena(recv_arena)
    yield engine, send_arena, recv_arena
    send_arena.close()
    recv_arena.close()
    engine.close()
