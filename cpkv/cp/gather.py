"""KV all-gather for context-parallel prefill, straight into the paged pool.

Each CP rank computed K/V (or the MLA latent) for its own tokens only. ``all_gather_kv``:

1. copies the local shard into this rank's region of a symmetric staging slot (region r of every
   rank's slot is at the same offset: the arena guarantees it), one strided copy per component;
2. all-gathers the regions in place over a torch.distributed group (gloo on CPU, NCCL on GPU);
3. runs one reorganize kernel per layer chunk that writes every gathered token into its page
   slot in sequence order, undoing the split and dropping the padding; no reordered copy.

Completion is the same contract on CPU and GPU: it returns a `GatherDone`. On CPU (gloo) the
pool already holds the bytes when it returns (``done.query()`` is True). On CUDA the reorganize
is queued on the current stream: work queued on that stream afterwards sees the bytes,
``done.wait(stream)`` orders another stream, ``done.synchronize()`` blocks the host. The host
never blocks on NCCL (its own timeout and watchdog govern a missing rank); with gloo the wait is
bounded by ``timeout``: if a rank fails before the collective, it raises, and the others raise
``GatherTimeoutError`` instead of hanging; their pools keep their previous bytes.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from .._checks import as_page_ids, is_index, is_int
from ..kernels import reorganize_pages
from ..layout import PagedKVCache, as_range
from ..parallel import LAYER_GROUP_BYTES, layer_groups
from ..staging import Slot
from .partition import SplitPlan

__all__ = ["GatherDone", "GatherTimeoutError", "all_gather_kv", "gather_chunks",
           "gather_nbytes", "split_token_map"]

GATHER_CHUNK_BYTES = LAYER_GROUP_BYTES  # layer chunks gathered and reorganized in turn
_MAP_CACHE_SIZE = 32
_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> {key: token map}


class GatherTimeoutError(TimeoutError):
    """The CP group did not complete the all-gather in time (a rank failed or is missing)."""


class GatherDone:
    """Completion of an `all_gather_kv`: the same methods on CPU and GPU.

    ``event`` is the CUDA event recorded after the last reorganize (None on CPU, where the
    pool holds the bytes before the call returns)."""

    def __init__(self, event=None, device: torch.device | None = None):
        self.event, self.device = event, device

    def query(self) -> bool:
        """True once the pool holds the bytes."""
        return True if self.event is None else bool(self.event.query())

    def wait(self, stream=None) -> None:
        """Order ``stream`` (default: the current one) after the gather; no host block."""
        if self.event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(
                self.event)

    def synchronize(self) -> None:
        """Block the host until the pool holds the bytes."""
        if self.event is not None:
            self.event.synchronize()


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
    at = layer_range.start
    return [(g, slice((g.start - at) * per_layer, (g.stop - at) * per_layer))
            for g in layer_groups(layer_range, per_layer, GATHER_CHUNK_BYTES)]


def _is_id_list(v) -> bool:
    return isinstance(v, (list, tuple)) and all(is_index(x) for x in v)


def _id_lists(plan: SplitPlan, page_ids) -> list:
    """One id collection per sequence: a tensor, array or list of ints is one sequence's."""
    if isinstance(page_ids, (torch.Tensor, np.ndarray)) or _is_id_list(page_ids):
        lists = [page_ids]
    elif isinstance(page_ids, (list, tuple)):
        lists = list(page_ids)
    else:
        raise TypeError(f"page_ids: expected a tensor, numpy array or list of ints per "
                        f"sequence, got {type(page_ids).__name__}")
    if len(lists) != len(plan.seq_lens):
        raise ValueError(f"page_ids: expected one id tensor per sequence "
                         f"({len(plan.seq_lens)}), got {len(lists)}")
    return lists


def _offsets(token_offset, n_seqs: int) -> tuple[int, ...]:
    vals = [token_offset] * n_seqs if is_index(token_offset) else token_offset
    if not isinstance(vals, (list, tuple)) or len(vals) != n_seqs or not all(
            is_index(v) and v >= 0 for v in vals):
        raise ValueError(f"token_offset: expected a non-negative int (or one per sequence, "
                         f"{n_seqs}), got {token_offset!r}")
    return tuple(int(v) for v in vals)


