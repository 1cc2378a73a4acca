"""The demo's figure (``cpkv demo`` writes ``out/demo.csv``, then draws ``out/demo.png`` from it):
per step of a request, ms per request, median of the warm requests (p20-p80 whiskers where the
demo measured them). cpkv's own modes stand out; the CP gather, the raw one-descriptor write
(the wire's ceiling) and the direct baseline are grey. A linear axis unless the bars span more
than a decade (a direct send at page size 1 can take 100x a packed one): then a log axis."""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from plots.common import GREYS, OURS, load, pick, plt, save, title

LOG_SPAN = 10  # bars spanning more than this factor get a log axis


def plot(results: Path, out: Path) -> list[Path]:
    """``results/demo.csv`` (its latest run) -> ``out/demo.png``."""
    rows = pick(load(results / "demo.csv"), op="demo", metric="time")
    if not rows:
        raise ValueError(f"{results / 'demo.csv'}: no demo rows")
    labels = [r["provider"] for r in rows]
    ms = [r["p50"] for r in rows]
    # a bar's right end: its whisker where it has one (NaN compares false: the median)
    ends = [r["p80"] if r["p80"] > r["p50"] else r["p50"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(rows) + 1.7))
    ys = range(len(rows))
    ax.barh(ys, ms, color=[OURS if p.startswith("cpkv") else GREYS[1] for p in labels],
            height=0.6)
    for y, r in zip(ys, rows, strict=True):
        if r["p20"] == r["p20"]:  # measured spread (not NaN): whiskers
            ax.plot([r["p20"], r["p80"]], [y, y], color=GREYS[0], linewidth=1)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()  # in the order the demo measured them, top down
    log = max(ms) > LOG_SPAN * min(ms)
    if log:
        ax.set_xscale("log")
        # labels at 1-2-5 steps only: the default labels minor ticks too within a decade
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(ms) / 2, max(ends) * 4)  # room right of the longest bar for its value
    else:
        ax.set_xlim(0, max(ends) * 1.3)
    for y, v, end in zip(ys, ms, ends, strict=True):  # each value right of its bar and whisker
        ax.text(end * 1.08 if log else end + max(ends) * 0.02, y, f"{v:.1f} ms", va="center",
                fontsize=8)
    ax.set_xlabel("ms per request: median of the warm requests, line p20-p80"
                  + (" (log axis)" if log else ""),
                  fontsize=9)
    r = rows[0]
    title(fig, f"cpkv demo: shape {r['shape']}, {r['tokens']} tokens, page size "
               f"{r['page_size']}\na transfer runs from both sides ready to the pool holding "
               f"the bytes", rows)
    return [save(fig, out / "demo.png")]
