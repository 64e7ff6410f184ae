"""The fused decode-attention kernel (`triton_kernels.rope_paged_attention`: rotary, the k/v write into the
paged pool, split attention and the reduce in one launch), run on the CPU by Triton's interpreter
(`TRITON_INTERPRET=1`), against the served `rope_kv_write_paged` + `paged_decode_attention` and a float64
reference, with blocks of 4 tokens so rows span 1, 2 and up to 8 splits of PAGES_PER_SPLIT pages.

The interpreter runs a grid's programs one after another (here in a shuffled order, so that no result
rests on split 0 running first): nothing here checks the barriers (the new k/v slot before its split
reads it, the partial stores before the count) nor the atomics' ordering between concurrent programs. tests/gpu/test_paged_attention.py must check those, in CUDA-graph replays. The
interpreter reads TRITON_INTERPRET at import, hence a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's interpreter")

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, numpy as np, torch, triton.language as tl
from triton.runtime import interpreter
from llm.serving import triton_kernels as tk

# The interpreter keeps bf16 tiles as their uint16 bits and its tl.dot multiplies those bits
# (triton-lang/triton#11584, "not supported yet"): give it the values, exact in float32.
_create_dot = interpreter.InterpreterBuilder.create_dot


def _as_float32(x):
    if x.dtype.scalar != tl.bfloat16:
        return x
    data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return interpreter.TensorHandle(data, tl.float32)


def _create_dot_of_values(self, a, b, d, *args):
    return _create_dot(self, _as_float32(a), _as_float32(b), d, *args)


interpreter.InterpreterBuilder.create_dot = _create_dot_of_values

# Programs in a seeded random order instead of the grid's (the loop still walks the grid in order;
# each step runs the next program of a shuffled list): results that hold only because split 0 ran
# first, or one KV head's splits before the next head's, do not pass.
_set_grid_dim = interpreter.InterpreterBuilder.set_grid_dim
_set_grid_idx = interpreter.InterpreterBuilder.set_grid_idx
_order_rng = np.random.default_rng(0)


def _shuffled_grid_dim(self, nx, ny, nz):
    _set_grid_dim(self, nx, ny, nz)
    self.order = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
    _order_rng.shuffle(self.order)
    self.next_program = 0


def _shuffled_grid_idx(self, x, y, z):
    self.next_program += 1
    _set_grid_idx(self, *self.order[self.next_program - 1])


interpreter.InterpreterBuilder.set_grid_dim = _shuffled_grid_dim
interpreter.InterpreterBuilder.set_grid_idx = _shuffled_grid_idx

# bf16 stores of a whole head (the k/v stores are half heads): output rows. Only the last split of a
# (row, KV head) may combine, so each output row is stored once.
_create_masked_store = interpreter.InterpreterBuilder.create_masked_store
head_stores = [0]


def _counted_store(self, ptrs, value, *args):
    if value.dtype.scalar == tl.bfloat16 and value.data.size == DIM:
        head_stores[0] += 1
    return _create_masked_store(self, ptrs, value, *args)


interpreter.InterpreterBuilder.create_masked_store = _counted_store

HEADS, KV, DIM, BLOCK, MAX_SEQ, POOL = 8, 2, 32, 4, 64, 40
GROUP, SCALE = HEADS // KV, DIM**-0.5
max_blocks = MAX_SEQ // BLOCK
TOKENS_PER_SPLIT = BLOCK * tk.PAGES_PER_SPLIT
# Rotary tables as MistralDecoder builds them: [max_seq, D], the angles repeated over both halves, bf16.
inv_freq = 1.0 / (10000.0 ** (torch.arange(0, DIM, 2, dtype=torch.int64).float() / DIM))
angles = torch.arange(MAX_SEQ, dtype=torch.float32)[:, None] * inv_freq[None, :]
emb = torch.cat((angles, angles), dim=-1)
cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def bits(x):
    return x.view(torch.int16)  # NaN-safe bit comparison


def rope64(x, pos):  # x [..., D] float64 at one position
    half = DIM // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[pos].double() + rotated * sin[pos].double()


def inputs(positions, seed):
    gen = torch.Generator().manual_seed(seed)
    n = len(positions)
    k_pool = torch.randn(POOL, KV, BLOCK, DIM, generator=gen).to(torch.bfloat16)
    v_pool = torch.randn(POOL, KV, BLOCK, DIM, generator=gen).to(torch.bfloat16)
    k_pool[0] = v_pool[0] = float("nan")  # the scratch block
    order = (torch.randperm(POOL - 1, generator=gen) + 1).tolist()
    table = torch.zeros(n, max_blocks, dtype=torch.int32)  # unused entries: the scratch block
    for row, pos in enumerate(positions):
        count = pos // BLOCK + 1
        table[row, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
        last = table[row, count - 1]
        k_pool[last, :, pos % BLOCK:] = float("nan")  # the new token's slot and the stale ones after it
        v_pool[last, :, pos % BLOCK:] = float("nan")
    qkv = torch.randn(n, (HEADS + 2 * KV) * DIM, generator=gen).to(torch.bfloat16)
    return {"qkv": qkv, "pos": torch.tensor(positions, dtype=torch.int64), "table": table,
            "k_pool": k_pool, "v_pool": v_pool}


def counters_zero():
    return all(bool((c == 0).all()) for made in tk._SPLIT_COUNTERS.values() for c in made)


def check(x, fused_run):
    # The served pair and the float64 reference on copies, then `fused_run` on x's own tensors.
    qkv, pos_t, table = x["qkv"], x["pos"], x["table"]
    positions, n = pos_t.tolist(), len(pos_t)
    before_k, before_v = x["k_pool"].clone(), x["v_pool"].clone()
    served_k, served_v = before_k.clone(), before_v.clone()
    q = tk.rope_kv_write_paged(qkv, cos, sin, pos_t, table, served_k, served_v, HEADS, KV, DIM)
    served = tk.paged_decode_attention(q, served_k, served_v, table, pos_t, SCALE, HEADS)
    head_stores[0] = 0
    fused = fused_run()
    output_stores = head_stores[0]
    k_pool, v_pool = x["k_pool"], x["v_pool"]

    slots = torch.zeros(POOL, KV, BLOCK, dtype=torch.bool)  # where a row's new token goes
    reference = torch.empty(n, HEADS, DIM, dtype=torch.float64)
    for row, pos in enumerate(positions):
        slots[table[row, pos // BLOCK], :, pos % BLOCK] = True
        xr = qkv[row].double().view(HEADS + 2 * KV, DIM)
        q64, k_new, v_new = rope64(xr[:HEADS], pos), rope64(xr[HEADS:HEADS + KV], pos), xr[HEADS + KV:]
        blocks = table[row, : pos // BLOCK + 1].long()
        keys = before_k[blocks].double().transpose(0, 1).reshape(KV, -1, DIM)[:, : pos + 1].clone()
        values = before_v[blocks].double().transpose(0, 1).reshape(KV, -1, DIM)[:, : pos + 1].clone()
        keys[:, pos], values[:, pos] = k_new, v_new
        weights = torch.softmax(q64.view(KV, GROUP, DIM) @ keys.transpose(1, 2) * SCALE, dim=-1)
        reference[row] = (weights @ values).reshape(HEADS, DIM)
    reference = reference.reshape(n, -1)
    new_slot = slots[:, :, :, None].expand_as(k_pool)
    return {
        "splits": [pos // TOKENS_PER_SPLIT + 1 for pos in positions],
        "pool_equal": bool(torch.equal(bits(k_pool), bits(served_k)) and torch.equal(bits(v_pool), bits(served_v))),
        "rest_unchanged": bool(torch.equal(bits(k_pool)[~new_slot], bits(before_k)[~new_slot])
                               and torch.equal(bits(v_pool)[~new_slot], bits(before_v)[~new_slot])),
        "new_slots_written": bool(not k_pool[new_slot].isnan().any() and not v_pool[new_slot].isnan().any()),
        "finite": bool(fused.isfinite().all()),
        "served_finite": bool(served.isfinite().all()),
        "bit_equal": bool(torch.equal(bits(fused), bits(served))),
        "diff_vs_served": (fused.float() - served.float()).abs().max().item(),
        "diff_vs_float64": (fused.double() - reference).abs().max().item(),
        "served_vs_float64": (served.double() - reference).abs().max().item(),
        "magnitude": reference.abs().max().item(),
        "shape": list(fused.shape), "dtype": str(fused.dtype),
        "counters_zero": counters_zero(),
        "output_rows_stored_once": output_stores == n * HEADS,
    }


def case(positions, seed):
    x = inputs(positions, seed)
    return check(x, lambda: tk.rope_paged_attention(x["qkv"], cos, sin, x["pos"], x["table"], x["k_pool"],
                                                    x["v_pool"], SCALE, HEADS, KV, DIM, MAX_SEQ))


def replays(steps):
    # As a CUDA graph replays: the same tensors (hence the same counters), new values copied in each time.
    x = inputs(steps[0], seed=100)
    launch = lambda: tk.rope_paged_attention(x["qkv"], cos, sin, x["pos"], x["table"], x["k_pool"],
                                             x["v_pool"], SCALE, HEADS, KV, DIM, MAX_SEQ)
    out = {}
    for i, positions in enumerate(steps):
        for name, value in inputs(positions, seed=100 + i).items():
            x[name].copy_(value)
        out[f"launch {i + 1}: {positions}"] = check(x, launch)
    return out


report = {
    "one row, 2 splits": case([13], seed=1),
    # a block boundary (new block), 5 splits, one token
    "three rows, 2 / 5 / 1 splits": case([8, 37, 1], seed=2),
    "first token, a full block, a split boundary": case([0, 15, 16], seed=3),
    "the whole table, 8 splits": case([63, 7, 40], seed=4),
    **replays([[13, 63, 0], [14, 2, 47], [29, 30, 31]]),
}
print(json.dumps(report))
"""


