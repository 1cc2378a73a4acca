"""Transfer figures: (b) time per request vs page size, packed vs direct vs the raw write, one
panel per shape; (c) speedup of packed over direct vs tokens per request."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title

STYLE = {"raw-write": (GREYS[2], "--"), "direct": (GREYS[0], "-"),
         "cpkv-auto": ("#edae49", ":"), "cpkv-packed": (OURS, "-")}  # ours last, on top


def _tokens_with_direct(rows, shape) -> int:
    """The largest request size at which the direct baseline was measured (else the largest)."""
    with_direct = {r["tokens"] for r in pick(rows, shape=shape, provider="direct")}
    return max(with_direct or {r["tokens"] for r in pick(rows, shape=shape)})


def _panels(rows):
    """One log-log panel per shape, sharing the y axis."""
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.1 * len(shapes), 3.5), sharey=True,
                             squeeze=False)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    return fig, list(zip(axes[0], shapes, strict=True))


def _finish(fig, panels, ylabel: str, what: str, rows, path: Path) -> Path:
    panels[0][0].set_ylabel(ylabel)
    panels[-1][0].legend(fontsize=7)
    title(fig, what, rows)
    return save(fig, path)


def plot_times(rows, out: Path) -> Path:
    times = pick(rows, metric="time")
    fig, panels = _panels(times)
    for ax, shape in panels:
        tokens = _tokens_with_direct(times, shape)
        for provider, (color, style) in STYLE.items():
            pts = sorted((r["page_size"], r["p50"], r["p20"], r["p80"])
                         for r in pick(times, shape=shape, provider=provider, tokens=tokens))
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            ours = provider == "cpkv-packed"
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        fmt=style, marker="o", color=color, linewidth=2.2 if ours else 1.2,
                        label=provider, capsize=2, zorder=3 if ours else 2)
        sizes = sorted({r["page_size"] for r in times})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("page size (tokens)")
        ax.set_title(f"shape {shape}, {tokens} tokens", fontsize=9)
    return _finish(fig, panels, "ms per request (p50, p20-p80)",
                   "Transfer per request (pack + write + unpack), fragmented ids, Mooncake TCP",
                   rows, out / "transfer.png")


def plot_speedup(rows, out: Path) -> Path:
    sp = pick(rows, metric="speedup_vs_direct")
    fig, panels = _panels(sp)
    for ax, shape in panels:
        for i, ps in enumerate(sorted({r["page_size"] for r in sp})):
            pts = sorted((r["tokens"], r["p50"]) for r in pick(sp, shape=shape, page_size=ps))
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", color=OURS, alpha=0.45 + 0.25 * i,
                        linewidth=2, label=f"page_size {ps}")
        ax.axhline(1.0, color=GREYS[2], linewidth=1)
        ax.set_xlabel("tokens per request")
        ax.set_title(f"shape {shape}", fontsize=9)
    return _finish(fig, panels, "packed speedup over direct (x)",
                   "cpkv packed vs the per-page direct baseline, fragmented ids", rows,
                   out / "speedup.png")


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = load(results / "transfer.csv")
    paths = [plot_times(rows, out)]
    if pick(rows, metric="speedup_vs_direct"):
        paths.append(plot_speedup(rows, out))
    return paths
