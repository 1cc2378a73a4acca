"""Store keys: a hash chain over token ids plus the rank suffixes of `cpkv.cp.keys`.

Store page i of a prompt covers tokens ``[i*T, (i+1)*T)`` (T = the store's page size). Its hash
is a chain, so a key names the whole prefix up to and including page i, never a page alone:

    h[-1] = blake2b("cpkv-store/v1|{namespace}|{T}")             (16-byte digests)
    h[i]  = blake2b(h[i-1] || tokens[i*T:(i+1)*T] as int64 little-endian)
    key i = storage_key(namespace, hex(h[i]), rank, sizes, kind=..., num_kv_heads=...)
          = "{namespace}/{hash}[/pp{stage}][/tp{head shard}]"

Two prompts share key i exactly when their first (i+1)*T tokens agree. Only full pages get keys.
The suffixes follow `cpkv.cp.keys.storage_key` with ``cp_replicated=True``: after the CP
all-gather every CP rank holds the same bytes, so CP never appears in a key; PP stages and TP head
shards (MHA/GQA only; MLA latents are replicated over TP) hold different bytes and get their own.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch

from .._checks import check_count, is_index
from ..cp.keys import is_key_writer, storage_key
from ..parallel import ParallelRank, ParallelSizes

__all__ = ["is_store_writer", "page_hashes", "page_keys"]

DIGEST = 16


def _tokens(token_ids) -> np.ndarray:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex() \
                or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids: expected a 1-D integer tensor, got "
                            f"{token_ids.dtype} of shape {tuple(token_ids.shape)}")
        return token_ids.detach().to("cpu", torch.int64).numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
            raise TypeError(f"token_ids: expected a 1-D integer array, got {token_ids.dtype} "
                            f"of shape {token_ids.shape}")
        return token_ids.astype("<i8", copy=False)
    if isinstance(token_ids, (list, tuple)):
        if not all(is_index(t) for t in token_ids):
            raise TypeError("token_ids: expected a list of ints")
        return np.asarray(token_ids, dtype="<i8")
    raise TypeError(f"token_ids: expected a tensor, numpy array or list of ints, got "
                    f"{type(token_ids).__name__}")


def page_hashes(token_ids, page_size: int, namespace: str = "cpkv") -> list[str]:
    """Hex chain hashes of the full store pages of ``token_ids`` (a partial tail page has none).

    >>> len(page_hashes(list(range(40)), 16))
    2
    """
    check_count(page_size, "page_size", 1)
    if not isinstance(namespace, str) or not namespace or "/" in namespace:
        raise ValueError(f"namespace: expected a non-empty str without '/', got {namespace!r}")
    tokens = _tokens(token_ids).astype("<i8", copy=False)
    prev = hashlib.blake2b(f"cpkv-store/v1|{namespace}|{page_size}".encode(),
                           digest_size=DIGEST).digest()
    out = []
    for i in range(len(tokens) // page_size):
        h = hashlib.blake2b(prev, digest_size=DIGEST)
        h.update(tokens[i * page_size:(i + 1) * page_size].tobytes())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


def page_keys(token_ids, page_size: int, rank: ParallelRank | None = None,
              sizes: ParallelSizes | None = None, *, namespace: str = "cpkv", kind: str = "mha",
              num_kv_heads: int = 1) -> list[str]:
    """The store key of every full page of ``token_ids`` for ``rank`` of a deployment of
    ``sizes`` (default: a single rank).

    ``num_kv_heads`` is the model's total KV head count (over all TP ranks); it decides which
    TP ranks hold the same head shard (and so share keys) when TP exceeds it.
    """
    rank, sizes = at(rank, sizes)
    return [storage_key(namespace, h, rank, sizes, kind=kind, num_kv_heads=num_kv_heads,
                        cp_replicated=True)
            for h in page_hashes(token_ids, page_size, namespace)]


def at(rank: ParallelRank | None, sizes: ParallelSizes | None):
    """(rank, sizes) with defaults (a single rank), checked: TypeError/ValueError if bad."""
    rank = ParallelRank() if rank is None else rank
    sizes = ParallelSizes() if sizes is None else sizes
    if not isinstance(sizes, ParallelSizes):
        raise TypeError(f"sizes: expected ParallelSizes, got {type(sizes).__name__}")
    sizes.check(rank)
    return rank, sizes


def is_store_writer(rank: ParallelRank, sizes: ParallelSizes, *, kind: str = "mha",
                    num_kv_heads: int = 1) -> bool:
    """Whether this rank writes (its CP page share of) its keys.

    Every CP rank writes: the lowest TP replica of each head shard (every TP rank for distinct
    shards; TP rank 0 for MLA), in every PP stage. CP ranks split the pages with `page_share`.
    """
    return is_key_writer(replace(rank, cp=0), replace(sizes, cp=1), kind=kind,
                         num_kv_heads=num_kv_heads)
