"""Helpers for tests that involve other processes or threads: spawn a group of ranks once, let
each run every scenario, collect per-scenario results; meet through a folder (`publish` /
`lookup`); wait for a condition (`wait_for`, the suite's one polling loop); read /proc."""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path

from cpkv._net import free_port  # noqa: F401 - the tests' free port, from here


def spawn_group(target, world: int, *args, timeout: float = 300.0,
                port: int | None = None) -> list[dict]:
    """Run target(rank, world, port, out_path, *args) in `world` spawned processes.

    Each rank writes a JSON dict {scenario: "ok" | error text} to out_path; out_path's folder
    is shared by the group (`publish` / `lookup` there to meet). Every process is joined (or
    killed at the deadline); returns the ranks' dicts. ``port`` defaults to a free one (for the
    ranks' own rendezvous).
    """
    ctx = multiprocessing.get_context("spawn")
    port = free_port() if port is None else port
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"rank{r}.json" for r in range(world)]
        procs = [ctx.Process(target=target, args=(r, world, port, str(paths[r]), *args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if stuck:
            raise TimeoutError(f"ranks {stuck} did not finish within {timeout} s")
        results = []
        for r, path in enumerate(paths):
            if not path.exists():
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} "
                                   f"and wrote no results")
            results.append(json.loads(path.read_text()))
        return results


def publish(path, value) -> None:
    """Write ``value`` (JSON) to ``path`` at once: a `lookup` never reads half of it."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def lookup(path, timeout: float = 120.0):
    """The value another process `publish`-ed at ``path``, waiting for it up to ``timeout``
    seconds (TimeoutError naming the path after that)."""
    path = Path(path)
    wait_for(path.exists, timeout, f"a value published at {path}")
    return json.loads(path.read_text())


def wait_for(predicate, timeout: float = 10.0, what="condition", *, interval: float = 0.005,
             fail: bool = True):
    """Call ``predicate`` every ``interval`` seconds until it returns something true; return that.

    Once ``timeout`` seconds have passed, raise TimeoutError "<what> not met within <timeout>
    s"; ``what`` may be a callable, called only then, to name the state reached. With
    ``fail=False`` return the last false value instead, for a caller that reports the state
    itself (or for whom the bound is not a failure). A predicate may raise to end the wait at
    once (e.g. an assert that a process is still running)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            if not fail:
                return value
            raise TimeoutError(f"{what() if callable(what) else what} not met within "
                               f"{timeout} s")
        time.sleep(interval)
    return value


class Recorder:
    """Runs scenarios in a rank, recording "ok" or the error, and writes them out."""

    def __init__(self, path: str):
        self.path, self.results = path, {}

    def run(self, name: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
            self.results[name] = "ok"
        except Exception as e:  # recorded, asserted by the test in the parent
            self.results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"

    def save(self) -> None:
        Path(self.path).write_text(json.dumps(self.results))


def assert_ok(results: list[dict], name: str) -> None:
    for rank, res in enumerate(results):
        assert name in res, f"rank {rank} did not run {name!r} ({res.get('rank-setup', '')})"
        assert res[name] == "ok", f"rank {rank}, {name}: {res[name]}"


def _stat(pid) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone: this container reaps late)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid``, read from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(_stat(stat.parent.name)[1]) == pid:
                out.add(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return out
