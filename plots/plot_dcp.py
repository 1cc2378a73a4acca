"""DCP figure: prefill CP 2 into decode DCP groups, packed against direct, per case (shape,
DCP size, interleave): time per request (bars, log scale) with the descriptors each mode
submitted written on them (``benchmarks/results/dcp.csv``, `cpkv bench transfer --dcp`)."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = load(results / "dcp.csv")
    cases = sorted({r["shape"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(cases)), 3.8))
    width = 0.38
    for i, case in enumerate(cases):
        for j, (provider, color) in enumerate((("cpkv-packed", OURS), ("direct", GREYS[1]))):
            (t,) = pick(rows, shape=case, provider=provider, metric="time") or [None]
            (d,) = pick(rows, shape=case, provider=provider, metric="descriptors") or [None]
            if t is None:
                continue
            x = i + (j - 0.5) * width
            ax.bar(x, t["p50"], width, color=color, label=provider if i == 0 else None,
                   yerr=[[t["p50"] - t["p20"]], [t["p80"] - t["p50"]]], capsize=2)
            if d is not None:
                ax.text(x, t["p80"] * 1.12, f"{int(d['p50']):,}", ha="center", fontsize=6,
                        rotation=90, va="bottom")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace("-cp2-", "\n") for c in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the labels
    ax.set_ylabel("ms per request (p50); labels: descriptors")
    ax.legend(fontsize=7)
    r = rows[0]
    title(fig, f"CP 2 prefill into decode DCP groups, {r['tokens']} tokens, pages of "
               f"{r['page_size']}", rows)
    return [save(fig, out / "dcp.png")]
