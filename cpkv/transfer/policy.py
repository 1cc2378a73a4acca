"""Choose direct or packed per request from a cost model calibrated on the machine.

    direct  = descriptors * per_descriptor_s + bytes / wire_Bps
    packed  = packed_fixed_s + bytes / pack_Bps + bytes / wire_Bps + bytes / unpack_Bps

The constants come from ``cpkv bench transfer --calibrate`` (written to the file named by
``CPKV_COST_FILE``, default ``~/.cache/cpkv/transfer_cost.json``); without one, the defaults
measured on this project's CPU machines (Mooncake TCP loopback) are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["CostModel", "cost_file"]


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
