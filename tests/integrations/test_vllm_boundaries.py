"""What the vLLM integration promises around itself: only cpkv/integrations/vllm.py imports
vLLM, `import cpkv` (and the transport seam) never does, and the example router's request
split gives both engines matching transfer params."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from vllm_proxy import split_request, transfer_params  # noqa: E402

from cpkv.integrations.transport import receiver_addresses, receiver_port  # noqa: E402
from cpkv.parallel import ParallelRank, ParallelSizes  # noqa: E402

pytestmark = [pytest.mark.mp, pytest.mark.slow]


def test_only_the_connector_module_imports_vllm():
    importers = []
    for path in sorted((ROOT / "cpkv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                else []
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == ["cpkv/integrations/vllm.py"]


def test_import_cpkv_does_not_import_vllm():
    code = ("import sys, cpkv, cpkv.adapters, cpkv.transfer, cpkv.integrations, "
            "cpkv.integrations.transport; assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_router_gives_both_engines_one_transfer():
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 16, "temperature": 0}
    to = receiver_addresses("10.0.0.2", 14600, tp=2)
    prefill, decode = split_request(body, "prefill-1", to)
    p, d = prefill["kv_transfer_params"], decode["kv_transfer_params"]
    assert p["cpkv_transfer_id"] == d["cpkv_transfer_id"]
    assert p["do_remote_decode"] and not p["do_remote_prefill"]
    assert p["cpkv_to"] == ["10.0.0.2:14600", "10.0.0.2:14601"]
    assert d["do_remote_prefill"] and not d["do_remote_decode"]
    assert d["cpkv_source"] == "prefill-1"
    assert prefill["max_tokens"] == 1 and decode["max_tokens"] == 16
    assert prefill["prompt"] == decode["prompt"] == body["prompt"]
    assert split_request(body, "x", ["h:1"])[0]["kv_transfer_params"]["cpkv_transfer_id"] != \
        p["cpkv_transfer_id"]
    assert transfer_params(3, "p", ["h:1"]) == (
        {"do_remote_decode": True, "do_remote_prefill": False, "cpkv_transfer_id": 3,
         "cpkv_to": ["h:1"]},
        {"do_remote_prefill": True, "do_remote_decode": False, "cpkv_transfer_id": 3,
         "cpkv_source": "p"})


def test_receiver_ports_follow_the_worker_index():
    """A decode worker listens on kv_port + its TP x PP index (+ a DP rank's engines before
    it); the router derives the same addresses."""
    sizes = ParallelSizes(tp=2, pp=2)
    ports = {r: receiver_port(14600, r, sizes) for r in sizes.ranks()}
    assert sorted(ports.values()) == list(range(14600, 14604))
    assert ports[ParallelRank(tp=1, pp=0)] == 14601 and ports[ParallelRank(tp=0, pp=1)] == 14602
    assert receiver_addresses("h", 14600, tp=2, pp=2) == [f"h:{p}" for p in range(14600, 14604)]
    assert receiver_addresses("h", 14600, tp=2, dp_index=3) == ["h:14606", "h:14607"]
    with pytest.raises(ValueError, match="kv_port"):
        receiver_addresses("h", 65535, tp=2)
