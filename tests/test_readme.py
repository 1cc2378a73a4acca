"""README.md's Python stays runnable: every self-contained ```python block runs as written, and
every other block (a fragment of a runner's code) at least compiles.

The convention, for whoever writes the README: a block is *self-contained* when it has no
``...`` placeholder and every name it reads is a builtin or bound in the block itself (imported,
assigned, defined, a loop or ``with`` target). Such a block is run on its own, in a fresh
namespace and a temporary working directory, and must not raise (its ``assert``s are checks).
A block that reads names from outside (``pool``, ``runner``, ``cp_group``...) or holds ``...``
shows part of a runner's code: it is compiled, not run. So to make an example runnable, make it
self-contained; nothing else marks it. The Quickstart's block must be self-contained and at most
15 lines.
"""

import ast
import builtins
import re
import symtable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) for every ```python block of ``text``."""
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


def outside_names(code: str) -> set[str]:
    """The names ``code`` reads that neither it nor the builtins bind."""
    module = symtable.symtable(code, "README.md", "exec")
    bound = {s.get_name() for s in module.get_symbols()
             if s.is_assigned() or s.is_imported() or s.is_namespace()}
    read = set()

    def walk(table):
        for s in table.get_symbols():  # module level: every read; inside: the global ones
            if s.is_referenced() and (table is module or s.is_global()):
                read.add(s.get_name())
        for child in table.get_children():
            walk(child)

    walk(module)
    return read - bound - set(dir(builtins))


def self_contained(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:  # not run; the test's compile says where
        return False
    has_placeholder = any(isinstance(n, ast.Constant) and n.value is Ellipsis
                          for n in ast.walk(tree))
    return not has_placeholder and not outside_names(code)


BLOCKS = python_blocks(README.read_text())


@pytest.mark.parametrize("line,code", BLOCKS, ids=[
    f"line{line}-{'runs' if self_contained(code) else 'fragment'}" for line, code in BLOCKS])
def test_readme_python_runs_or_compiles(line, code, tmp_path, monkeypatch):
    compiled = compile(code, f"README.md:{line}", "exec")
    if self_contained(code):
        monkeypatch.chdir(tmp_path)
        exec(compiled, {"__name__": "__readme__"})


def test_the_quickstart_is_self_contained_and_short():
    block = re.search(r"## Quickstart\n[^`]*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no ## Quickstart section with a ```python block"
    code = block.group(1)
    assert self_contained(code), f"names from outside: {sorted(outside_names(code))}"
    assert len(code.strip().splitlines()) <= 15


def test_the_convention_tells_runnable_from_fragments():
    assert self_contained("import torch\nx = torch.zeros(2)\nprint([y for y in x], len(x))\n")
    assert self_contained("def f(a):\n    return a + 1\n\nassert f(1) == 2\n")
    assert outside_names("cache = from_vllm(runner.kv_caches)\n") == {"from_vllm", "runner"}
    assert outside_names("def f():\n    return pool\n") == {"pool"}
    assert not self_contained("import torch\nfor layer in range(2):\n    ...\n")
