"""Counting host synchronisations: the calls that make the host wait for the device on a GPU.

Counted (`HOST_SYNCS`): the tensor methods that read device memory back (``item``, ``cpu``,
``tolist``, ``numpy``, ``bool``/``int``/``float``/``index`` of a tensor), ``nonzero`` (its
output's size is read back), and the calls that block the host until device work ends:
``torch.cuda.synchronize``, ``torch.cuda.Event.synchronize``,
``torch.cuda.Stream.synchronize`` and ``torch.accelerator.synchronize``. Other ops whose output
size depends on the data (boolean-mask indexing, ``masked_select``, ``unique``) are not
patched; on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` sees every sync.

Not counted, because the host returns at once: ``torch.cuda.Event.wait`` and
``torch.cuda.Stream.wait_event`` / ``wait_stream`` order a *stream* after an event
(``cudaStreamWaitEvent``: only work queued later waits, on the device); ``Event.record`` /
``Stream.record_event`` queue a marker; ``query`` looks without waiting.
The device-agnostic ``torch.Event`` / ``torch.Stream`` are immutable C types that cannot be
patched; cpkv uses the ``torch.cuda`` classes only.

Everything is patched on the classes (monkeypatch), so counting needs no CUDA: a CPU machine
counts the calls its code paths would make on a GPU.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

import cpkv

TENSOR_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__",
                "__index__")
HOST_SYNCS = [(torch.Tensor, name) for name in TENSOR_READS] + [
    (torch, "nonzero"), (torch.Tensor, "nonzero"),
    (torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
    (torch.cuda.Stream, "synchronize"), (torch.accelerator, "synchronize")]
AGENT_THREADS = ("cpkv-send", "cpkv-recv")  # the agents' thread names start so
CPKV_DIR = str(Path(cpkv.__file__).parent)  # calls from cpkv's own files (``files=``)


def label(owner, name: str) -> str:
    return f"{getattr(owner, '__qualname__', owner.__name__)}.{name}"


class SyncCounter:
    """Counts the `HOST_SYNCS` calls made while it is installed (until ``monkeypatch.undo()``).

    A call counts when its caller's file starts with one of ``files`` (None: any file) and it
    is made on a thread whose name starts with one of ``threads``, or on a thread inside
    ``with counter:`` (``threads=None``: any thread). ``calls`` lists "<call> from
    <file>:<line> on <thread>" in order."""

    def __init__(self, monkeypatch, *, files=None, threads=None):
        self.calls: list[str] = []
        self.files, self.threads = files, threads
        self._inside = threading.local()
        for owner, name in HOST_SYNCS:
            monkeypatch.setattr(owner, name, self._wrap(label(owner, name),
                                                        getattr(owner, name)))

    def __enter__(self):
        self._inside.on = True
        return self

    def __exit__(self, *exc):
        self._inside.on = False

    def _counts(self, caller: str, thread: str) -> bool:
        if self.files is not None and not caller.startswith(tuple(self.files)):
            return False
        return (self.threads is None or thread.startswith(tuple(self.threads))
                or getattr(self._inside, "on", False))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            frame, thread = sys._getframe(1), threading.current_thread().name
            if self._counts(frame.f_code.co_filename, thread):
                self.calls.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno} "
                                  f"on {thread}")
            return fn(*args, **kwargs)
        return counted
