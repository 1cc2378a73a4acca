"""Plots of the GPU check: kernels.png (the project's kernel figure) and gpu_e2e.png (every op's
bandwidth as a fraction of the copy ceiling, device time vs end to end with host overhead).

    python scripts/gpu_plots.py --results DIR --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plots import plot_kernels  # noqa: E402
from plots.common import GREYS, OURS, load, pick, plt, save, title  # noqa: E402

OPS = ("pack", "unpack", "reorganize")


def plot_e2e(results: Path, out: Path) -> Path:
    rows = pick(load(results / "kernels.csv"), metric="ratio_to_copy")
    ours = sorted({r["provider"] for r in rows if r["provider"].startswith("cpkv")})[0]
    e2e_tokens = sorted({r["tokens"] for r in rows if r["provider"] == f"e2e-{ours}"})
    tokens = e2e_tokens[0] if e2e_tokens else max(r["tokens"] for r in rows)
    rows = pick(rows, tokens=tokens)
    configs = sorted({(r["shape"], r["page_size"]) for r in rows})
    fig, axes = plt.subplots(1, len(OPS), figsize=(12, 3.8), sharey=True)
    width = 0.27
    for ax, op in zip(axes, OPS, strict=True):
        for i, (prov, color, label) in enumerate((
                (ours, OURS, "device time"),
                (f"e2e-{ours}", GREYS[0], "end to end, validate=False"),
                (f"e2e-validate-{ours}", GREYS[1], "end to end, validate=True"))):
            ys = []
            for shape, ps in configs:
                r = pick(rows, op=op, provider=prov, shape=shape, page_size=ps)
                ys.append(r[0]["p50"] if r else float("nan"))
            ax.bar([x + (i - 1) * width for x in range(len(configs))], ys, width, color=color,
                   label=label)
        ax.axhline(1.0, color=GREYS[2], linewidth=1)
        ax.axhline(0.85, color=OURS, linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(configs)), [f"{s}\nps {ps}" for s, ps in configs], fontsize=7)
        ax.set_title(f"{op}, {tokens} tokens", fontsize=9)
    axes[0].set_ylabel("bandwidth / device copy of the same bytes")
    axes[-1].legend(fontsize=7, loc="lower right")
    title(fig, "cpkv kernels vs the copy ceiling: device time and end to end (dotted: 85%)",
          rows)
    return save(fig, out / "gpu_e2e.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    paths = plot_kernels.plot(args.results, args.out) + [plot_e2e(args.results, args.out)]
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
