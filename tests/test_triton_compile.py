"""The Triton kernels of `bench/triton_compile_check.py` (the sampler's and the served attention kernel)
compile for sm_90 with the installed Triton's compiler and ptxas, no GPU needed: an op or layout Triton
rejects fails here, not in a device call."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_compile_for_an_h200():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_compile_check.py")], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in reports} >= {"_chunk_candidates_kernel", "_draw_kernel", "_paged_attn_kernel",
                                              "_nf4_prompt_base_kernel"}
    assert result.returncode == 0 and all(r["ok"] for r in reports), (reports, result.stderr[-2000:])
    # the fused prompt base multiplies on Hopper's warpgroup tensor-core instruction, as cuBLAS does: the
    # instruction whose bits it shares (run 47)
    assert all(r["wgmma"] > 0 for r in reports if r["kernel"] == "_nf4_prompt_base_kernel"), reports
