"""The wire contract between a prefill rank's sender and a decode rank's receiver: the one
description of it (sender and receiver import it; neither builds a message or an offset by hand).

**Connections.** A receiver listens on its ``address`` ("host:port"). A sender opens one TCP
connection to each receiver it ships to (on first use, reused, closed when idle): one connection
per peer pair, whatever the number of requests. Both ends first send a plain `Nonce` frame; every
later frame is ``len (4 bytes, big endian) | [mac (32 bytes)] | json``, where, with a shared
secret, ``mac = HMAC-SHA256(key, direction | seq | json)``, ``key = HMAC-SHA256(secret,
"cpkv-session" | sender nonce | receiver nonce)``, ``direction`` is ``b"S"`` (sender to receiver)
or ``b"R"`` and ``seq`` counts the frames of that direction (8 bytes). A frame moved to another
connection, replayed, dropped or reordered fails its check, so every value is fresh for the
connection it arrives on: authenticated *and* bound to this session. Without a secret nothing is
authenticated (the network is trusted) and the frames carry no mac.

**Messages** (`Message` subclasses, a ``"t"`` tag each), in the order of a request's life::

    sender -> receiver  Hello        who I am: instance, rank, sizes, model, geometry, engine
    receiver -> sender  Welcome      who I am (the same), pool addresses for direct writes,
                                     the integrity check asked for; or Refused(reason) and close
    sender -> receiver  Announce     I have request rid for you (num_tokens, num_pages)
    receiver -> sender  Destination  rid's use, where the route's bytes go in my staging slot
                                     (addr, region), the route itself; page ids for direct mode
    sender -> receiver  Note         one segment landed: share pages/tokens, route-local layers,
                                     bytes, mode, checksum/digest, last?, metadata
    receiver -> sender  Verdict      rid's use ended: Success or Failed with a reason (also the
                                     answer to an Announce of a request that already ended)
    sender -> receiver  End          I write nothing more for this use (ack of the verdict, or
                                     my own failure with its reason)

A *use* is one `expect` of one receiver incarnation: every Destination, Note, Verdict and End
names it, and each side drops what is not for the use it serves.

**Where a segment lives in a slot.** A request's slot holds one *region* per route (`SlotPlan`),
one row per token the receiving rank takes from that route (every token past the prefix; with
decode context parallelism, the rank's share of them: `cpkv.parallel.DcpLayout`). A sender's
token range fills consecutive rows of its route's region (`segment_rows`): the destination's
local order for a prefill pool, or one block per source rank for a DCP-sharded source. Its
route-local layers ``[l0, l1)`` of those rows are one contiguous span, layer-major inside
(`SlotPlan.segment`), so CP shares and source ranks tile a region without coordination.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import os
import struct
import types
import typing
from dataclasses import dataclass

from .._checks import is_int
from ..layout import PackedFormat
from ..parallel import DcpLayout, DcpSelection, ParallelRank, ParallelSizes, dcp_select

__all__ = ["Announce", "Destination", "End", "FrameCodec", "Hello", "MAX_FRAME", "Message",
           "ModelSpec", "Nonce", "Note", "PROTOCOL_VERSION", "ProtocolError", "Refused",
           "RouteSpec", "SlotPlan", "Verdict", "Welcome", "check_request_id", "decode",
           "encode", "region_rows", "segment_rows"]

PROTOCOL_VERSION = 2
MAX_FRAME = 64 << 20  # a direct-mode Destination lists every page id of a request
NONCE_BYTES = 16
MAC_BYTES = 32
U64 = 1 << 64
MAX_RID_CHARS = 256


class ProtocolError(ValueError):
    """A frame or message that cannot be trusted or read: malformed, failing its MAC, out of
    order, or not what the protocol allows at this point."""


def check_request_id(rid, what: str = "request_id"):
    """A request id: a non-negative int (< 2**63) or a non-empty str of at most 256 chars
    (runners use strings such as ``"cmpl-...-0"``). Returns it; ValueError/TypeError if not."""
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise TypeError(f"{what}: expected an int or a str, got {type(rid).__name__}")
    if isinstance(rid, int) and not 0 <= rid < 1 << 63:
        raise ValueError(f"{what}: expected a non-negative int below 2**63, got {rid}")
    if isinstance(rid, str) and not 0 < len(rid) <= MAX_RID_CHARS:
        raise ValueError(f"{what}: expected 1 to {MAX_RID_CHARS} characters, got {len(rid)}")
    return rid


# -- value codecs: strict, refusing anything to_wire could not have written ----------------------

RequestId = typing.Union[int, str]  # noqa: UP007 - a runtime alias the codec dispatches on


def _check(value, hint, what: str):
    """Check a decoded JSON value against a type hint; return the Python value."""
    origin = typing.get_origin(hint)
    if hint is RequestId:
        try:
            return check_request_id(value, what)
        except (TypeError, ValueError) as e:
            raise ProtocolError(str(e)) from None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], what)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{what}: expected a bool, got {_show(value)}")
        return value
    if hint is int:
        if not is_int(value) or not 0 <= value < U64:
            raise ProtocolError(f"{what}: expected an int in [0, 2**64), got {_show(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{what}: expected a str, got {_show(value)}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list) or len(value) != len(args):
            raise ProtocolError(f"{what}: expected {len(args)} values, got {_show(value)}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_check(v, a, f"{what}[{i}]") for i, (v, a) in pairs)
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ProtocolError(f"{what}: expected a list, got {_show(value)}")
        return [_check(v, arg, f"{what}[]") for v in value]
    if hint in (ParallelRank, ParallelSizes):
        if not isinstance(value, list) or len(value) != 4:
            raise ProtocolError(f"{what}: expected [dp, cp, tp, pp], got {_show(value)}")
        try:
            return hint(*(_check(v, int, what) for v in value))
        except ValueError as e:
            raise ProtocolError(f"{what}: {e}") from None
    if hint is PackedFormat:
        try:
            return PackedFormat.from_dict(value)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{what}: {e}") from None
    if dataclasses.is_dataclass(hint):
        return _from_fields(hint, value, what)
    if hint is dict:  # opaque JSON object (direct-mode pool addresses)
        if not isinstance(value, (dict, list)):
            raise ProtocolError(f"{what}: expected an object, got {_show(value)}")
        return value
    raise TypeError(f"no wire codec for {hint!r}")  # pragma: no cover - a programming error


def _dump(value):
    if isinstance(value, (ParallelRank, ParallelSizes)):
        return [value.dp, value.cp, value.tp, value.pp]
    if isinstance(value, PackedFormat):
        return value.to_dict()
    if isinstance(value, range):
        return [value.start, value.stop]
    if dataclasses.is_dataclass(value):
        return {n: _dump(getattr(value, n)) for n in _names_of(type(value))}
    if isinstance(value, (tuple, list)):
        return [_dump(v) for v in value]
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.cache
def _names_of(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _fields_of(cls) -> tuple[dict, tuple[str, ...]]:
    """A message class's field types and names (resolving the hints costs more than parsing
    a message: once per class)."""
    return typing.get_type_hints(cls), _names_of(cls)


def _from_fields(cls, data, what: str):
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected an object, got {_show(data)}")
    hints, names = _fields_of(cls)
    extra, missing = set(data) - set(names) - {"t"}, set(names) - set(data)
    if extra or missing:
        raise ProtocolError(f"{what}: fields {sorted(missing)} missing, {sorted(extra)} "
                            f"unknown")
    values = {n: _check(data[n], hints[n], f"{what}.{n}") for n in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # __post_init__ checks
        raise ProtocolError(f"{what}: {e}") from None


# -- messages -------------------------------------------------------------------------------------

_TAGS: dict[str, type] = {}


class Message:
    """A protocol message: a frozen dataclass with a wire tag (``TAG``)."""

    TAG = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _TAGS[cls.TAG] = cls

    def to_wire(self) -> dict:
        return {"t": self.TAG, **_dump(self)}

    @classmethod
    def from_wire(cls, data) -> Message:
        """Parse one message, refusing anything `to_wire` could not have written."""
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            raise ProtocolError(f"expected a tagged message, got {_show(data)}")
        kind = _TAGS.get(data["t"])
        if kind is None or (cls is not Message and kind is not cls):
            raise ProtocolError(f"unexpected message type {data['t'][:20]!r}")
        return _from_fields(kind, data, kind.__name__)


@dataclass(frozen=True)
class ModelSpec:
    """The whole model as rank mapping needs it (the pool only shows one rank's part)."""

    kind: str  # "mha" (K/V heads, split over TP) or "mla" (one latent, replicated over TP)
    num_kv_heads: int
    num_layers: int

    def __post_init__(self):
        if self.kind not in ("mha", "mla"):
            raise ValueError(f"kind: expected 'mha' or 'mla', got {self.kind!r}")
        if self.num_kv_heads < 1 or self.num_layers < 1:
            raise ValueError(f"expected at least one head and one layer, got "
                             f"{self.num_kv_heads} heads, {self.num_layers} layers")


@dataclass(frozen=True)
class Nonce(Message):
    TAG = "nonce"
    nonce: str  # hex, NONCE_BYTES random bytes
    version: int


@dataclass(frozen=True)
class Hello(Message):
    """First authenticated frame of a sender: everything the receiver checks it against."""

    TAG = "hello"
    instance: str
    rank: ParallelRank
    sizes: ParallelSizes
    model: ModelSpec
    incarnation: str
    session: str  # the sender engine's Mooncake session
    unit: PackedFormat  # one token, head and layer: format version, components, dtypes
    page_size: int
    num_heads: int  # this pool's local heads and layers
    num_layers: int
    layout: str
    dcp: tuple[int, int, int] | None  # a DCP-sharded pool: (size, rank, interleave)


@dataclass(frozen=True)
class Welcome(Message):
    TAG = "welcome"
    instance: str
    rank: ParallelRank
    sizes: ParallelSizes
    model: ModelSpec
    incarnation: str
    session: str
    unit: PackedFormat
    page_size: int
    num_heads: int
    num_layers: int
    layout: str
    dcp: tuple[int, int, int] | None
    pool: list[dict] | None  # direct mode: per (layer, component) address and strides
    integrity: str  # "" | "crc32c" | "digest": what every packed segment's note must carry


@dataclass(frozen=True)
class Refused(Message):
    TAG = "refused"
    reason: str


@dataclass(frozen=True)
class Announce(Message):
    TAG = "announce"
    rid: RequestId
    num_tokens: int
    num_pages: int


@dataclass(frozen=True)
class RouteSpec:
    """A route on the wire (see `cpkv.transfer.mapping.Route`)."""

    tp: int
    pp: int
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]
    src_layers: tuple[int, int]
    dst_layers: tuple[int, int]


