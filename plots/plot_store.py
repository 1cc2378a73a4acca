"""Store figure: put and get bandwidth through cpkv's store tier vs one raw object of the same
bytes, against page size, one panel per shape (largest request size measured)."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title

STYLE = {"raw-put": (GREYS[1], "--", "s"), "raw-get": (GREYS[1], ":", "o"),
         "cpkv-put": (OURS, "-", "s"), "cpkv-get": (OURS, ":", "o")}


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = pick(load(results / "store.csv"), metric="bandwidth")
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.4 * len(shapes), 3.4), sharey=True,
                             squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        tokens = max(r["tokens"] for r in pick(rows, shape=shape))
        for provider, (color, style, marker) in STYLE.items():
            pts = sorted((r["page_size"], r["p50"], r["p20"], r["p80"])
                         for r in pick(rows, shape=shape, provider=provider, tokens=tokens))
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            ours = provider.startswith("cpkv")
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        fmt=style, marker=marker, color=color, linewidth=2.0 if ours else 1.2,
                        label=provider, capsize=2, zorder=3 if ours else 2)
        sizes = sorted({r["page_size"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("store page size (tokens)")
        ax.set_title(f"shape {shape}, {tokens} tokens", fontsize=9)
    axes[0][0].set_ylabel("GB/s (p50, p20-p80)")
    axes[0][-1].legend(fontsize=7)
    title(fig, "Store put/get of one prompt: cpkv (batched pages) vs one raw object, "
               "Mooncake Store TCP loopback", rows)
    return [save(fig, out / "store.png")]
