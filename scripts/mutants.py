"""The mutants `scripts/mutate.py` runs: realistic slips in the code that decides which bytes go
where and when a request is finished. Each replaces one exact piece of text (which must occur
exactly once in its file) and says what the slip would break."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    why: str
    tests: tuple[str, ...] = ()  # default: the tests that cover the file (mutate.TESTS_FOR)


MUTANTS: list[Mutant] = []
