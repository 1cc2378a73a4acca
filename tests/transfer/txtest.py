"""Helpers for transfer tests: a prefill group and a decode receiver on shared engines, and a
hand-driven sender (a real socket speaking the wire protocol) to play a peer that lies."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid

from cpkv.parallel import ParallelRank, ParallelSizes
from cpkv.transfer import KVReceiver, KVSender, KVStatus
from cpkv.transfer.endpoint import identity, model_shape
from cpkv.transfer.link import parse_address
from cpkv.transfer.protocol import FrameCodec, Hello, Message

DONE = (KVStatus.Success, KVStatus.Failed)


def wait_all(objs_and_ids, timeout=30.0):
    """`wait` on each (obj, request_id) in turn (receivers first: a sender's final status is
    the receiver's verdict); return their final statuses."""
    deadline = time.monotonic() + timeout
    statuses = [obj.wait(rid, max(0.0, deadline - time.monotonic()))
                for obj, rid in objs_and_ids]
    if not all(s in DONE for s in statuses):
        raise TimeoutError(f"statuses still {statuses} after {timeout} s")
    return statuses


def stall_first_call(fn, seconds):
    """``fn``, except that its first call sleeps ``seconds`` first (a GC pause, a preempted
    process); returns (that function, an Event set as the stall begins)."""
    stalled = threading.Event()

    def stalling(*args, **kwargs):
        if not stalled.is_set():
            stalled.set()
            time.sleep(seconds)
        return fn(*args, **kwargs)

    return stalling, stalled


class StallOnce:
    """The shared engine, except that the first write submitted through it sleeps first: a
    GC pause or preempted process between the sender's last check and its write."""

    def __init__(self, engine, seconds):
        self._engine = engine
        self.submit, self.stalled = stall_first_call(engine.submit, seconds)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class Group:
    """The senders of one prefill instance over ``src`` (or ``srcs(rank)`` per rank) and a
    receiver into ``dst`` (one process, the rig's engine and arenas). ``sizes`` are the
    prefill instance's (default CP ``cp``), ``rank`` / ``dsizes`` the receiver's; senders
    are listed route by route ((tp, pp) major, CP rank minor). ``expect`` / ``send`` fill in
    the source and the receiver's address."""

    def __init__(self, src, dst, rig, *, cp=2, sizes=None, srcs=None, rank=None, dsizes=None,
                 num_layers=None, policy="all", timeout=10.0, sender_kw=None, **recv_kw):
        engine, send_arena, recv_arena = rig
        self.instance = f"prefill-{uuid.uuid4().hex[:8]}"
        sizes = sizes or ParallelSizes(cp=cp)
        ranks = sorted((r for r in sizes.ranks() if r.dp == 0), key=lambda r: (r.tp, r.pp, r.cp))
        self.senders = [KVSender(srcs(r) if srcs else src, instance=self.instance, rank=r,
                                 sizes=sizes, policy=policy, timeout=timeout, engine=engine,
                                 arena=send_arena, num_layers=num_layers, **(sender_kw or {}))
                        for r in ranks]
        self.recv = KVReceiver(dst, rank=rank, sizes=dsizes, num_layers=num_layers,
                               timeout=timeout, engine=engine, arena=recv_arena, **recv_kw)

    def expect(self, rid, ids, n, **kw):
        self.recv.expect(rid, ids, source=self.instance, num_tokens=n, **kw)

    def send(self, rid, ids, n, senders=None, **kw):
        for s in self.senders if senders is None else senders:
            s.send(rid, ids, to=self.recv.address, num_tokens=n, **kw)

    def wait(self, rid, timeout=30.0):
        return wait_all([(self.recv, rid)] + [(s, rid) for s in self.senders], timeout)

    def close(self):
        for s in self.senders:
            s.close()
        self.recv.close()


_LEN = struct.Struct(">I")


class Rogue:
    """A sender driven by hand over a real connection: every frame is the test's choice."""

    def __init__(self, address, cache, *, instance="rogue", rank=None, sizes=None,
                 secret=None, session="127.0.0.1:1", hello=True):
        self.sock = socket.create_connection(parse_address(address), timeout=10)
        self.codec = FrameCodec("S", secret.encode() if isinstance(secret, str) else secret)
        self._buf = b""
        self.raw(self.codec.hello())
        self.codec.start(self._frame())
        rank, sizes = rank or ParallelRank(), sizes or ParallelSizes()
        self.hello = Hello(**identity(cache, instance, rank, sizes,
                                      model_shape(cache, rank, sizes, "mha", None, None),
                                      uuid.uuid4().hex[:16], session))
        self.welcome = None
        if hello:
            self.send(self.hello)
            self.welcome = self.recv()

    def raw(self, body: bytes) -> None:
        self.sock.sendall(_LEN.pack(len(body)) + body)

    def send(self, msg: Message) -> None:
        self.raw(self.codec.pack(msg))

    def _frame(self) -> bytes:
        while len(self._buf) < 4 or len(self._buf) - 4 < _LEN.unpack_from(self._buf)[0]:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the receiver closed the connection")
            self._buf += data
        (n,) = _LEN.unpack_from(self._buf)
        frame, self._buf = self._buf[4:4 + n], self._buf[4 + n:]
        return frame

    def recv(self, timeout=10.0):
        self.sock.settimeout(timeout)
        return self.codec.unpack(self._frame())

    def close(self):
        self.sock.close()


class Proxy:
    """An on-path attacker between senders and a receiver: forwards every frame of every
    connection, keeps a copy of each (``sessions[k][direction]``, direction "to_receiver" or
    "to_sender") and can `inject` any recorded frame into the latest connection (a replay).
    Senders are pointed at ``address`` instead of the receiver's."""

    def __init__(self, target: str):
        import threading

        self.target = parse_address(target)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.sessions: list[dict] = []
        self._ends: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            ends = {"to_receiver": upstream, "to_sender": client}
            frames = {"to_receiver": [], "to_sender": []}
            with self._lock:
                self.sessions.append(frames)
                self._ends.append(ends)
            for src, direction in ((client, "to_receiver"), (upstream, "to_sender")):
                threading.Thread(target=self._pump, args=(src, direction, ends, frames),
                                 daemon=True).start()

    def _pump(self, src, direction, ends, frames):
        buf = b""
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                for s in ends.values():
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            buf += data
            while len(buf) >= 4 and len(buf) - 4 >= _LEN.unpack_from(buf)[0]:
                n = _LEN.unpack_from(buf)[0]
                frame, buf = buf[:4 + n], buf[4 + n:]
                frames[direction].append(frame)
                self._send(ends[direction], frame)

    def _send(self, sock, frame):
        with self._lock:
            try:
                sock.sendall(frame)
            except OSError:
                pass

    def inject(self, direction: str, frame: bytes) -> None:
        """Send ``frame`` (e.g. a recorded one) into the latest connection, between frames."""
        self._send(self._ends[-1][direction], frame)

    def close(self):
        self.server.close()
        for ends in self._ends:
            for s in ends.values():
                s.close()
