"""An embedded `mooncake_master`: started on loopback with free ports, stopped with its owner.

The master is Mooncake Store's metadata service (where objects live, leases, eviction); the bytes
live in the clients' segments. `MasterProcess` runs one as a child process:

* ports: a free RPC port and a free metrics port on 127.0.0.1 (a port taken between probing and
  binding makes the master exit; it is retried on fresh ports);
* logs: stdout and stderr go to a file (``log_path``, ``log_text()``), quoted in start errors;
* lifetime: ``close()``/``with``/interpreter exit (atexit) stop it with SIGTERM, then SIGKILL,
  and delete its log folder (``stop()`` keeps the log);
  on Linux the child also gets PR_SET_PDEATHSIG, so a parent killed by SIGTERM/SIGKILL (no atexit)
  still takes its master down, and it runs in its own session, so a terminal's Ctrl-C reaches the
  parent only (which then stops it in order). No orphan on any of these paths.
  The parent-death signal follows the *thread* that forked the child, not the process: every
  master is therefore forked by one daemon thread of this module (`_Spawner`) that lives as long
  as the process, so a master made from a short-lived thread (a store built in a worker) lives
  as long as its owner object, never only as long as that thread.

Example::

    with MasterProcess() as master:       # master.address == "127.0.0.1:<port>"
        store = KVStore(page_size=16, master=master.address)
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path

from .._closing import Closing
from .._net import free_port, port_open

__all__ = ["MasterError", "MasterProcess", "find_master_binary"]

_PR_SET_PDEATHSIG = 1
_LIVE: weakref.WeakSet = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class MasterError(RuntimeError):
    """The master could not be found, started or reached."""


def find_master_binary() -> str:
    """Path of the `mooncake_master` the Mooncake wheel ships (PATH, the venv's bin, the wheel)."""
    candidates = [shutil.which("mooncake_master"),
                  str(Path(sys.executable).parent / "mooncake_master")]
    try:
        import mooncake

        candidates.append(str(Path(mooncake.__file__).parent / "mooncake_master"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise MasterError("mooncake_master not found on PATH, beside the interpreter or in the "
                      "mooncake package: install mooncake-transfer-engine(-non-cuda)")


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


class _Spawner:
    """The one thread that forks masters: a daemon that lives as long as the process.

    Linux delivers PR_SET_PDEATHSIG when the thread that forked the child exits (prctl(2)), so
    a master forked by a worker thread would die with that worker while its owner lives on.
    Forking from this thread ties the signal to the process's life instead. Re-created lazily
    in a forked child (threads do not survive ``fork``).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pid = None

    def call(self, fn):
        """Run ``fn()`` on the spawner thread and return its result (or raise its error)."""
        with self._lock:
            if self._pid != os.getpid():
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), daemon=True,
                                 name="cpkv-master-spawner").start()
                self._pid = os.getpid()
            done: Future = Future()
            self._jobs.put((fn, done))
        return done.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            fn, done = jobs.get()
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)


_SPAWNER = _Spawner()


class MasterProcess(Closing):
    """A `mooncake_master` child process on loopback.

    Args:
        host: address it binds (loopback by default).
        start_timeout: seconds to wait for its RPC port to accept connections.
        binary: path of `mooncake_master` (default: `find_master_binary()`).
        extra_args: more master flags, e.g. ``["-default_kv_lease_ttl=1000"]``.

    Raises MasterError (with the log's tail) when it does not come up; nothing is left running.
    """

    def __init__(self, *, host: str = "127.0.0.1", start_timeout: float = 20.0,
                 binary: str | None = None, extra_args: list[str] | None = None,
                 attempts: int = 3):
        if not isinstance(start_timeout, (int, float)) or start_timeout <= 0:
            raise ValueError(f"start_timeout: expected seconds > 0, got {start_timeout!r}")
        self.host = host
        self.binary = binary or find_master_binary()
        self._dir = tempfile.mkdtemp(prefix="cpkv-master-")
        self.log_path = Path(self._dir) / "mooncake_master.log"
        self.proc: subprocess.Popen | None = None
        errors = []
        for _ in range(attempts):
            self.port, self.metrics_port = free_port(host), free_port(host)
            args = [self.binary, f"-rpc_port={self.port}", f"-rpc_address={host}",
                    f"-metrics_port={self.metrics_port}", f"-metrics_host={host}",
                    "-enable_http_metadata_server=false", "-logtostderr",
                    *(extra_args or [])]
            self.proc = _SPAWNER.call(lambda args=args: self._popen(args))
            with _LIVE_LOCK:
                _LIVE.add(self)
            why = self._wait_ready(start_timeout)
            if why is None:
                return
            errors.append(why)
            self.stop()
        raise MasterError(f"mooncake_master did not start ({'; '.join(errors)}); log tail:\n"
                          f"{self.log_text()[-2000:]}")

    def _popen(self, args: list[str]) -> subprocess.Popen:
        parent = os.getpid()
        with self.log_path.open("ab") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: _die_with_parent(parent))

    def _wait_ready(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with code {self.proc.returncode}"
            if port_open(self.host, self.port, 0.5):
                return None
            time.sleep(0.05)
        return f"port {self.port} not accepting after {timeout} s"

    @property
    def address(self) -> str:
        """``host:port`` of its RPC service (what `KVStore(master=...)` takes)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; reaps the process. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def close(self) -> None:
        """Stop the master and delete its log folder. Idempotent; copes with a half-built one."""
        if getattr(self, "proc", None) is not None:
            self.stop()
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for m in live:
        m.close()