def _ids_key(ids):
    """Identity of an id collection: tensors by object and version (an in-place change
    invalidates), host arrays and lists by value."""
    if isinstance(ids, torch.Tensor):
        return ("tensor", id(ids), ids._version)
    if isinstance(ids, np.ndarray):
        return ("array", ids.dtype.str, ids.shape, ids.tobytes())
    return ("list", tuple(int(v) for v in ids))


def split_token_map(plan: SplitPlan, cache: PagedKVCache, page_ids, *, token_offset=0,
                    validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The (page ids, token map) that make `cpkv.kernels.reorganize_pages` undo ``plan``.

    Args:
        page_ids: per sequence, its pages (tensor, numpy array or list of ints; one for a
            single sequence), in request order, converted once.
        token_offset: tokens already in each request's pages (an int, or one per sequence):
            a chunked prefill continuing mid-page lands right after them; earlier tokens are
            untouched.

    The sequences' page lists are concatenated; sequence s's tokens start at request-local
    token ``page_size x (pages of earlier sequences) + token_offset[s]``, and token p of it
    reads gathered row ``plan.gather_index[p]`` (every other token maps to -1: untouched).

    The ids are checked once, when the map is built (in range, no page listed twice), unless
    ``validate=False``. The result is kept per pool (a weak key: it dies with the pool) and per
    (plan, page ids, offset) (tensor ids by identity and version, weakly), so a layer-by-layer
    gather neither rebuilds it, nor copies it from the host, nor synchronises with the device
    again.
    """
    if not isinstance(plan, SplitPlan):
        raise TypeError(f"plan: expected a SplitPlan, got {type(plan).__name__}")
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
    lists = _id_lists(plan, page_ids)
    offsets = _offsets(token_offset, len(lists))
    maps = _MAPS.get(cache)
    if maps is None:
        maps = _MAPS.setdefault(cache, {})
    key = (id(plan), tuple(_ids_key(ids) for ids in lists), offsets)
    hit = maps.pop(key, None)
    if hit is not None:
        refs, all_ids, token_map, validated = hit
        alive = refs[0]() is plan and all(r() is ids for r, ids in zip(refs[1:], [
            ids for ids in lists if isinstance(ids, torch.Tensor)], strict=True))
        if alive and (validated or not validate):
            maps[key] = hit  # most recently used
            return all_ids, token_map
    ps = cache.page_size
    tensors = [as_page_ids(ids, cache.num_pages, cache.device, what=f"page_ids[{s}]",
                           check_values=validate) for s, ids in enumerate(lists)]
    starts, virt = [], 0
    for s, (ids, n, off) in enumerate(zip(tensors, plan.seq_lens, offsets, strict=True)):
        if ids.numel() * ps < off + n:
            after = f" after the {off} already there" if off else ""
            raise ValueError(f"page_ids[{s}]: a sequence of {n} tokens{after} needs "
                             f"{-(-(off + n) // ps)} pages of {ps}, got {ids.numel()}")
        starts.append(np.arange(n, dtype=np.int64) + virt + off)
        virt += ids.numel() * ps
    targets = np.concatenate(starts)  # global position -> request-local token
    host_map = torch.full((int(targets[-1]) + 1,), -1, dtype=torch.int64)
    host_map[torch.from_numpy(targets)] = plan.gather_index
    if cache.device.type == "cuda":  # one pinned, asynchronous copy, then cached
        token_map = host_map.pin_memory().to(cache.device, non_blocking=True)
    else:
        token_map = host_map.to(cache.device)
    all_ids = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    if validate:  # a page listed twice would be written twice (a race): refused, once
        as_page_ids(all_ids, cache.num_pages, cache.device, unique=True)
    refs = [weakref.ref(plan)] + [weakref.ref(ids) for ids in lists
                                  if isinstance(ids, torch.Tensor)]
    maps[key] = (refs, all_ids, token_map, validate)
    while len(maps) > _MAP_CACHE_SIZE:
        maps.pop(next(iter(maps)))
    return all_ids, token_map


def _layer_range(cache: PagedKVCache, layers) -> range:
    if is_int(layers):
        if not 0 <= layers < cache.num_layers:
            raise ValueError(f"layers: expected a layer in [0, {cache.num_layers}), got {layers}")
        return range(layers, layers + 1)
    return as_range(layers, cache.num_layers, "layers")


def _local_blocks(local: Mapping[str, torch.Tensor], cache: PagedKVCache, n_layers: int,
                  one_layer: bool, n_local: int) -> list[torch.Tensor]:
    """Validate the local shard; per component, uint8 ``[layers, n_local, heads, head bytes]``.

    Rows past ``n_local`` (a runner's padding, e.g. CUDA-graph buckets) are ignored."""
    if not isinstance(local, Mapping):
        raise TypeError(f"local: expected a mapping of component name -> tensor, "
                        f"got {type(local).__name__}")
    if sorted(local) != sorted(cache.component_names):
        raise ValueError(f"local: expected components {cache.component_names}, "
                         f"got {sorted(local)}")
    out = []
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
        if t.dim() != 4 or tuple(t.shape[:1] + t.shape[2:]) != want[:1] + want[2:] \
                or t.shape[1] < n_local:
            shape = "[tokens, heads, head_dim]" if one_layer else \
                "[layers, tokens, heads, head_dim]"
            raise ValueError(f"local[{spec.name!r}]: expected {shape} = "
                             f"{want[1:] if one_layer else want} (this rank owns {n_local} "
                             f"tokens of the plan; padding rows after them are allowed), got "
                             f"{tuple(local[spec.name].shape)}")
        t = t[:, :n_local]
        if t.stride(-1) != 1:
            t = t.contiguous()
        out.append(t.view(torch.uint8) if t.dtype != torch.uint8 else t)
    return out


def _all_gather(out: torch.Tensor, mine: torch.Tensor, group):
    """In-place all-gather; ``all_gather_single`` where torch has it (2.13+), else
    ``all_gather_into_tensor`` (torch 2.6+)."""
    fn = getattr(dist, "all_gather_single", None)
    if fn is not None:
        return fn(out, mine, group=group, async_op=True)
    return dist.all_gather_into_tensor(out, mine, group=group, async_op=True)


def _check_group(slot, group) -> None:
    """A slot of a symmetric / host-shared arena is only symmetric over the arena's group."""
    if not isinstance(slot, Slot):
        return
    arena = slot.arena
    if arena.backend not in ("symmetric", "host-shared"):
        return
    world = dist.group.WORLD
    mine = arena.group if arena.group is not None else world
    theirs = group if group is not None else world
    if mine is not theirs:
        raise ValueError("group: expected the process group the slot's arena was registered "
                         "with (its offsets are only symmetric there), got another group")


def all_gather_kv(local: Mapping[str, torch.Tensor], plan: SplitPlan, cache: PagedKVCache,
                  page_ids, *, slot: Slot | torch.Tensor, group=None, layers=None,
                  token_offset=0, timeout: float = 60.0, backend: str = "auto",
                  validate: bool = True) -> GatherDone:
    """All-gather every CP rank's K/V shard into this rank's paged pool, in sequence order.

    Collective over ``group``: every rank calls it with the same plan, layers and page ids.

    Args:
        local: component name -> this rank's shard, rows in the plan's local order. One layer
            (``layers`` an int): ``[rows, heads, head_dim]`` (MLA: ``[rows, dim]`` too);
            several layers: ``[n_layers, rows, heads, head_dim]``. ``rows`` >=
            ``n_local = len(plan.positions[rank])``; rows past n_local (a runner's padding)
            are ignored.
        plan: the split (`zigzag_split` / `interleave_split` / `SplitPlan.from_positions`);
            its cp_size is the group size.
        cache: this rank's pool; tokens go to every sequence's pages in sequence order.
        page_ids: per sequence, its page ids (a tensor, numpy array or list of ints; one for a
            single sequence).
        slot: a staging slot (or uint8 tensor) of at least ``gather_nbytes(cache, plan, layers=)``
            bytes, at the same arena offset on every rank; a slot of a symmetric or
            host-shared arena must be gathered over that arena's group.
        group: the CP process group (default: the world).
        layers: an int (layer-at-a-time, as a model runner calls it in the forward pass), a
            range, or None for all layers.
        token_offset: tokens already in each request's pages (chunked prefill: chunk k lands
            right after chunk k-1, mid-page, leaving the earlier tokens untouched).
        timeout: seconds to wait for the group (gloo) before raising GatherTimeoutError; NCCL
            is never waited on by the host (its process-group timeout applies).
        backend, validate: as in `cpkv.kernels.pack_pages`.

    Returns:
        `GatherDone`. CPU: the pool holds the bytes on return. CUDA: the last reorganize is
        queued on the current stream; use ``done.wait()`` / ``done.synchronize()``.

    Example (on each of 2 ranks, gloo)::

        plan = zigzag_split([1000, 300], 2)     # SGLang's batch order
        slot = arena.alloc(gather_nbytes(cache, plan, layers=layer))
        all_gather_kv({"k": k_local, "v": v_local}, plan, cache, [ids_a, ids_b], slot=slot,
                      layers=layer)
    """
    if not isinstance(plan, SplitPlan):
        raise TypeError(f"plan: expected a SplitPlan, got {type(plan).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    one_layer = is_int(layers)
    layer_range = _layer_range(cache, layers)
    if world != plan.cp_size:
        raise ValueError(f"plan: expected cp_size equal to the group size {world}, "
                         f"got {plan.cp_size}")
    _check_group(slot, group)
    n_local = len(plan.positions[rank])
    blocks = _local_blocks(local, cache, len(layer_range), one_layer, n_local)
    region = cache.packed_nbytes(plan.padded_len, layers=layer_range)
    buf = slot.tensor if isinstance(slot, Slot) else slot
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError("slot: expected a staging Slot or a 1-D uint8 tensor")
    if buf.device != cache.device:
        raise ValueError(f"slot: expected device {cache.device}, got {buf.device}")
    if not buf.is_contiguous():
        raise ValueError(f"slot: expected a contiguous tensor, got stride {buf.stride()}")
    if buf.numel() < world * region:
        raise ValueError(f"slot: expected at least {world * region} bytes ({world} ranks x "
                         f"{region}), got {buf.numel()}")
    buf = buf[:world * region]
    all_ids, token_map = split_token_map(plan, cache, page_ids, token_offset=token_offset,
                                         validate=validate)
    # The ids were checked (range, distinct) when the map was built, and the map is right by
    # construction: a repeated layer-by-layer call costs no device synchronisation.
    host_wait = cache.device.type != "cuda"  # CUDA: NCCL's own timeout, never the host

    # Layer chunks of >= GATHER_CHUNK_BYTES gathered, each its own slice of the slot holding its
    # own rank regions: every chunk's gather is issued at once (the group runs them in order)
    # and chunk k is reorganized while chunk k+1 is still on the wire. A rank's region is a
    # packed slot of padded_len tokens over the chunk's layers; component c of every layer is
    # one strided view of it (`PackedFormat.component_view`), so one copy moves it.
    padded = plan.padded_len
    pending = []
    for chunk, where in gather_chunks(cache, plan, layers=layer_range):
        l0 = chunk.start - layer_range.start
        part = buf[where]
        mine = part.view(world, -1)[rank]
        rank_fmt = cache.packed_format(padded, layers=chunk)
        for c, block in enumerate(blocks):
            rank_fmt.component_view(mine, c)[0, :, :n_local].copy_(block[l0:l0 + len(chunk)])
        pending.append((chunk, part, _all_gather(part, mine, group)))
    for chunk, part, work in pending:
        if not host_wait:
            work.wait()  # orders the current stream after the collective; the host goes on
        else:
            try:
                work.wait(timeout=datetime.timedelta(seconds=timeout))
            except RuntimeError as e:
                raise GatherTimeoutError(f"all_gather_kv: the CP group ({world} ranks) did "
                                         f"not complete the all-gather within {timeout} s; a "
                                         f"rank failed or is missing ({e})") from e
        reorganize_pages(part, cache, all_ids, token_map, rows_per_rank=padded,
                         layers=chunk, backend=backend, validate=False)
    if cache.device.type != "cuda":
        return GatherDone()
    with torch.cuda.device(cache.device):
        event = torch.cuda.Event()
        event.record()
    return GatherDone(event, cache.device)
