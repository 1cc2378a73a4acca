"""KV all-gather for context-parallel prefill, straight into the paged pool.

Each CP rank computed K/V (or the MLA latent) for its own tokens only. ``all_gather_kv``:

1. packs the local shard into this rank's region of a symmetric staging slot (region r of every
   rank's slot is at the same offset: the arena guarantees it);
2. all-gathers the regions in place over a torch.distributed group (gloo on CPU, NCCL on GPU);
3. runs one reorganize kernel that writes every gathered token into its page slot in sequence
   order, undoing the zigzag/interleave split and dropping the padding; no reordered copy.

It returns once the pool holds the bytes. If a rank fails before the collective, it raises, and
the others raise ``GatherTimeoutError`` after ``timeout`` seconds instead of hanging; their pools
keep their previous bytes (the reorganize never ran).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .._checks import as_page_ids
from ..kernels import reorganize_pages
from ..kernels.paged_copy import check_reorganize
from ..layout import PagedKVCache, as_range
from ..staging import Slot
from .partition import SplitPlan

__all__ = ["GatherTimeoutError", "all_gather_kv", "gather_chunks", "gather_nbytes",
           "split_token_map"]

GATHER_CHUNK_BYTES = 16 << 20  # layer chunks gathered and reorganized in turn


class GatherTimeoutError(TimeoutError):
    """The CP group did not complete the all-gather in time (a rank failed or is missing)."""


def gather_nbytes(cache: PagedKVCache, plan: SplitPlan, *, layers=None) -> int:
    """Bytes of the staging slot ``all_gather_kv`` needs: cp_size regions of padded_len tokens."""
    return plan.cp_size * cache.packed_nbytes(plan.padded_len, layers=_layer_range(cache, layers))


def gather_chunks(cache: PagedKVCache, plan: SplitPlan, *,
                  layers=None) -> list[tuple[range, slice]]:
    """How `all_gather_kv` splits its slot: (layer range, byte slice of the slot) per chunk.

    Each chunk is >= GATHER_CHUNK_BYTES gathered (or one layer) and holds its own cp_size rank
    regions, so chunk k can be reorganized while chunk k+1 is still being gathered."""
    layer_range = _layer_range(cache, layers)
    per_layer = plan.cp_size * cache.packed_nbytes(plan.padded_len,
                                                   layers=(layer_range.start,
                                                           layer_range.start + 1))
    step = max(1, -(-GATHER_CHUNK_BYTES // max(per_layer, 1)))
    out = []
    for l0 in range(0, len(layer_range), step):
        n = min(step, len(layer_range) - l0)
        out.append((range(layer_range.start + l0, layer_range.start + l0 + n),
                    slice(l0 * per_layer, (l0 + n) * per_layer)))
    return out


def split_token_map(plan: SplitPlan, cache: PagedKVCache,
                    page_ids: torch.Tensor | Sequence[torch.Tensor], *,
                    validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The (page ids, token map) that make `cpkv.kernels.reorganize_pages` undo ``plan``.

    The sequences' page lists are concatenated; sequence s's tokens start at request-local
    token ``page_size x (pages of earlier sequences)``, and token p of it reads gathered row
    ``plan.gather_index[p]`` (the rest of each sequence's last page maps to -1: untouched).
    """
    lists = [page_ids] if not isinstance(page_ids, (list, tuple)) else list(page_ids)
    if len(lists) != len(plan.seq_lens):
        raise ValueError(f"page_ids: expected one id tensor per sequence "
                         f"({len(plan.seq_lens)}), got {len(lists)}")
    ps = cache.page_size
    lists = [as_page_ids(ids, cache.num_pages, cache.device, what=f"page_ids[{s}]",
                         check_values=validate) for s, ids in enumerate(lists)]
    starts, virt = [], 0
    for s, (ids, n) in enumerate(zip(lists, plan.seq_lens, strict=True)):
        if ids.numel() * ps < n:
            raise ValueError(f"page_ids[{s}]: a sequence of {n} tokens needs "
                             f"{-(-n // ps)} pages of {ps}, got {ids.numel()}")
        starts.append(torch.arange(n) + virt)
        virt += ids.numel() * ps
    targets = torch.cat(starts)  # global position -> request-local token
    token_map = torch.full((int(targets[-1]) + 1 if targets.numel() else 0,), -1,
                           dtype=torch.int64)
    token_map[targets] = plan.gather_index
    all_ids = torch.cat(lists) if lists else torch.empty(0, dtype=torch.int64,
                                                          device=cache.device)
    return all_ids, token_map.to(cache.device)


def _layer_range(cache: PagedKVCache, layers) -> range:
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 <= layers < cache.num_layers:
            raise ValueError(f"layers: expected a layer in [0, {cache.num_layers}), got {layers}")
        return range(layers, layers + 1)
    return as_range(layers, cache.num_layers, "layers")


