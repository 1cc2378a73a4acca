"""Connections between transfer agents: one I/O thread per agent, any number of peers.

A `Hub` owns a selector loop on its own thread: it accepts connections (a receiver) or opens
them (a sender), exchanges the nonces, reads length-prefixed frames, checks and parses them
(`protocol.FrameCodec`) and hands each message to the agent's ``on_message`` on that thread.
Sending is thread-safe and writes straight to the socket when nothing is queued (no hand-off to
the I/O thread on the fast path). Threads stay at one per agent whatever the number of peers;
sockets at one per connected peer (senders close idle ones).

A connection that ends is reported once through ``on_close(link, reason, by_peer)``: ``by_peer``
is True only when the peer closed it or its process died (end of stream, reset), i.e. when the
peer can no longer act on this connection; a connection this side dropped (a protocol
violation, a failed check, `close`) reports False.
"""

from __future__ import annotations

import collections
import errno
import itertools
import selectors
import socket
import struct
import threading
import time

from .protocol import MAX_FRAME, FrameCodec, Message, ProtocolError

__all__ = ["Hub", "Link", "parse_address"]

_LEN = struct.Struct(">I")
_READ = 1 << 16


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" (IPv6 hosts in brackets) -> (host, port); ValueError if malformed."""
    if not isinstance(address, str):
        raise TypeError(f"address: expected 'host:port', got {type(address).__name__}")
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: expected 'host:port', got {address!r}")
    return host, int(port)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # a dead peer host is noticed in ~16 s, not hours
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Link:
    """One connection. ``peer`` is the agent's to fill (who is on the other end)."""

    _ids = itertools.count()

    def __init__(self, hub: Hub, sock: socket.socket, side: str, address: str):
        self.hub, self.sock, self.address = hub, sock, address
        self.id = next(self._ids)
        self.codec = FrameCodec(side, hub.secret)
        self.peer = None
        self.open = True  # until on_close
        self.closing = False  # this side decided to drop it
        self.ready = False  # nonces exchanged: messages may flow
        self.connecting = False
        self._in = bytearray()
        self._out: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def send(self, msg: Message) -> bool:
        """Queue one message (any thread); False if the connection is already gone."""
        return self.hub.send(self, msg)

    def close(self, reason: str) -> None:
        self.hub.close_link(self, reason)

    def __repr__(self) -> str:
        return f"Link({self.address}, #{self.id}{'' if self.open else ', closed'})"


