"""Serving figure (``benchmarks/results/serve.csv``, `cpkv bench serve`): requests per second
against requests in flight, cpkv next to raw writes of the same bytes at the same concurrency
(one panel per request size), one request's p50 latency against its size, and where that
request's time goes (pack, wire, unpack, the rest, each over the request's p50)."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title


def _inflight(r) -> int:
    return int(r["pattern"].removeprefix("inflight"))


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = [r for r in load(results / "serve.csv") if r["pattern"].startswith("inflight")]
    rated = sorted({r["tokens"] for r in rows if _inflight(r) > 1})
    staged = sorted({r["tokens"] for r in pick(rows, pattern="inflight1", metric="stage_pack")})
    panels = len(rated) + 1 + bool(staged)
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 3.6), squeeze=False)
    for ax, tokens in zip(axes[0], rated, strict=False):
        for provider, color, style in (("cpkv", OURS, "-o"), ("raw", GREYS[0], "--s")):
            pts = sorted((_inflight(r), r["p50"]) for r in pick(
                rows, tokens=tokens, provider=provider, metric="requests_per_s"))
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("requests / s (p50 of rounds)")
        ax.set_title(f"{tokens} tokens", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    ax = axes[0][len(rated)]
    for provider, color, style in (("cpkv", OURS, "-o"), ("raw", GREYS[0], "--s")):
        pts = sorted((r["tokens"], r["p50"]) for r in pick(
            rows, pattern="inflight1", provider=provider, metric="latency_p50"))
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color=color, label=provider)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per request (one in flight)")
    ax.set_ylabel("latency p50 (ms)")
    ax.legend(fontsize=7)
    if staged:
        _stages(axes[0][-1], rows, staged)
    title(fig, "Serving: one prefill and one decode process, shape A, pages of 16", rows)
    return [save(fig, out / "serve.png")]


STAGES = (("pack", OURS), ("wire", GREYS[0]), ("unpack", "#edae49"), ("other", GREYS[2]))


def _stages(ax, rows, sizes) -> None:
    """Per request size, each stage's p50 over the request's p50 latency (stages overlap once
    a request is cut into layer groups, so they may sum past 1); raw's latency as a tick."""
    width = 0.8 / len(STAGES)
    for i, (stage, color) in enumerate(STAGES):
        xs, ys = [], []
        for j, t in enumerate(sizes):
            total = next((r["p50"] for r in pick(rows, pattern="inflight1", tokens=t,
                                                 provider="cpkv", metric="latency_p50")), None)
            ms = next((r["p50"] for r in pick(rows, pattern="inflight1", tokens=t,
                                              metric=f"stage_{stage}")), None)
            if total and ms is not None:
                xs.append(j + (i - (len(STAGES) - 1) / 2) * width)
                ys.append(ms / total)
        ax.bar(xs, ys, width=width, color=color, label=stage)
    for j, t in enumerate(sizes):
        total = next((r["p50"] for r in pick(rows, pattern="inflight1", tokens=t,
                                             provider="cpkv", metric="latency_p50")), None)
        raw = next((r["p50"] for r in pick(rows, pattern="inflight1", tokens=t, provider="raw",
                                           metric="latency_p50")), None)
        if total and raw:
            ax.hlines(raw / total, j - 0.45, j + 0.45, colors="black", linestyles="--",
                      label="raw write" if j == 0 else None)
    ax.set_xticks(range(len(sizes)), [str(t) for t in sizes])
    ax.set_xlabel("tokens per request (one in flight)")
    ax.set_ylabel("stage p50 / request p50")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
