"""What the vLLM integration promises around itself: only cpkv/integrations/vllm.py imports
vLLM, `import cpkv` (and the transport seam) never does, and the example router's request
split gives both engines matching transfer params."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from vllm_proxy import split_request, transfer_params  # noqa: E402


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
    prefill, decode = split_request(body, "10.0.0.2:14600")
    p, d = prefill["kv_transfer_params"], decode["kv_transfer_params"]
    assert p["cpkv_transfer_id"] == d["cpkv_transfer_id"]
    assert p["do_remote_decode"] and not p["do_remote_prefill"] and p["cpkv_peer"] == \
        "10.0.0.2:14600"
    assert d["do_remote_prefill"] and not d["do_remote_decode"]
    assert prefill["max_tokens"] == 1 and decode["max_tokens"] == 16
    assert prefill["prompt"] == decode["prompt"] == body["prompt"]
    assert split_request(body, "x:1")[0]["kv_transfer_params"]["cpkv_transfer_id"] != \
        p["cpkv_transfer_id"]
    assert transfer_params(3, "h:1") == ({"do_remote_decode": True, "do_remote_prefill": False,
                                          "cpkv_transfer_id": 3, "cpkv_peer": "h:1"},
                                         {"do_remote_prefill": True, "do_remote_decode": False,
                                          "cpkv_transfer_id": 3})
