"""The package's layers: the pool, staging and kernel modules never import CP or transfer code,
and the coordinates module imports nothing of cpkv at all (checked on the source with `ast`)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cpkv"
LOWER = [*sorted((PKG / "kernels").glob("*.py")), PKG / "layout.py", PKG / "staging.py"]


def cpkv_imports(path: Path) -> set[str]:
    """Absolute names of the cpkv modules ``path`` imports (relative imports resolved)."""
    package = ["cpkv", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cpkv"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "cpkv":
                out |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
    return out


def test_the_checker_resolves_relative_imports():
    got = cpkv_imports(PKG / "transfer" / "mapping.py")
    assert "cpkv.parallel" in got


@pytest.mark.parametrize("path", LOWER, ids=lambda p: str(p.relative_to(PKG)))
def test_lower_layers_do_not_import_cp_or_transfer(path):
    bad = {m for m in cpkv_imports(path)
           if m.startswith(("cpkv.cp", "cpkv.transfer", "cpkv.store"))}
    assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_coordinates_import_nothing_of_cpkv():
    assert cpkv_imports(PKG / "parallel.py") == set()


def test_rank_arithmetic_and_the_wire_do_not_import_the_agents():
    for path in (PKG / "transfer" / "mapping.py", PKG / "transfer" / "protocol.py",
                 PKG / "store" / "keys.py", PKG / "cp" / "partition.py"):
        agents = {"cpkv.transfer.sender", "cpkv.transfer.receiver", "cpkv.transfer.link"}
        assert not agents & cpkv_imports(path), path.name
