"""CP gather: the bare all-gather vs all-gather + reorganize into the paged pool."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = pick(load(results / "cp.csv"), metric="time")
    keys = sorted({(r["shape"], r["tokens"]) for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = (("all-gather-one-call", GREYS[2]), ("all-gather", GREYS[1]),
            ("cpkv-gather+reorganize", OURS))
    bars = [b for b in bars if pick(rows, provider=b[0])]
    width = 0.8 / len(bars)
    for j, (provider, color) in enumerate(bars):
        ys = [pick(rows, shape=s, tokens=t, provider=provider)[0]["p50"] for s, t in keys]
        label = {"all-gather": "all-gather (same chunks)"}.get(provider, provider)
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(keys))], ys, width,
               color=color, label=label)
    ax.set_xticks(range(len(keys)), [f"{s}\n{t} tok" for s, t in keys])
    ax.set_ylabel("ms per request (p50)")
    ax.legend(fontsize=8)
    title(fig, "CP all-gather alone vs gather + reorganize into the pool (2 ranks)", rows)
    return [save(fig, out / "cp.png")]
