"""The one collective cpkv runs itself: an element-wise MIN over process groups (a CP/TP group
agreeing on each request's status, store ranks agreeing on a prefix hit).

A collective's tensor must live where the group's backend reduces: the CPU for gloo, the
current CUDA device for NCCL (which refuses CPU tensors). `group_device` picks it, so one call
works on either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["group_device", "group_min"]


def group_device(group=None) -> torch.device:
    """Where a tensor must be for a collective on ``group`` (None: the default group): the
    current CUDA device for an NCCL group, else the CPU (gloo, or a group with a CPU backend
    beside its CUDA one)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_min(values: Sequence[int], groups: Iterable) -> list[int]:
    """``values`` MIN-reduced element-wise over each group in turn (None: the default group;
    a group of one rank is skipped). Collective: every rank of every group passes equally many
    values, in the same order."""
    out = torch.tensor([int(v) for v in values], dtype=torch.int64)
    for group in groups:
        if group is None or dist.get_world_size(group) > 1:
            t = out.to(group_device(group))
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            out = t.cpu()
    return out.tolist()
