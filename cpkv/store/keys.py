"""Store keys: which rank's bytes of which prompt prefix, for which model and value geometry.

Rank suffixes
    A key names the *bytes* a rank holds for one page, so ranks holding equal bytes share a key
    and ranks holding different bytes never do (`storage_key`):

        {model}/{page_hash}[/pp{stage}][/tp{head_shard}][/cp{cp_rank}]

    * ``pp{stage}``: only with pipeline parallelism (stages hold different layers).
    * ``tp{head_shard}``: MHA/GQA with TP > 1, where ranks hold different KV heads. When TP
      exceeds the KV head count, ``tp_size / num_kv_heads`` consecutive ranks replicate one head
      and share its shard index. MLA never has it: the latent is replicated across TP.
    * ``cp{rank}``: only when CP ranks hold different bytes (each keeps just its page share).
      After the CP all-gather every CP rank holds the whole sequence, so the store's keys never
      carry it (``cp_replicated=True``).

    Among the ranks that share a key exactly one writes it (the lowest TP replica of its head
    shard, CP rank 0 where CP is replicated); every rank may read it. The store tier lets every
    CP rank write its own page share instead (`is_store_writer`).

Page hashes
    Store page i of a prompt covers tokens ``[i*T, (i+1)*T)`` (T = the store's page size). Its
    hash is a chain, so a key names the whole prefix up to and including page i, never a page
    alone, and the chain is seeded with *whose* bytes they are:

        h[-1] = blake2b("cpkv-store/v2|{model}|{value geometry}")        (16-byte digests)
        h[i]  = blake2b(h[i-1] || tokens[i*T:(i+1)*T] as int64 little-endian)

    The value geometry (`value_geometry`) is the packed format of one store page: format version,
    T, layers, and for each component its name, heads, head dim and dtype. Two prompts share key
    i exactly when their first (i+1)*T tokens agree *and* the model id and geometry agree, so a
    value of another geometry (4 heads x 32 vs 2 x 64, fp16 vs bf16, 6 layers x 1 head vs
    3 x 2: the same byte size) or of another model is never found: a miss, never a hit. Only
    full pages get keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch

from .._checks import is_index
from ..layout import PackedFormat
from ..parallel import ParallelRank, ParallelSizes, head_shard, is_first_holder

__all__ = ["is_key_writer", "is_store_writer", "page_hashes", "page_keys", "storage_key",
           "value_geometry"]

DIGEST = 16
SCHEME = "cpkv-store/v2"  # v2: the chain is seeded with the model id and the value geometry


def _head_shard(kind: str, num_kv_heads: int, rank: ParallelRank,
                sizes: ParallelSizes) -> int | None:
    """Which distinct KV-head shard this TP rank holds (None: one shard for all TP ranks)."""
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
    sizes.check(rank)
    if kind == "mla" or sizes.tp == 1:
        return None
    return head_shard(rank.tp, sizes.tp, num_kv_heads)


def storage_key(prefix: str, page_hash: str, rank: ParallelRank, sizes: ParallelSizes, *,
                kind: str = "mha", num_kv_heads: int = 1, cp_replicated: bool = True) -> str:
    """The key under which this rank's bytes of page ``page_hash`` are stored.

    >>> storage_key("l70", "abc", ParallelRank(tp=3, pp=1), ParallelSizes(tp=4, pp=2),
    ...             num_kv_heads=2)
    'l70/abc/pp1/tp1'
    """
    shard = _head_shard(kind, num_kv_heads, rank, sizes)
    parts = [prefix, page_hash]
    if sizes.pp > 1:
        parts.append(f"pp{rank.pp}")
    if shard is not None:
        parts.append(f"tp{shard}")
    if sizes.cp > 1 and not cp_replicated:
        parts.append(f"cp{rank.cp}")
    return "/".join(parts)


def is_key_writer(rank: ParallelRank, sizes: ParallelSizes, *, kind: str = "mha",
                  num_kv_heads: int = 1, cp_replicated: bool = True) -> bool:
    """Whether this rank is the one that writes its key (readers: every rank)."""
    shard = _head_shard(kind, num_kv_heads, rank, sizes)
    first_tp = rank.tp == 0 if shard is None else is_first_holder(rank.tp, sizes.tp,
                                                                   num_kv_heads)
    return first_tp and (rank.cp == 0 or not cp_replicated)


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


def check_model(model) -> str:
    """``model`` if it is a usable model id (a non-empty str without '/'), else ValueError."""
    if not isinstance(model, str) or not model or "/" in model:
        raise ValueError(f"model: expected a non-empty model id without '/' (e.g. "
                         f"'llama-3.1-8b-instruct'), got {model!r}")
    return model


def value_geometry(fmt: PackedFormat) -> str:
    """The geometry of a store value of format ``fmt`` (one store page) as canonical text:
    format version, tokens, layers, and each component's name, heads, head dim and dtype.

    >>> from cpkv.layout import ComponentSpec
    >>> value_geometry(PackedFormat(16, 2, (ComponentSpec("latent", 1, 576, torch.bfloat16),)))
    'v1 t16 l2 latent:1x576:bfloat16'
    """
    if not isinstance(fmt, PackedFormat):
        raise TypeError(f"fmt: expected PackedFormat, got {type(fmt).__name__}")
    if fmt.num_tokens < 1 or fmt.num_layers < 1:
        raise ValueError(f"fmt: expected a store page of >= 1 token and >= 1 layer, got "
                         f"{fmt.num_tokens} tokens, {fmt.num_layers} layers")
    comps = " ".join(f"{c.name}:{c.num_heads}x{c.head_dim}:{str(c.dtype).removeprefix('torch.')}"
                     for c in fmt.components)
    return f"v{fmt.version} t{fmt.num_tokens} l{fmt.num_layers} {comps}"


def page_hashes(token_ids, fmt: PackedFormat, model: str) -> list[str]:
    """Hex chain hashes of the full store pages of ``token_ids`` (``fmt.num_tokens`` tokens a
    page; a partial tail page has none) for values of format ``fmt`` of model ``model``.

    >>> from cpkv.layout import ComponentSpec
    >>> fmt = PackedFormat(16, 1, (ComponentSpec("latent", 1, 576, torch.bfloat16),))
    >>> len(page_hashes(list(range(40)), fmt, "tiny"))
    2
    """
    seed = f"{SCHEME}|{check_model(model)}|{value_geometry(fmt)}"
    page_size = fmt.num_tokens
    tokens = _tokens(token_ids)
    prev = hashlib.blake2b(seed.encode(), digest_size=DIGEST).digest()
    out = []
    for i in range(len(tokens) // page_size):
        h = hashlib.blake2b(prev, digest_size=DIGEST)
        h.update(tokens[i * page_size:(i + 1) * page_size].tobytes())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


def page_keys(token_ids, fmt: PackedFormat, rank: ParallelRank | None = None,
              sizes: ParallelSizes | None = None, *, model: str, kind: str = "mha",
              num_kv_heads: int = 1) -> list[str]:
    """The store key of every full page of ``token_ids`` for ``rank`` of a deployment of
    ``sizes`` (default: a single rank), for values of format ``fmt`` (one store page of the
    rank's layer and head slice) of model ``model``.

    ``num_kv_heads`` is the model's total KV head count (over all TP ranks); it decides which
    TP ranks hold the same head shard (and so share keys) when TP exceeds it.
    """
    rank, sizes = at(rank, sizes)
    return [storage_key(model, h, rank, sizes, kind=kind, num_kv_heads=num_kv_heads,
                        cp_replicated=True)
            for h in page_hashes(token_ids, fmt, model)]


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