@dataclass(frozen=True)
class Destination(Message):
    TAG = "dest"
    rid: RequestId
    use: int
    incarnation: str  # the receiver's: a destination of another life is refused
    addr: int  # the slot's address in the receiver's registered arena
    nbytes: int  # the slot's size (every region)
    region: int  # this sender's route region, bytes from addr
    route: RouteSpec
    num_tokens: int
    prefix: int  # the request's first tokens already in the receiver's pages: not sent
    num_pages: int
    page_ids: list[int] | None  # direct mode: the receiver's page ids of the request


@dataclass(frozen=True)
class Note(Message):
    TAG = "note"
    rid: RequestId
    use: int
    pages: tuple[int, int]  # the sender's share of this call, request-local pages of its pool
    tokens: tuple[int, int]  # and request tokens (a DCP-sharded sender: the whole request)
    layers: tuple[int, int]  # route-local layers of this segment
    nbytes: int
    mode: str  # "packed" | "direct"
    last: bool  # the sender's last segment of the request
    check: int | None  # the segment's CRC32C or digest (the receiver's `integrity`)
    metadata: str | None  # base64 of the runner's blob


@dataclass(frozen=True)
class Verdict(Message):
    TAG = "verdict"
    rid: RequestId
    use: int
    status: int  # KVStatus.Success or KVStatus.Failed
    reason: str | None


