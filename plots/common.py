"""Reading the long-format CSVs and styling figures the same way everywhere."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cpkv.report import results_dir  # noqa: E402

RESULTS = results_dir()
OURS = "#d1495b"  # cpkv stands out; baselines and ceilings are grey
GREYS = ["#4d4d4d", "#8c8c8c", "#b3b3b3"]


def read_rows(path: Path, what: str = "results", command: str = "cpkv bench") -> list[dict]:
    """A CSV's rows as dicts of strings; a missing file says which command writes it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {what} yet (run `{command}` first)")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load(path: Path) -> list[dict]:
    """Rows of the latest run per device (a run shares one timestamp)."""
    rows = read_rows(path)
    latest = {}
    for r in rows:
        latest[r["device"]] = max(latest.get(r["device"], ""), r["timestamp"])
    rows = [r for r in rows if r["timestamp"] == latest[r["device"]]]
    for r in rows:
        for k in ("p50", "p20", "p80"):
            r[k] = float(r[k]) if r[k] not in ("", None) else float("nan")
        for k in ("page_size", "tokens"):
            r[k] = int(r[k])
    return rows


def pick(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def title(fig, what: str, rows) -> None:
    r = rows[0]
    fig.suptitle(f"{what}\n{r['device']} | torch {r['torch']} | triton {r['triton']} | "
                 f"mooncake {r['mooncake'] or '-'} | {r['git_sha']}", fontsize=9)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