def _local_blocks(local: Mapping[str, torch.Tensor], cache: PagedKVCache, n_layers: int,
                  one_layer: bool, n_local: int) -> list[torch.Tensor]:
    """Validate the local shard; return [layer-major, component] uint8 [n_local, heads, row]."""
    if not isinstance(local, Mapping):
        raise TypeError(f"local: expected a mapping of component name -> tensor, "
                        f"got {type(local).__name__}")
    if sorted(local) != sorted(cache.component_names):
        raise ValueError(f"local: expected components {cache.component_names}, "
                         f"got {sorted(local)}")
    per_comp = {}
    for spec in cache.components:
        t = local[spec.name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"local[{spec.name!r}]: expected a tensor, got {type(t).__name__}")
        if t.dtype != spec.dtype:
            raise TypeError(f"local[{spec.name!r}]: expected dtype {spec.dtype} (the pool's), "
                            f"got {t.dtype}")
        if t.device != cache.device:
            raise ValueError(f"local[{spec.name!r}]: expected device {cache.device}, "
                             f"got {t.device}")
        if one_layer:
            t = t.unsqueeze(0)
        if t.dim() == 3 and spec.num_heads == 1:  # [layers, tokens, dim]: one head
            t = t.unsqueeze(2)
        want = (n_layers, n_local, spec.num_heads, spec.head_dim)
        if tuple(t.shape) != want:
            shape = "[tokens, heads, head_dim]" if one_layer else \
                "[layers, tokens, heads, head_dim]"
            raise ValueError(f"local[{spec.name!r}]: expected {shape} = "
                             f"{want[1:] if one_layer else want} (this rank owns {n_local} "
                             f"tokens of the plan), got {tuple(local[spec.name].shape)}")
        if t.stride(-1) != 1:
            t = t.contiguous()
        per_comp[spec.name] = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return [per_comp[spec.name][i] for i in range(n_layers) for spec in cache.components]


def all_gather_kv(local: Mapping[str, torch.Tensor], plan: SplitPlan, cache: PagedKVCache,
                  page_ids: torch.Tensor | Sequence[torch.Tensor], *,
                  slot: Slot | torch.Tensor, group=None, layers=None, timeout: float = 60.0,
                  backend: str = "auto", validate: bool = True) -> None:
    """All-gather every CP rank's K/V shard into this rank's paged pool, in sequence order.

    Collective over ``group``: every rank calls it with the same plan, layers and page ids.

    Args:
        local: component name -> this rank's shard. One layer (``layers`` an int):
            ``[n_local, heads, head_dim]`` (MLA: ``[n_local, dim]`` too); several layers:
            ``[n_layers, n_local, heads, head_dim]``. ``n_local = len(plan.positions[rank])``.
        plan: the split (`zigzag_split` / `interleave_split`); its cp_size is the group size.
        cache: this rank's pool; tokens go to every sequence's pages in sequence order.
        page_ids: per sequence, its page ids (one tensor for one sequence).
        slot: a staging slot (or uint8 tensor) of at least ``gather_nbytes(cache, plan, layers=)``
            bytes, at the same arena offset on every rank.
        group: the CP process group (default: the world).
        layers: an int (layer-at-a-time, as a model runner calls it in the forward pass), a
            range, or None for all layers.
        timeout: seconds to wait for the group before raising GatherTimeoutError.
        backend, validate: as in `cpkv.kernels.pack_pages`.

    Example (on each of 2 ranks, gloo)::

        plan = zigzag_split(1000, 2)
        slot = arena.alloc(gather_nbytes(cache, plan, layers=layer))
        all_gather_kv({"k": k_local, "v": v_local}, plan, cache, page_ids, slot=slot,
                      layers=layer)
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    one_layer = isinstance(layers, int) and not isinstance(layers, bool)
    layer_range = _layer_range(cache, layers)
    if world != plan.cp_size:
        raise ValueError(f"plan: expected cp_size equal to the group size {world}, "
                         f"got {plan.cp_size}")
    n_local = len(plan.positions[rank])
    blocks = _local_blocks(local, cache, len(layer_range), one_layer, n_local)
    region = cache.packed_nbytes(plan.padded_len, layers=layer_range)
    buf = slot.tensor if isinstance(slot, Slot) else slot
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError("slot: expected a staging Slot or a 1-D uint8 tensor")
    if buf.device != cache.device:
        raise ValueError(f"slot: expected device {cache.device}, got {buf.device}")
    if buf.numel() < world * region:
        raise ValueError(f"slot: expected at least {world * region} bytes ({world} ranks x "
                         f"{region}), got {buf.numel()}")
    buf = buf[:world * region]
    all_ids, token_map = split_token_map(plan, cache, page_ids, validate=validate)
    if validate:  # check the ids before any byte moves, so a bad rank fails before the gather
        check_reorganize(buf, cache, all_ids, token_map, rows_per_rank=plan.padded_len,
                         layers=layer_range)

    # Layer chunks of >= GATHER_CHUNK_BYTES gathered, each its own slice of the slot holding its
    # own rank regions: every chunk's gather is issued at once (the group runs them in order)
    # and chunk k is reorganized while chunk k+1 is still on the wire.
    n_comp = len(cache.components)
    pending = []
    for chunk, where in gather_chunks(cache, plan, layers=layer_range):
        l0 = chunk.start - layer_range.start
        part = buf[where]
        mine = part.view(world, -1)[rank]
        fmt = cache.packed_format(plan.padded_len, layers=chunk)
        for off, rows, block in zip(fmt.block_offsets(), fmt.row_nbytes * len(chunk),
                                    blocks[l0 * n_comp:(l0 + len(chunk)) * n_comp], strict=True):
            mine[off:off + plan.padded_len * rows].view(plan.padded_len, *block.shape[1:])[
                :n_local].copy_(block)
        pending.append((chunk, part, dist.all_gather_single(part, mine, group=group,
                                                             async_op=True)))
    for chunk, part, work in pending:
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise GatherTimeoutError(f"all_gather_kv: the CP group ({world} ranks) did not "
                                     f"complete the all-gather within {timeout} s; a rank "
                                     f"failed or is missing ({e})") from e
        reorganize_pages(part, cache, all_ids, token_map, rows_per_rank=plan.padded_len,
                         layers=chunk, backend=backend, validate=False)
