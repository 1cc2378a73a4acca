"""Markdown tables of the headline ratios, from the CSVs alone (pasted into the README).

    python -m plots.headlines
"""

from __future__ import annotations

from plots.common import RESULTS, load, pick


def _grid(rows, metric, provider, op=None, tokens=None) -> list[str]:
    rows = pick(rows, metric=metric, provider=provider, **({"op": op} if op else {}))
    tokens = tokens or max(r["tokens"] for r in rows)
    rows = [r for r in rows if r["tokens"] == tokens and r["pattern"] == "fragmented"]
    shapes = sorted({r["shape"] for r in rows})
    sizes = sorted({r["page_size"] for r in rows})
    out = ["| shape | " + " | ".join(f"page_size {p}" for p in sizes) + " |",
           "| --- |" + " --- |" * len(sizes)]
    for s in shapes:
        cells = [f"{pick(rows, shape=s, page_size=p)[0]['p50']:.2f}" for p in sizes]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    k = load(RESULTS / "kernels.csv")
    for op in ("pack", "unpack"):
        print(f"Kernels, {op} (torch path), fragmented, "
              f"{max(r['tokens'] for r in k)} tokens: bandwidth / same-run copy\n")
        print("\n".join(_grid(k, "ratio_to_copy", "cpkv-torch", op)) + "\n")
    t = load(RESULTS / "transfer.csv")
    print(f"Transfer, packed end to end / raw one-descriptor write (throughput), "
          f"{max(r['tokens'] for r in t)} tokens\n")
    print("\n".join(_grid(t, "throughput_vs_raw", "cpkv-packed")) + "\n")
    for metric, what in (("speedup_vs_direct", "packed speedup over direct"),
                         ("time_vs_best_mode", "auto (cost model) time / the better mode")):
        rows = pick(t, metric=metric)
        if rows:
            for tokens in sorted({r["tokens"] for r in rows}):
                print(f"Transfer, {what}, {tokens} tokens (blank: direct not timed)\n")
                shapes = sorted({r["shape"] for r in rows})
                sizes = sorted({r["page_size"] for r in t})
                print("| shape | " + " | ".join(f"page_size {p}" for p in sizes) + " |")
                print("| --- |" + " --- |" * len(sizes))
                for s in shapes:
                    cells = [pick(rows, shape=s, page_size=p, tokens=tokens) for p in sizes]
                    print(f"| {s} | " + " | ".join(f"{c[0]['p50']:.2f}" if c else ""
                                                   for c in cells) + " |")
                print()
    c = load(RESULTS / "cp.csv")
    print("CP gather + reorganize / bare all-gather (2 ranks, gloo)\n")
    print("| shape | tokens | vs the same chunks | vs one all-gather call |\n"
          "| --- | --- | --- | --- |")
    for r in sorted(pick(c, metric="time_vs_allgather"), key=lambda r: (r["shape"], r["tokens"])):
        one = pick(c, metric="time_vs_allgather_one_call", shape=r["shape"], tokens=r["tokens"])
        print(f"| {r['shape']} | {r['tokens']} | {r['p50']:.2f} | "
              f"{one[0]['p50']:.2f} |" if one else "| |")


if __name__ == "__main__":
    main()
