"""What a request costs, to choose direct or packed per request (`KVSender(mode="auto")`).

`CostModel`, calibrated on the machine:

    direct  = descriptors * per_descriptor_s + bytes / wire_Bps
    packed  = packed_fixed_s + bytes / pack_Bps + bytes / wire_Bps + bytes / unpack_Bps

The constants come from ``cpkv bench transfer --calibrate`` (written to the file named by
``CPKV_COST_FILE``, default ``~/.cache/cpkv/transfer_cost.json``); without one, the defaults
measured on this project's CPU machines (Mooncake TCP loopback) are used.

`descriptors_per_request`: how many transfer descriptors the CP senders of one request use in
either mode (the demo and `cpkv bench transfer` count so).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..cp.partition import page_share
from ..layout import PackedFormat
from ..parallel import LAYER_GROUP_BYTES, layer_groups, tokens_of_pages
from .direct import direct_descriptors

__all__ = ["CostModel", "cost_file", "descriptors_per_request"]


def cost_file() -> Path:
    return Path(os.environ.get("CPKV_COST_FILE",
                               Path.home() / ".cache" / "cpkv" / "transfer_cost.json"))


@dataclass(frozen=True)
class CostModel:
    # `cpkv bench transfer --calibrate` on this project's CPU machines, Mooncake TCP loopback
    per_descriptor_s: float = 28.7e-6  # 4,096 descriptors of 256 B
    wire_Bps: float = 2.10e9  # one 256 MiB descriptor
    pack_Bps: float = 13.4e9  # torch path, shape A, pages of 16, payload bytes per second
    unpack_Bps: float = 13.2e9
    packed_fixed_s: float = 1.08e-3  # one tiny packed request: the control-plane round trips

    def direct_s(self, descriptors: int, nbytes: int) -> float:
        return descriptors * self.per_descriptor_s + nbytes / self.wire_Bps

    def packed_s(self, nbytes: int) -> float:
        return (self.packed_fixed_s + nbytes / self.pack_Bps + nbytes / self.wire_Bps
                + nbytes / self.unpack_Bps)

    def choose(self, descriptors: int, nbytes: int) -> str:
        """"direct" or "packed", whichever the model predicts faster."""
        return "direct" if self.direct_s(descriptors, nbytes) < self.packed_s(nbytes) \
            else "packed"

    @classmethod
    def load(cls, path: Path | None = None) -> CostModel:
        """The calibrated constants if a file exists, else the shipped defaults."""
        path = Path(path) if path is not None else cost_file()
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"device", "measured"}
        if unknown:
            raise ValueError(f"{path}: unknown cost constants {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in data.items() if k in known})

    def save(self, path: Path | None = None, **extra) -> Path:
        path = Path(path) if path is not None else cost_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), **extra}, indent=2) + "\n")
        return path


def descriptors_per_request(mode: str, src_ids, dst_ids, fmt: PackedFormat, page_size: int,
                            cp: int = 1, *, full_pages: bool = True) -> int:
    """Descriptors ``cp`` senders (each its page share) use for one request of format ``fmt``
    in ``mode``: per layer group when packed, per (block x page run) when direct (per token
    for a head slice: ``full_pages=False``)."""
    blocks = fmt.num_layers * len(fmt.components)
    total = 0
    for r in range(cp):
        share = page_share(len(src_ids), cp, r)
        tokens = tokens_of_pages(share, page_size, fmt.num_tokens)
        if not tokens:
            continue
        if mode == "direct":
            total += direct_descriptors(src_ids[share.start:share.stop],
                                        dst_ids[share.start:share.stop], len(tokens), blocks,
                                        full_pages=full_pages)
        else:
            layer_nbytes = fmt.segment(tokens.start, tokens.stop, 0, 1).nbytes
            total += len(layer_groups(fmt.num_layers, layer_nbytes, LAYER_GROUP_BYTES))
    return total
