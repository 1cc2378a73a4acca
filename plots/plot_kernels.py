"""Kernel bandwidth as a fraction of the same-run copy ceiling, vs row size and page size."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title

ROW_BYTES = {"B": 256, "C": 1152, "A": 2048}  # one token, one component, one layer


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = load(results / "kernels.csv")
    ratio = pick(rows, metric="ratio_to_copy", pattern="fragmented")
    tokens = max(r["tokens"] for r in ratio)
    ratio = pick(ratio, tokens=tokens)
    ours = next(p for p in {r["provider"] for r in ratio} if p.startswith("cpkv"))
    page_sizes = sorted({r["page_size"] for r in ratio})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, op in zip(axes, ("pack", "unpack"), strict=True):
        for provider, color, style in (("naive", GREYS[1], "--"), (ours, OURS, "-")):
            for i, ps in enumerate(page_sizes):
                pts = sorted((ROW_BYTES[r["shape"]], r["p50"])
                             for r in pick(ratio, op=op, provider=provider, page_size=ps))
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, marker="o", color=color, alpha=0.45 + 0.25 * i,
                        label=f"{provider}, page_size {ps}", linewidth=2 if color == OURS else 1)
        ax.axhline(1.0, color=GREYS[2], linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ROW_BYTES.values()), [f"{v} B\n({k})" for k, v in ROW_BYTES.items()])
        ax.set_xlabel("row size per token, layer, component (shape)")
        ax.set_title(f"{op}, {tokens} tokens, fragmented ids", fontsize=9)
    axes[0].set_ylabel("bandwidth / plain copy of the same bytes")
    axes[1].legend(fontsize=7, loc="lower right")
    title(fig, "cpkv pack/unpack vs the copy ceiling (read + write bytes)", rows)
    return [save(fig, out / "kernels.png")]
