"""Store figure: cpkv's put/get time against Mooncake Store's own zero-copy calls on the same
keys and bytes (the anchor, ``ratio_to_anchor``), and how early a streaming load's first layer
group is in the pool (``first_fraction``), against prompt length, one column per shape."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, RESULTS, load, pick, plt, save, title

SHADES = {1: "#f08a93", 16: "#d1495b", 64: "#7a1e2c"}  # cpkv, one shade per store page size
TARGETS = {"put/get, page 16 and 64": 0.8, "put/get, page 1": 0.5}


def _line(ax, rows, color, style, marker, label) -> None:
    pts = sorted((r["tokens"], r["p50"], r["p20"], r["p80"]) for r in rows)
    if not pts:
        return
    xs, ys, lo, hi = zip(*pts, strict=True)
    ax.errorbar(xs, ys, yerr=[[max(y - a, 0) for y, a in zip(ys, lo, strict=True)],
                              [max(b - y, 0) for y, b in zip(ys, hi, strict=True)]],
                fmt=style, marker=marker, color=color, linewidth=1.6, capsize=2, label=label)


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = load(results / "store.csv")
    shapes = sorted({r["shape"] for r in rows})
    sizes = sorted({r["page_size"] for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 6.4), sharex=True,
                             squeeze=False)
    for col, shape in enumerate(shapes):
        top, bottom = axes[0][col], axes[1][col]
        for ps in sizes:
            color = SHADES.get(ps, GREYS[0])
            for provider, style, marker in (("cpkv-put", "-", "s"), ("cpkv-get", "--", "o")):
                _line(top, pick(rows, shape=shape, page_size=ps, provider=provider,
                                metric="ratio_to_anchor"),
                      color, style, marker, f"{provider.split('-')[1]}, page {ps}")
            _line(bottom, pick(rows, shape=shape, page_size=ps, provider="cpkv-stream",
                               metric="first_fraction"), color, "-", "^", f"page {ps}")
        for (what, y), style in zip(TARGETS.items(), ("--", ":"), strict=True):
            top.axhline(y, color=GREYS[1], linestyle=style, linewidth=1, label=f"target {what}")
        bottom.axhline(0.25, color=GREYS[1], linestyle="--", linewidth=1, label="target")
        top.set_title(f"shape {shape}", fontsize=9)
        top.set_ylim(0, 1.2)
        bottom.set_ylim(0, max(0.5, *(r["p80"] for r in pick(rows, shape=shape,
                                                                 metric="first_fraction"))))
        bottom.set_xscale("log", base=2)
        bottom.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("anchor time / cpkv time (p50)")
    axes[1][0].set_ylabel("streaming load: first layer group\n/ whole load (p50)")
    axes[0][-1].legend(fontsize=6, ncol=2)
    axes[1][-1].legend(fontsize=6)
    title(fig, "Store: cpkv vs Mooncake's batch_put_from / batch_get_into\n(same keys, "
               "same page-major bytes, one client)", rows)
    return [save(fig, out / "store.png")]
