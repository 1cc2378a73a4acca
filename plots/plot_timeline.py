"""Timeline of one layer-by-layer request (benchmarks/results/timeline.csv, written by
`cpkv bench layerwise`): per layer group, when the prefill computed it, packed it, had it on
the wire, and when the decode side unpacked it; the exposed transfer (last layer computed ->
Success) is shaded."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, plt, read_rows, save, title

LANES = (("prefill", "compute", "prefill: compute", GREYS[1]),
         ("prefill", "pack", "prefill: pack", OURS),
         ("prefill", "wire", "on the wire", "#edae49"),
         ("decode", "unpack", "decode: unpack", "#00798c"))


def read(path: Path) -> list[dict]:
    rows = read_rows(path, "timeline", "cpkv bench layerwise")
    for r in rows:
        r["start_ms"], r["end_ms"] = float(r["start_ms"]), float(r["end_ms"])
        r["l0"], r["l1"] = int(r["l0"]), int(r["l1"])
    return rows


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = read(results / "timeline.csv")
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for y, (side, what, label, color) in enumerate(reversed(LANES)):
        spans = [r for r in rows if r["side"] == side and r["what"] == what]
        for i, r in enumerate(sorted(spans, key=lambda r: r["start_ms"])):
            ax.broken_barh([(r["start_ms"], max(r["end_ms"] - r["start_ms"], 0.05))],
                           (y - 0.35, 0.7), facecolors=color, alpha=0.55 + 0.45 * (i % 2),
                           edgecolor="white", linewidth=0.3)
        ax.text(-0.01, y, label, transform=ax.get_yaxis_transform(), ha="right",
                va="center", fontsize=8)
    done = [r for r in rows if r["what"] == "success"]
    if done:
        t0, t1 = done[0]["start_ms"], done[0]["end_ms"]
        ax.axvspan(t0, t1, color=OURS, alpha=0.12, zorder=0)
        ax.axvline(t0, color=GREYS[0], linewidth=1, linestyle="--")
        ax.axvline(t1, color=OURS, linewidth=1.2)
        ax.text(t1, len(LANES) - 0.45, f" Success\n exposed {t1 - t0:.1f} ms", fontsize=7,
                va="top", color=OURS)
        ax.text(t0, len(LANES) - 0.45, "last layer computed ", fontsize=7, va="top",
                ha="right", color=GREYS[0])
    ax.set_yticks([])
    ax.set_ylim(-0.6, len(LANES) - 0.4)
    ax.set_xlabel("ms since the request's prefill started (alternating shades: layer groups)")
    layers = max(r["l1"] for r in rows)
    try:
        prov = load(results / "layerwise.csv")
    except (FileNotFoundError, ValueError):
        prov = [{"device": "?", "torch": "?", "triton": "?", "mooncake": "?", "git_sha": "?"}]
    title(fig, f"One request sent layer by layer ({layers} layers, compute = transfer per "
               f"layer), Mooncake TCP", prov)
    return [save(fig, out / "timeline.png")]