class Hub:
    """The I/O thread of one agent (see the module doc).

    Args:
        name: thread name.
        secret: the shared secret (bytes) or None.
        on_open(link): nonces exchanged; the link may carry messages.
        on_message(link, msg): one checked message, on the I/O thread (keep it short).
        on_close(link, reason, by_peer): the connection ended (once per link).
        listen: (host, port) to accept connections on (port 0: a free one), or None.
    """

    def __init__(self, name: str, *, secret: bytes | None, on_open, on_message, on_close,
                 listen: tuple[str, int] | None = None):
        self.secret = secret
        self._on_open, self._on_message, self._on_close = on_open, on_message, on_close
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: collections.deque = collections.deque()  # calls for the I/O thread
        self._links: set[Link] = set()
        self._stop = False
        self._server = None
        try:
            if listen is not None:
                host, port = listen
                family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM)[0]
                self._server = socket.socket(family, kind, proto)
                self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._server.bind(addr)
                self._server.listen(1024)
                self._server.setblocking(False)
                self._sel.register(self._server, selectors.EVENT_READ, "accept")
                bound = self._server.getsockname()
                shown = f"[{host}]" if ":" in host else host
                self.address = f"{shown}:{bound[1]}"
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------------

    def connect(self, address: str) -> Link:
        """Open a connection (non-blocking); ``on_open`` follows, or ``on_close`` if it fails."""
        host, port = parse_address(address)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        link = Link(self, sock, "S", address)
        link.connecting = True
        self._call(lambda: self._start_connect(link, (host, port)))
        return link

    def send(self, link: Link, msg: Message) -> bool:
        with link._lock:
            if not link.open:
                return False
            if not link.ready:  # the session key needs both nonces: wait for on_open
                raise RuntimeError(f"{link}: a message sent before the connection opened")
            body = link.codec.pack(msg)
            frame = _LEN.pack(len(body)) + body
            if link._out:
                link._out.append(frame)
                self._call(lambda: self._want_write(link))
                return True
            try:
                sent = link.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                reason = f"send failed: {e}"
                self._call(lambda: self._drop(link, reason, by_peer=True))
                return True  # the close reports it
            if sent < len(frame):
                link._out.append(memoryview(frame)[sent:])
                self._call(lambda: self._want_write(link))
        return True

    def close_link(self, link: Link, reason: str) -> None:
        """Drop a connection (after the message being handled, if called from a handler: no
        later frame of it is handed on)."""
        link.closing = True
        self._call(lambda: self._drop(link, reason, by_peer=False))

    def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) until every queued frame is on the wire."""
        deadline = time.monotonic() + timeout
        while any(lk._out for lk in self.links()) and time.monotonic() < deadline:
            time.sleep(0.001)

    def links(self) -> list[Link]:
        return [lk for lk in list(self._links) if lk.open]

    def close(self) -> None:
        """Close every connection (each reported through on_close) and stop the thread."""
        if self._stop:
            return

        def stop():
            for link in list(self._links):
                self._drop(link, "this agent closed", by_peer=False)
            self._stop = True
        self._call(stop)
        self._thread.join(timeout=10)
        self._close_sockets()

    # -- the I/O thread ---------------------------------------------------------------------

    def _call(self, fn) -> None:
        self._pending.append(fn)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, InterruptedError):
            pass  # already awake
        except OSError:
            pass  # closed: the hub is gone

    def _run(self) -> None:
        while not self._stop:
            for key, events in self._sel.select(timeout=1.0):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                elif key.data == "accept":
                    self._accept()
                else:
                    link = key.data
                    if events & selectors.EVENT_WRITE:
                        self._writable(link)
                    if events & selectors.EVENT_READ and link.open:
                        self._readable(link)
            while self._pending:
                self._pending.popleft()()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. too many open files: the peer retries
            sock.setblocking(False)
            _tune(sock)
            link = Link(self, sock, "R", f"{addr[0]}:{addr[1]}")
            self._links.add(link)
            self._sel.register(sock, selectors.EVENT_READ, link)
            self._raw_send(link, link.codec.hello())

    def _start_connect(self, link: Link, addr) -> None:
        self._links.add(link)
        link.sock.setblocking(False)
        try:
            _tune(link.sock)
            link.sock.connect(addr)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._drop(link, f"cannot connect to {link.address}: {e}", by_peer=False)
            return
        self._sel.register(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _raw_send(self, link: Link, body: bytes) -> None:
        """A plain frame (the nonce), queued first."""
        with link._lock:
            link._out.appendleft(_LEN.pack(len(body)) + body)
        self._want_write(link)

    def _want_write(self, link: Link) -> None:
        if link.open and (link._out or link.connecting):
            try:
                self._sel.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
            except (KeyError, ValueError, OSError):
                pass  # not registered yet (still connecting) or closed

    def _writable(self, link: Link) -> None:
        if link.connecting:
            err = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                why = errno.errorcode.get(err, err)
                self._drop(link, f"cannot connect to {link.address}: {why}", by_peer=False)
                return
            link.connecting = False
            self._raw_send(link, link.codec.hello())
        with link._lock:
            while link._out:
                chunk = link._out[0]
                try:
                    sent = link.sock.send(chunk)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    error = e
                    break
                if sent < len(chunk):
                    link._out[0] = memoryview(chunk)[sent:]
                    return
                link._out.popleft()
            else:
                error = None
                try:
                    self._sel.modify(link.sock, selectors.EVENT_READ, link)
                except (KeyError, ValueError, OSError):
                    pass
        if error is not None:
            self._drop(link, f"send failed: {error}", by_peer=True)

    def _readable(self, link: Link) -> None:
        try:
            data = link.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # a reset: the peer's process is gone
            self._drop(link, f"connection to {link.address} lost: {e}", by_peer=True)
            return
        if not data:
            self._drop(link, f"{link.address} closed the connection", by_peer=True)
            return
        buf = link._in
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ProtocolError(f"a frame of {size} bytes (limit {MAX_FRAME})")
                if len(buf) - pos - 4 < size:
                    break
                payload = bytes(buf[pos + 4:pos + 4 + size])
                pos += 4 + size
                if not link.codec.started:
                    link.codec.start(payload)
                    with link._lock:
                        link.ready = True
                    self._want_write(link)  # messages queued before the nonces
                    self._on_open(link)
                else:
                    self._on_message(link, link.codec.unpack(payload))
                if not link.open or link.closing:
                    return
        except ProtocolError as e:
            self._drop(link, f"protocol error from {link.address}: {e}", by_peer=False)
            return
        del buf[:pos]

    def _drop(self, link: Link, reason: str, *, by_peer: bool) -> None:
        with link._lock:
            if not link.open:
                return
            link.open = False
            link._out.clear()
        self._links.discard(link)
        try:
            self._sel.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        try:  # read what is left first: closing on unread bytes resets the connection
            while link.sock.recv(_READ):  # and the peer would lose our last frames
                pass
        except OSError:
            pass
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        link.sock.close()
        self._on_close(link, reason, by_peer)

    def _close_sockets(self) -> None:
        try:
            self._sel.close()
        except Exception:
            pass
        for s in (self._server, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
