"""The packed digest: a 64-bit checksum of a packed buffer that the copy kernel computes while
the bytes pass through it (`pack_pages(digest=)`, `unpack_pages(digest=)`), and its torch twin
(`packed_digest`, the oracle and the CPU path).

Construction. The buffer is read as 32-bit little-endian units: unit i holds bytes
[4i, 4i + 4) (a length that is not a multiple of 4 is zero-padded). The digest is

    D = sum_i u_i * K(i)  mod 2**64,

    K(i) = hi * 2**32 + lo,  lo = 2x + 1 mod 2**32,  hi = 2 C3 x + (x >> 31) mod 2**32,
    x = g(i mod 2**32) = ((i C1) ^ ((i C1) >> 16)) C2 mod 2**32,

g being a bijection of 32-bit integers (odd multipliers and a xor-shift, as in MurmurHash3's
finalizer), so K is odd and K mod 2**33 = 2x + 1 takes a different value for every unit.
About nine 32-bit integer instructions per unit on the GPU (a hash, two multiply-adds). So:

* it depends only on the bytes and their positions: D is linear in the units, so a word of any
  width contributes its bytes' share, ``w * 2**(8 * (p % 4)) * K(p // 4)`` for a 1- or 2-byte
  word at byte p and the two halves of an 8-byte word: launch groups of 8/4/2/1-byte words, a
  sender's and a receiver's different alignments, any tiling, Triton or torch, CPU or CUDA give
  the same value; and a sum mod 2**64 is combined across programs (one atomic add each) and
  across pieces of a buffer (``packed_digest(piece, offset=)``) in any order;
* every error confined to one aligned 4-byte unit is detected (every single-bit flip, any
  corrupted byte or 2-byte half): the change is ``delta * K(i)`` with 0 < |delta| < 2**32 and K
  odd, never 0 mod 2**64;
* every swap of two different units is detected (in buffers under 16 GiB): the change is
  ``(u_a - u_b) * (K(b) - K(a))``; K(b) - K(a) = 2 (x_b - x_a) mod 2**33 with x_a != x_b (g is a
  bijection), so it has at most 32 trailing zero bits, the unit difference at most 31: the
  product is not 0 mod 2**64;
* any other corruption (several units, a shift, zeroed or stale bytes) is missed only when
  ``sum delta_i K(i) = 0 mod 2**64``: about 2**-64 for unstructured errors, up to 2**-(64 - t)
  when every delta shares t trailing zero bits.

What it is not: a cryptographic MAC (anyone can forge bytes with a given digest), nor CRC32C,
which also guarantees every burst of up to 32 bits at any alignment and every error of up to
3 bits, but misses unstructured errors with probability 2**-32 and is computed in a second pass
over the bytes (on the host for a CUDA buffer). See the README, "GPU check and kernel code
quality", for the measured costs and the recommended default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_count

__all__ = ["add_digest", "packed_digest", "unit_keys"]

_C1, _C2, _C3 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35  # odd: multiplying by them is a bijection
_M32 = 0xFFFFFFFF
# CPU: the keys of the first 64 MiB of any buffer are kept (a table of up to 128 MiB, grown to
# the largest buffer seen): with it the digest is 3 passes over int64 units, without ~12.
_KEY_CACHE_UNITS = 1 << 24
_CHUNK_UNITS = {"cpu": 1 << 18, "cuda": 1 << 24}  # pieces that stay in cache / few launches
_keys: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _unit_term(u, i):
    """u * K(i) mod 2**64 (uint64) for uint32 units ``u`` at uint32 unit indices ``i``, in
    32-bit halves: K = hi * 2**32 + lo, lo = 2x + 1, hi = 2 C3 x + (x >> 31)."""
    x = i * 0x9E3779B1
    x = (x ^ (x >> 16)) * 0x85EBCA6B
    lo = x * 2 + 1
    hi = x * 0x85655C6A + (x >> 31)
    return u.to(tl.uint64) * lo.to(tl.uint64) + ((u * hi).to(tl.uint64) << 32)


@triton.jit
def digest_terms(b, o_word, WORD: tl.constexpr):
    """Each word's share of the digest (uint64): ``b`` words of WORD bytes at word index
    ``o_word`` (int64) of the packed buffer."""
    if WORD == 8:
        w = b.to(tl.uint64, bitcast=True)
        i = (o_word * 2).to(tl.uint32)
        return _unit_term(w.to(tl.uint32), i) + _unit_term((w >> 32).to(tl.uint32), i + 1)
    elif WORD == 4:
        return _unit_term(b.to(tl.uint32, bitcast=True), o_word.to(tl.uint32))
    elif WORD == 2:
        w = b.to(tl.uint16, bitcast=True).to(tl.uint32) << ((o_word & 1) * 16).to(tl.uint32)
        return _unit_term(w, (o_word >> 1).to(tl.uint32))
    else:
        w = b.to(tl.uint32) << ((o_word & 3) * 8).to(tl.uint32)
        return _unit_term(w, (o_word >> 2).to(tl.uint32))


def unit_keys(index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """K(i) (int64, two's complement of the unsigned value) of int64 unit indices, into ``out``
    (int64, same shape, not ``index``) when given: in place, one temporary."""
    x = torch.mul(index, _C1, out=out).bitwise_and_(_M32)
    t = x >> 16
    x.bitwise_xor_(t).mul_(_C2).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 31, out=t)
    t.add_(x, alpha=2 * _C3).bitwise_and_(_M32).bitwise_left_shift_(32)  # hi << 32
    return x.mul_(2).add_(1).bitwise_and_(_M32).add_(t)  # + lo


def _keys_for(start: int, n: int, device: torch.device, out: torch.Tensor) -> torch.Tensor:
    """K(start), ..., K(start + n - 1): a view of the CPU's table of the first
    `_KEY_CACHE_UNITS` (computed once, grown to the largest buffer seen), else computed into
    ``out`` (a GPU hashes them again: cheaper than reading a table)."""
    if device.type == "cpu" and start + n <= _KEY_CACHE_UNITS:
        table = _keys.get(device)
        if table is None or table.numel() < start + n:
            size = min(_KEY_CACHE_UNITS, max(1 << 16, triton.next_power_of_2(start + n)))
            table = unit_keys(torch.arange(size, dtype=torch.int64, device=device))
            _keys[device] = table
        return table[start:start + n]
    return unit_keys(torch.arange(start, start + n, dtype=torch.int64, device=device), out=out)


def _add_units(units: torch.Tensor, first: int, acc: torch.Tensor) -> None:
    """acc += sum_j units[j] * K(first + j): ``units`` uint32 (or int64 values < 2**32)."""
    n = units.numel()
    step = _CHUNK_UNITS.get(units.device.type, _CHUNK_UNITS["cuda"])
    buf = torch.empty(2, min(step, n), dtype=torch.int64, device=units.device)
    for s in range(0, n, step):
        t, k = buf[0, :min(step, n - s)], buf[1, :min(step, n - s)]
        t.copy_(units[s:s + t.numel()]).mul_(_keys_for(first + s, t.numel(), units.device, k))
        acc += t.sum()


def _add_bytes(b: torch.Tensor, position: int, acc: torch.Tensor) -> None:
    """acc += the share of a few loose bytes at byte ``position`` on (a partial unit)."""
    p = torch.arange(position, position + b.numel(), dtype=torch.int64, device=b.device)
    acc += b.to(torch.int64).bitwise_left_shift_((p % 4) * 8).mul_(unit_keys(p // 4)).sum()


def add_digest(buf: torch.Tensor, acc: torch.Tensor, offset: int = 0) -> None:
    """``acc`` ([1] int64) += the digest of ``buf`` (1-D contiguous uint8) as if it sat at byte
    ``offset`` of a larger buffer. Inputs are trusted; no host synchronisation."""
    n = buf.numel()
    head = min(-offset % 4, n)
    if head:
        _add_bytes(buf[:head], offset, acc)
    whole = (n - head) // 4
    if whole:
        body = buf[head:head + 4 * whole]
        if body.storage_offset() % 4 == 0:
            units = body.view(torch.uint32)
        else:  # an odd address: assemble the units from their bytes
            b = body.view(whole, 4).to(torch.int64)
            units = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
        _add_units(units, (offset + head) // 4, acc)
    tail = n - head - 4 * whole
    if tail:
        _add_bytes(buf[n - tail:], offset + n - tail, acc)


def packed_digest(buf: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
    """The digest of a packed buffer, as `pack_pages(digest=)` / `unpack_pages(digest=)` add it.

    Args:
        buf: 1-D contiguous uint8 tensor (any device).
        offset: the byte position of ``buf[0]`` in the buffer the digest is of: digests of the
            pieces of a buffer, each at its offset, sum (mod 2**64) to the whole's.

    Returns:
        [1] int64 tensor on ``buf``'s device: the digest mod 2**64, as a signed int64.

    Example::

        slot = pack_pages(cache, ids, digest=(d := torch.zeros(1, dtype=torch.int64)))
        assert torch.equal(d, packed_digest(slot))
        assert torch.equal(packed_digest(slot[:10]) + packed_digest(slot[10:], offset=10), d)
    """
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"buf: expected a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"buf: expected a contiguous 1-D uint8 tensor, got {buf.dtype} of "
                         f"shape {tuple(buf.shape)}")
    check_count(offset, "offset")
    acc = torch.zeros(1, dtype=torch.int64, device=buf.device)
    add_digest(buf, acc, offset)
    return acc
