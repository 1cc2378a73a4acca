"""Layer-wise figure: exposed transfer (last layer computed -> Success) as a fraction of the
non-overlapped transfer, vs the per-layer compute/transfer ratio; send after prefill vs layer by
layer, one panel per shape and page size; the 20% target dashed."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title

STYLE = {"send-after-prefill": (GREYS[0], "--"), "layer-by-layer": (OURS, "-")}


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = pick(load(results / "layerwise.csv"), metric="exposed_fraction")
    if not rows:
        raise ValueError("layerwise.csv: no exposed_fraction rows")
    configs = sorted({(r["shape"], r["page_size"]) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(2.8 * len(configs), 3.3), sharey=True,
                             squeeze=False)
    for ax, (shape, ps) in zip(axes[0], configs, strict=True):
        for provider, (color, style) in STYLE.items():
            pts = sorted((float(r["pattern"].removeprefix("compute").removesuffix("x")),
                          r["p50"], r["p20"], r["p80"])
                         for r in pick(rows, shape=shape, page_size=ps, provider=provider))
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=[[max(y - a, 0) for y, a in zip(ys, lo, strict=True)],
                                      [max(b - y, 0) for y, b in zip(ys, hi, strict=True)]],
                        fmt=style, marker="o", color=color, capsize=2, label=provider)
        ax.axhline(0.2, color=GREYS[2], linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.5, 1, 2], ["0.5", "1", "2"])
        ax.set_xlabel("compute / transfer per layer")
        tokens = rows[0]["tokens"]
        ax.set_title(f"shape {shape}, page {ps}, {tokens} tok", fontsize=9)
    axes[0][0].set_ylabel("exposed / non-overlapped transfer")
    axes[0][-1].legend(fontsize=7)
    title(fig, "Transfer left after the last prefill layer (p50, p20-p80)", rows)
    return [save(fig, out / "layerwise.png")]
