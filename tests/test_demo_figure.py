"""The demo's figure (plots/plot_demo.py, from the CSV the demo writes) reads at a glance:
every label inside the image, a linear axis when the bars lie within a decade, a log axis past
one."""

from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cpkv.report import CsvWriter, provenance  # noqa: E402
from plots import plot_demo  # noqa: E402


def write_demo_csv(folder: Path, times: dict) -> None:
    writer = CsvWriter(folder / "demo.csv", provenance(torch.device("cpu")))
    base = dict(op="demo", shape="A-cp2", page_size=16, tokens=1024, pattern="fragmented",
                unit="ms", metric="time")
    for provider, (p50, p20, p80) in times.items():
        writer.write(provider=provider, p50=p50, p20=p20, p80=p80, **base)


@pytest.mark.parametrize("direct_ms,scale", [(271.2, "linear"), (12000.0, "log")])
def test_axis_and_nothing_cut_off(tmp_path, monkeypatch, direct_ms, scale):
    write_demo_csv(tmp_path, {"cp-gather+reorganize": (235.4, "", ""),
                              "raw-write": (539.6, "", ""),
                              "cpkv-packed": (283.0, 193.0, 310.0),
                              "direct": (direct_ms, direct_ms * 0.6, direct_ms * 1.7)})
    figures = []
    monkeypatch.setattr(plot_demo, "save", lambda fig, path: figures.append(fig) or path)
    assert plot_demo.plot(tmp_path, tmp_path) == [tmp_path / "demo.png"]
    fig = figures[0]
    fig.tight_layout()  # as plots.common.save lays it out
    ax = fig.axes[0]
    assert ax.get_xscale() == scale
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # every drawn artist, in inches
    width, height = fig.get_size_inches()
    assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width + 0.01 \
        and drawn.y1 <= height + 0.01, f"something is cut off: {drawn} in {width} x {height}"
    labels = {t.get_text() for t in ax.texts}
    assert f"{direct_ms:.1f} ms" in labels and "283.0 ms" in labels
    right = ax.get_window_extent().x1
    assert all(t.get_window_extent().x1 <= right for t in ax.texts), "a value past the axes"
    plt.close(fig)
