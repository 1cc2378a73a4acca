"""Transfer time per request vs page size, one panel per shape: packed vs the raw write."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = pick(load(results / "transfer.csv"), metric="time")
    tokens = max(r["tokens"] for r in rows)
    rows_t = pick(rows, tokens=tokens)
    shapes = sorted({r["shape"] for r in rows_t})
    providers = sorted({r["provider"] for r in rows_t}, key=lambda p: p.startswith("cpkv"))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.3 * len(shapes), 3.4), sharey=True,
                             squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, provider in enumerate(providers):  # ours last: drawn on top
            pts = sorted((r["page_size"], r["p50"], r["p20"], r["p80"])
                         for r in pick(rows_t, shape=shape, provider=provider))
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            ours = provider.startswith("cpkv")
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        marker="o", color=OURS if ours else GREYS[i % len(GREYS)],
                        linewidth=2 if ours else 1, label=provider, capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["page_size"] for r in rows_t}))
        ax.set_xticklabels(sorted({r["page_size"] for r in rows_t}))
        ax.set_xlabel("page size (tokens)")
        ax.set_title(f"shape {shape}, {tokens} tokens", fontsize=9)
    axes[0][0].set_ylabel("ms per request (p50, p20-p80)")
    axes[0][-1].legend(fontsize=7)
    title(fig, "Transfer per request, Mooncake TCP loopback, pack + write + unpack", rows)
    return [save(fig, out / "transfer.png")]
