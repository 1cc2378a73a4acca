"""One lifecycle for objects that own resources (an arena's registrations, a store client, a
master process): ``with`` closes them, and so does garbage collection as a last resort.
``close`` must be idempotent and must cope with a half-built object (a constructor that raised)."""

from __future__ import annotations


class Closing:
    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown or a half-built object: nothing more to do