def _interpreted(script: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report() -> dict:
    return _interpreted(CHECK)


def test_the_cases_span_one_two_and_many_splits(report: dict) -> None:
    splits = {count for case in report.values() for count in case["splits"]}
    assert {1, 2, 5, 8} <= splits, splits


def test_the_fused_kernel_writes_the_served_kernels_kv_bits_and_nothing_else(report: dict) -> None:
    for name, case in report.items():
        assert case["pool_equal"], (name, case)
        assert case["new_slots_written"], (name, case)  # the NaN placed in each new slot is gone
        assert case["rest_unchanged"], (name, case)


def test_the_fused_attention_is_the_served_attention(report: dict) -> None:
    for name, case in report.items():
        assert case["shape"][1] == 8 * 32 and case["dtype"] == "torch.bfloat16", (name, case)
        assert case["served_finite"], (name, case)
        assert case["diff_vs_served"] <= 2e-2, (name, case)
        # bf16 inputs, outputs of magnitude ~1: a few bf16 steps from the exact float64 attention
        assert 0.3 < case["magnitude"] < 8, (name, case)
        assert case["diff_vs_float64"] <= 3e-2, (name, case)


def test_the_fused_attention_has_the_served_bits_in_the_interpreter(report: dict) -> None:
    # The same float ops on the same values. On a GPU the combine's tl.sum may add in another order
    # (4 warps here, 1 in the reduce kernel), so tests/gpu allows a bf16 step there.
    for name, case in report.items():
        assert case["bit_equal"], (name, case)


def test_stale_nans_past_each_rows_length_stay_out_of_the_output(report: dict) -> None:
    for name, case in report.items():
        assert case["finite"], (name, case)


def test_only_the_last_split_of_a_row_and_kv_head_combines(report: dict) -> None:
    for name, case in report.items():
        assert case["output_rows_stored_once"], (name, case)


def test_the_counters_are_zero_after_every_launch_and_replays_stay_right(report: dict) -> None:
    for name, case in report.items():
        assert case["counters_zero"], (name, case)
    replayed = [name for name in report if name.startswith("launch")]
    assert len(replayed) == 3
    for name in replayed:  # what a replay finds is what the launch before it left
        case = report[name]
        assert case["bit_equal"] and case["pool_equal"] and case["diff_vs_float64"] <= 3e-2, (name, case)


def test_growing_the_counters_during_a_graph_capture_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llm.serving import triton_kernels as tk

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before capturing"):
        tk.split_counters(torch.device("cuda", 0), 1, 8)
    assert (torch.device("cuda", 0), 8) not in tk._SPLIT_COUNTERS
