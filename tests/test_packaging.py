"""An installed cpkv is whole: `cpkv bench` and `cpkv plot` work from any directory, with the
sweeps and figures that ship in the wheel, and nothing asks git about site-packages."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, path, timeout=120):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(path), "MC_LOG_LEVEL": "ERROR"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the sources, unpacked as pip would install it."""
    pytest.importorskip("setuptools", reason="the build backend is needed to build the wheel")
    src = tmp_path_factory.mktemp("src")
    for name in ("cpkv", "benchmarks", "plots"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("results",
                                                                               "*.png",
                                                                               "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode and "No module named pip" in r.stderr:
        pytest.skip("pip is not available to build the wheel")  # visible in the summary
    assert r.returncode == 0, r.stderr
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(next(wheels.glob("cpkv-*.whl"))) as z:
        z.extractall(site)
    return site


def test_wheel_ships_the_sweeps_and_figures(installed):
    for rel in ("benchmarks/bench_transfer.py", "benchmarks/common.py", "plots/plot_transfer.py",
                "plots/common.py", "cpkv/parallel.py"):
        assert (installed / rel).is_file(), rel
    assert not (installed / "benchmarks" / "results").exists()  # results are not package data


def test_installed_commands_work_from_another_directory(installed, tmp_path):
    probe = ("import benchmarks.bench_transfer as b, plots.plot_transfer as p, cpkv.report as r;"
             "print(b.__file__, p.__file__, r.git_sha(), r.results_dir(), sep='\\n')")
    r = run(["-c", probe], tmp_path, installed)
    assert r.returncode == 0, r.stderr
    bench_file, plot_file, sha, results = r.stdout.split("\n")[:4]
    assert bench_file.startswith(str(installed)) and plot_file.startswith(str(installed))
    assert sha == "unknown"  # no checkout: git is not asked about site-packages
    assert Path(results) == tmp_path / "cpkv-results"
    r = run(["-m", "cpkv.cli", "bench", "transfer", "--help"], tmp_path, installed)
    assert r.returncode == 0 and "--quick" in r.stdout, r.stdout + r.stderr
    r = run(["-m", "cpkv.cli", "plot", "kernels"], tmp_path, installed)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path / 'cpkv-results' / 'kernels.csv'}: no results yet" in r.stderr


def test_a_shadowing_benchmarks_package_is_refused(installed, tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "bench_transfer.py").write_text("def main(argv): return 7\n")
    r = run(["-m", "cpkv.cli", "bench", "transfer"], tmp_path, installed)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "another 'benchmarks' package shadows it" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