@dataclass(frozen=True)
class End(Message):
    TAG = "end"
    rid: RequestId
    use: int
    failed: bool  # False: an acknowledged verdict; True: the sender failed the request
    reason: str | None


def encode(msg: Message) -> bytes:
    return json.dumps(msg.to_wire(), separators=(",", ":")).encode()


def decode(payload: bytes) -> Message:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"unreadable frame ({type(e).__name__}: {str(e)[:60]})") from None
    return Message.from_wire(data)


class FrameCodec:
    """One connection end's framing and authentication (see the module doc).

    ``side`` is "S" (the sender, which opened the connection) or "R". `hello` is this end's
    plain nonce frame; `start` takes the peer's and derives the session key; then `pack` /
    `unpack` (which checks) one frame payload each, counting frames per direction.
    """

    def __init__(self, side: str, secret: bytes | None):
        self.side, self.secret = side, secret
        self.nonce = os.urandom(NONCE_BYTES)
        self.key: bytes | None = None
        self.started = False
        self._sent = self._received = 0

    def hello(self) -> bytes:
        return encode(Nonce(self.nonce.hex(), PROTOCOL_VERSION))

    def start(self, payload: bytes) -> None:
        msg = decode(payload)
        if not isinstance(msg, Nonce):
            raise ProtocolError(f"expected the peer's nonce first, got {msg.TAG!r}")
        if msg.version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {msg.version} there, {PROTOCOL_VERSION} here")
        try:
            peer = bytes.fromhex(msg.nonce)
        except ValueError:
            raise ProtocolError("malformed nonce") from None
        if len(peer) != NONCE_BYTES:
            raise ProtocolError("malformed nonce")
        if self.secret is not None:
            first, second = (self.nonce, peer) if self.side == "S" else (peer, self.nonce)
            self.key = hmac.new(self.secret, b"cpkv-session" + first + second,
                                hashlib.sha256).digest()
        self.started = True

    def _mac(self, direction: bytes, seq: int, body: bytes) -> bytes:
        return hmac.new(self.key, direction + struct.pack(">Q", seq) + body,
                        hashlib.sha256).digest()

    def pack(self, msg: Message) -> bytes:
        body = encode(msg)
        if self.key is not None:
            body = self._mac(self.side.encode(), self._sent, body) + body
        self._sent += 1
        return body

    def unpack(self, payload: bytes) -> Message:
        if self.key is not None:
            mac, payload = payload[:MAC_BYTES], payload[MAC_BYTES:]
            other = b"R" if self.side == "S" else b"S"
            if not hmac.compare_digest(mac, self._mac(other, self._received, payload)):
                raise ProtocolError("message authentication failed (wrong secret, or a frame "
                                    "forged, replayed or reordered)")
        self._received += 1
        return decode(payload)


