"""benchmarks/gpu_check.py --smoke: the GPU check's code runs end to end on the CPU (tiny sizes, the fused
kernel under the Triton interpreter) and writes its JSON and Markdown reports (issue 14, item 4)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod                     # dataclasses and tyro resolve annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_smoke(tmp_path):
    gc = _load()
    assert gc.main(["--smoke", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["smoke"] and "pytest" not in rep                        # pytest -m gpu runs on a GPU only
    assert rep["matmul"]["fp32_tflops"] > 0
    rows = rep["bench"]["rows"]
    assert {r["backend"] for r in rows} >= ({"torch eager", "fused v1"} if rep["interpreter"] == "1"
                                            else {"torch eager"})
    assert all("error" not in r and r["examples_per_s"] > 0 for r in rows), rows
    es = rep["es_step"]
    assert "error" not in es, es.get("traceback")
    if rep["interpreter"] == "1":
        assert es["resolved_backend"] == "triton" and es["step"]["fused_kernel_calls"] == 1
    assert set(es["step"]) >= {"sampling_s", "states_s", "unroll_s", "update_s", "total_s"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## kernel bench" in md and "## ES step" in md and "| unroll |" in md
