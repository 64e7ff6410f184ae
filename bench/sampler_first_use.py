"""How long each batch size's first draw waits after start-up (run 42: the first batches of 2-15 rows each
waited ~2 s for a Triton compile, since the per-row settings' alignment followed the batch size; the
settings' padding in `batching._param_tensors` leaves one compile for all sizes). Runs the start-up check
in a fresh process with an empty Triton cache, as a fresh machine starts, then one draw of each batch size
1-16. Prints one JSON line; GPU only (device tool, no weights needed):

    python bench/sampler_first_use.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_ROWS = 16
VOCAB = 32000

_FRESH_PROCESS = """
import json, time, torch
from llm.engine import SamplingParams
from llm.serving import batching

device = torch.device("cuda")
torch.zeros(1, device=device)  # the CUDA context, outside the timings
started = time.perf_counter()
info = batching.check_triton_sampling(device, {vocab})
check_s = time.perf_counter() - started
first_draw_ms = {{}}
for rows in range(1, {max_rows} + 1):
    logits = torch.randn(rows, {vocab}, device=device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    batching.sample_next(logits, [SamplingParams()] * rows, [None] * rows)
    first_draw_ms[rows] = round((time.perf_counter() - started) * 1000, 2)
print(json.dumps({{"check_s": round(check_s, 2), "info": info, "first_draw_ms": first_draw_ms,
                  "worst_first_draw_ms": max(first_draw_ms.values())}}))
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as cache:
        result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS.format(vocab=VOCAB, max_rows=MAX_ROWS)],
                                capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "TRITON_CACHE_DIR": cache}, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    print(lines[-1] if lines else json.dumps({"error": result.stderr[-1500:]}), flush=True)
    return 0 if lines else 1


if __name__ == "__main__":
    raise SystemExit(main())