# -- slot addressing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotPlan:
    """Where each route's rows live in one request's staging slot: the receiver lays regions
    out back to back (route order), each the packed format of its rows (a row: one token,
    every layer and head of the route); a sender's rows and layers are one span of its region
    (see the module doc). Byte arithmetic is `PackedFormat`'s."""

    regions: tuple[tuple[str, int, PackedFormat], ...]  # (route key, offset, its rows' format)

    @classmethod
    def build(cls, routes: list[tuple[str, PackedFormat]]) -> SlotPlan:
        """``routes``: (route key, the packed format of its region's rows), in route order."""
        out, pos = [], 0
        for key, fmt in routes:
            out.append((key, pos, fmt))
            pos += fmt.nbytes
        return cls(tuple(out))

    @property
    def nbytes(self) -> int:
        return sum(fmt.nbytes for _, _, fmt in self.regions)

    def region(self, key: str) -> tuple[int, PackedFormat]:
        """(offset, format) of a route's region."""
        for k, off, fmt in self.regions:
            if k == key:
                return off, fmt
        raise KeyError(key)

    @staticmethod
    def segment(region: int, fmt: PackedFormat, rows: tuple[int, int],
                layers: tuple[int, int]) -> tuple[int, int]:
        """(offset, nbytes) in the slot of route-local layers ``[l0, l1)`` of the rows
        ``[r0, r1)`` a sender fills in a route region at ``region`` whose rows have the packed
        format ``fmt`` (each sender's rows are packed on their own: `PackedFormat.segment`).

        >>> from cpkv.layout import ComponentSpec
        >>> import torch
        >>> fmt = PackedFormat(20, 4, (ComponentSpec("k", 1, 8, torch.bfloat16),))
        >>> SlotPlan.segment(1000, fmt, (10, 20), (1, 3))  # 16 B a row and layer
        (1800, 320)
        """
        span = fmt.segment(*rows, *layers)
        return region + span.offset, span.nbytes


def region_rows(dst: DcpLayout, num_tokens: int, prefix: int) -> int:
    """Rows of a route region: the tokens past the prefix that rank ``dst`` holds."""
    return dst.count(num_tokens) - dst.count(prefix)


def segment_rows(dst: DcpLayout, src: DcpLayout | None, tokens: tuple[int, int],
                 num_tokens: int, prefix: int) -> tuple[DcpSelection, int]:
    """The tokens a sender's range fills on rank ``dst`` and the region row of the first.

    ``src`` is None for a pool holding the request contiguously (a prefill rank: ``tokens``
    is its share of a call, and the rows follow the destination's local order: row of token t
    is ``dst.local_of(t) - dst.count(prefix)``), or the sending rank of a DCP-sharded pool
    (``tokens`` is the whole request; source rank k's rows follow those of ranks ``< k``).

    >>> sel, row = segment_rows(DcpLayout(2, 1), None, (4, 10), 10, 2)  # odd tokens from 4
    >>> sel.count, sel.dst_start, row
    (3, 2, 1)
    >>> sel, row = segment_rows(DcpLayout(), DcpLayout(2, 1), (0, 6), 6, 0)  # DCP 2 -> 1
    >>> sel.count, row
    (3, 3)
    """
    start, stop = tokens
    if src is None:
        sel = dcp_select(dst, start, stop, prefix=prefix)
        return sel, sel.dst_start - dst.count(prefix)
    before = sum(dcp_select(dst, 0, num_tokens, src=src.with_rank(k), prefix=prefix).count
                 for k in range(src.rank))
    return dcp_select(dst, start, stop, src=src, prefix=prefix), before
