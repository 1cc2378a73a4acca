"""The control plane: registrations, request destinations and notifications over a TCPStore.

Built on torch.distributed's ``TCPStore`` (a key-value server; ``compare_set`` and ``append``
make claims and notification streams atomic). Keys live under a namespace per decode receiver;
every key of a request carries the receiver's incarnation and the request's *use* (one
``expect``), so nothing meant for an earlier life of the receiver or an earlier use of a request
id is ever read:

    {ns}/recv                            receiver: incarnation, engine session, geometry, options
    {ns}/reg/{sender}                    each prefill sender (dp{d}.cp{c}.tp{t}.pp{p}): its
                                         incarnation, engine session, geometry
    {ns}/reg/{sender}/owner              the incarnation that holds the sender id (compare_set)
    {ns}/reg/{sender}/beat               a counter the owner bumps while it lives
    {ns}/{inc}/dest/{rid}                receiver: where request rid's bytes go, and its use
    {ns}/{inc}/use/{u}/note/{sender}     the sender's notification stream (appended lines:
                                         segments landed, then an end line: failed or ack)
    {ns}/{inc}/use/{u}/verdict           the receiver's final status and reason

A request's keys are deleted when it ends on both sides (the receiver deletes them once every
sender has acknowledged its verdict, or after a grace period); a sender deletes its
registration when it closes.

**Trust.** Without a secret, anyone who can reach the store can read and write every key. With a
shared secret (``secret=`` or the ``CPKV_SECRET`` environment variable, the same on every
process), every value is ``hex(HMAC-SHA256(secret, key, line index, payload)) + " " + payload``
and is checked before it is acted on; a value moved under another key, or a notification line
replayed at another position, fails its check. The liveness counter and the sender-id claim
are not authenticated (a forged one can only make a registration wait or be refused).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import hmac
import json
import os
import socket
import time

import torch.distributed as dist

from ..layout import PackedFormat

__all__ = ["ControlError", "ControlPlane", "ControlTimeout"]

SECRET_ENV = "CPKV_SECRET"
_ABSENT = "\x00cpkv-absent"  # compare_set with this as expected and desired reads without writing
_ABSENT_BYTES = _ABSENT.encode()


class ControlTimeout(TimeoutError):
    """A control-plane key did not appear in time (the peer is missing or dead)."""


class ControlError(ValueError):
    """A control-plane value that cannot be trusted or read: malformed, or failing its MAC."""


def _listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket bound to ``host`` only (TCPStore alone listens on every interface)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class ControlPlane:
    """A client (or the server, with ``serve=True``) of the control-plane store.

    Args:
        host, port: the store's address. With ``serve=True`` the store listens on ``host``
            only (not on every interface); ``port=0`` picks a free port, read it from ``.port``.
        serve: host the store in this process.
        namespace: key prefix, one per decode receiver.
        timeout: seconds for connecting and for blocking reads.
        secret: shared secret (str or bytes) authenticating every value; default the
            ``CPKV_SECRET`` environment variable; None or empty: no authentication.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, serve: bool = False,
                 namespace: str = "cpkv", timeout: float = 30.0,
                 secret: str | bytes | None = None):
        if not isinstance(host, str) or not host:
            raise TypeError(f"host: expected a non-empty str, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise ValueError(f"port: expected an int in [0, 65536), got {port!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        secret = os.environ.get(SECRET_ENV) if secret is None else secret
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise TypeError(f"secret: expected str or bytes, got {type(secret).__name__}")
        self._secret = (secret.encode() if isinstance(secret, str) else secret) or None
        self.host, self.namespace, self.timeout = host, namespace, timeout
        listen = _listen_socket(host, port) if serve else None
        try:
            if listen is not None:
                port = listen.getsockname()[1]
            self.store = dist.TCPStore(
                host, port, is_master=serve, wait_for_workers=False,
                timeout=datetime.timedelta(seconds=timeout), use_libuv=True,
                master_listen_fd=listen.fileno() if listen is not None else None)
        except BaseException:
            if listen is not None:
                listen.close()
            raise
        if listen is not None:
            listen.detach()  # the store owns the descriptor now and closes it with itself
        self.port = self.store.port

    @property
    def authenticated(self) -> bool:
        return self._secret is not None

    def scoped(self, namespace: str) -> ControlPlane:
        """The same connection under another namespace (another receiver, another test).

        Reuse connections: TCPStore clients serialise their operations, and opening one now
        and then stalls ~5 s in its connect retry (seen with torch 2.13 on loopback)."""
        view = copy.copy(self)
        view.namespace = namespace
        return view

    def key(self, *parts) -> str:
        return "/".join([self.namespace, *map(str, parts)])

    # -- values ----------------------------------------------------------------------------

    def _mac(self, key: str, index: int, payload: str) -> str:
        msg = f"{key}\n{index}\n{payload}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def encode(self, key: str, value, index: int = -1) -> str:
        payload = json.dumps(value, separators=(",", ":"))
        return payload if self._secret is None else f"{self._mac(key, index, payload)} {payload}"

    def decode(self, key: str, raw: bytes | str, index: int = -1):
        """Check (with a secret) and parse one value; ControlError on anything wrong."""
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            if self._secret is not None:
                mac, _, text = text.partition(" ")
                if not hmac.compare_digest(mac, self._mac(key, index, text)):
                    raise ControlError(f"{key!r}: message authentication failed")
            return json.loads(text)
        except ControlError:
            raise
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise ControlError(f"{key!r}: unreadable value ({type(e).__name__}: "
                               f"{str(e)[:80]})") from None

    def put(self, key: str, value) -> None:
        self.store.set(key, self.encode(key, value))

    def append(self, key: str, value, index: int) -> None:
        """Append one line to a stream (``index``: the line's position, authenticated)."""
        self.store.append(key, self.encode(key, value, index) + "\n")

    def read(self, key: str) -> bytes | None:
        """The raw value, or None if the key does not exist; never blocks (``get`` waits for a
        missing key, and a key can be deleted between ``check`` and ``get``)."""
        raw = self.store.compare_set(key, _ABSENT, _ABSENT)
        return None if raw == _ABSENT_BYTES else raw

    def lines(self, key: str, start: int = 0) -> list:
        """The stream's lines from ``start`` on, checked and parsed (non-blocking; [] if none)."""
        raw = self.read(key)
        if raw is None:
            return []
        raw = raw.decode("utf-8", errors="replace").split("\n")
        complete = raw[:-1]  # an append is atomic; the last piece is always the empty tail
        return [self.decode(key, line, i) for i, line in enumerate(complete) if i >= start]

    def exists(self, key: str) -> bool:
        """Non-blocking."""
        return bool(self.store.check([key]))

    def get(self, key: str):
        """Non-blocking read of a key that exists."""
        return self.decode(key, self.store.get(key))

    def get_or_none(self, key: str):
        """Non-blocking read: the checked value, or None if the key does not exist."""
        raw = self.read(key)
        return None if raw is None else self.decode(key, raw)

    def delete(self, *keys: str) -> None:
        for k in keys:
            self.store.delete_key(k)

    def num_keys(self) -> int:
        """Keys in the whole store (every namespace)."""
        return int(self.store.num_keys())

    def wait_get(self, key: str, timeout: float | None = None, *, cancelled=None):
        """Block until ``key`` exists (polling, so ``cancelled()`` can stop it), then read it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.0005
        while (raw := self.read(key)) is None:
            if cancelled is not None and cancelled():
                raise ControlTimeout(f"gave up waiting for {key!r}")
            if time.monotonic() >= deadline:
                raise ControlTimeout(f"{key!r} did not appear within "
                                     f"{self.timeout if timeout is None else timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.decode(key, raw)


def geometry(cache) -> dict:
    """A pool's geometry as exchanged. ``format`` is the slot description both sides must share
    (`PackedFormat.to_dict` of one token, head and layer: format version and each component's
    name, head_dim and dtype); ``page_size`` must match too; the local head and layer counts
    (which the routes must fit) and the layout (NHD/HND, for direct writes) are informative."""
    unit = cache.packed_format(1, layers=(0, 1), heads=(0, 1))
    return {"format": unit.to_dict(), "page_size": cache.page_size,
            "num_heads": cache.num_heads, "num_layers": cache.num_layers,
            "layout": cache.layout}


def check_geometry(mine: dict, theirs: dict, who: str) -> None:
    """Raise ValueError naming the first shared field where ``theirs`` differs from ``mine``:
    format version, page size, then the components (`PackedFormat.check_matches` over the two
    formats). A malformed geometry is refused the same way."""
    if not isinstance(theirs, dict):
        raise ControlError(f"{who}: expected a geometry dict, got {type(theirs).__name__}")
    try:
        for field, here, there in (("version", mine["format"]["version"],
                                    theirs["format"]["version"]),
                                   ("page_size", mine["page_size"], theirs["page_size"])):
            if here != there:
                raise ValueError(f"{field} is {here} here, {there} there")
        try:
            PackedFormat.from_dict(theirs["format"]).check_matches(
                PackedFormat.from_dict(mine["format"]))
        except ValueError as e:
            raise ValueError(f"components: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"geometry mismatch with {who}: {e}") from None
