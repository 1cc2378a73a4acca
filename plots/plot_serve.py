"""Serving figure (``benchmarks/results/serve.csv``, `cpkv bench serve`): requests per second
against requests in flight, cpkv next to raw writes of the same bytes at the same concurrency
(one panel per request size), and one request's p50 latency against its size."""

from __future__ import annotations

from pathlib import Path

from plots.common import GREYS, OURS, RESULTS, load, pick, plt, save, title


def _inflight(r) -> int:
    return int(r["pattern"].removeprefix("inflight"))


def plot(results: Path = RESULTS, out: Path = Path("plots")) -> list[Path]:
    rows = [r for r in load(results / "serve.csv") if r["pattern"].startswith("inflight")]
    rated = sorted({r["tokens"] for r in rows if _inflight(r) > 1})
    fig, axes = plt.subplots(1, len(rated) + 1, figsize=(4.0 * (len(rated) + 1), 3.6),
                             squeeze=False)
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
    ax = axes[0][-1]
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
    title(fig, "Serving: one prefill and one decode process, shape A, pages of 16", rows)
    return [save(fig, out / "serve.png")]
