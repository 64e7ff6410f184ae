"""The `nf4` tensor-core path's Triton kernels, run on the CPU by Triton's interpreter
(`TRITON_INTERPRET=1`, numpy): the LoRA `A` kernels that lay x out in the CUDA kernel's operand
order and leave t = x @ A.T split or whole, and the prompt path's LoRA `B` kernel. The interpreter
runs a grid's programs one after another, so the last-arrival sum is checked here for what it
computes, and on a GPU (tests/gpu/test_nf4_kernels.py) for the concurrency. It is read at import,
hence one subprocess per check."""

from __future__ import annotations

from tests.triton_interpreter import needs_triton, run_interpreted

pytestmark = needs_triton

LORA_A_CHECK = """
import json, torch
from llm.serving import nf4_kernels, nf4_mma
from llm.serving.nf4 import LoraParts

torch.manual_seed(0)
k, rt = 768, 96  # 3 groups of 256 inputs (not a power of two), three LoRA parts of rank 32
lora = LoraParts(a=torch.randn(rt, k) * 0.02, b=torch.randn(3 * 64, 32) * 0.02,
                 segments=((0, 64, 0), (64, 128, 32), (128, 192, 64)), rank=32, scaling=0.25)
report = {}
for rows in (1, 3, 5, 9, 16):
    x = torch.randn(rows, k).to(torch.bfloat16)
    row_of_value = nf4_mma.operand_order(torch.arange(16)[:, None].expand(16, k).float())
    real = row_of_value < rows  # the CUDA kernel reads only real rows' values
    calls = [nf4_kernels.mma_inputs(x, 4096, lora) for _ in range(2)]
    xq, t = calls[0]
    report[rows] = {
        "xq_equal": bool(torch.equal(xq[real], nf4_mma.operand_order(x)[real])),
        "t_error": (t.sum(0).double() - x.double() @ lora.a.double().T).abs().max().item(),
        "splits": t.shape[0],
        "repeatable": bool(torch.equal(calls[1][1], t)),
        "arrivals": int(lora.counters("arrivals", 0, x.device).abs().sum()),
    }
print(json.dumps(report))
"""

PROMPT_CHECK = """
import json, torch
from llm.serving import nf4_kernels
from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection

torch.manual_seed(1)
code = torch.linspace(-1, 1, 16)
n, k = 320, 256
weight = NF4Matrix(packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                   absmax=torch.rand((n, k // 64)) * 0.05 + 0.005, code=code)
lora = LoraParts(a=torch.randn(64, k) * 0.02, b=torch.randn(n, 32) * 0.2, segments=((0, 192, 0), (192, n, 32)),
                 rank=32, scaling=0.25)
x = torch.randn(70, k).to(torch.bfloat16)
report = {}
for round_first, pefts_products in ((True, False), (False, False), (True, True), (False, True)):
    projection = NF4Projection(weight, lora, round_lora_first=round_first)
    out = nf4_kernels.nf4_prompt_linear(x, weight, lora, round_first, pefts_products=pefts_products)
    reference = projection.reference(x)
    without_lora = projection.base(x)
    report[f"round_first={round_first}, pefts_products={pefts_products}"] = {
        # the interpreter rounds float32 to bf16 by truncation: one bf16 step apart at most
        "max_error": (out.float() - reference.float()).abs().max().item(),
        "step": reference.float().abs().max().item() * 2**-7,
        "lora_size": (reference.float() - without_lora.float()).abs().max().item(),
    }
three_parts = LoraParts(a=torch.randn(96, k) * 0.02, b=torch.randn(n, 32) * 0.2,
                        segments=((0, 64, 0), (64, 192, 32), (192, n, 64)), rank=32, scaling=0.25)
t = nf4_kernels.lora_a_prompt(x, three_parts)
report["lora_a"] = {"shape": list(t.shape), "dtype": str(t.dtype),
                    "error": (t.double() - x.double() @ three_parts.a.double().T).abs().max().item()}
# the same kernel gives the Triton dot kernels (2-16 rows) their split-K partial sums
for rows in (3, 16):
    parts, splits = nf4_kernels.lora_a_product(x[:rows], three_parts, 16, True)
    report[f"lora_a_dot_{rows}"] = {
        "splits": splits, "shape": list(parts.shape),
        "error": (parts.sum(0).double() - x[:rows].double() @ three_parts.a.double().T).abs().max().item(),
    }
print(json.dumps(report))
"""



def test_the_lora_a_kernels_lay_out_x_and_sum_t_for_the_tensor_core_kernel():
    report = run_interpreted(LORA_A_CHECK)
    for rows, case in report.items():
        assert case["xq_equal"], rows
        assert case["t_error"] < 1e-5, (rows, case)
        assert case["repeatable"], rows
        if int(rows) > 4:  # the whole-sum kernel: one split, its arrival counters back at zero
            assert case["splits"] == 1 and case["arrivals"] == 0, (rows, case)


def test_the_prompt_paths_lora_kernels_add_the_lora_as_peft_does():
    report = run_interpreted(PROMPT_CHECK)
    lora_a = report.pop("lora_a")  # t = x @ A.T, three parts (96 columns, not a power of two), 70 rows
    assert lora_a["shape"] == [70, 96] and lora_a["dtype"] == "torch.float32", lora_a
    assert lora_a["error"] < 1e-5, lora_a
    for rows in (3, 16):  # the Triton dot kernels' partial sums: two splits of K
        dot = report.pop(f"lora_a_dot_{rows}")
        assert dot["splits"] == 2 and dot["shape"] == [2, rows, 96] and dot["error"] < 1e-5, (rows, dot)
    assert len(report) == 4, report  # both roundings, with the tensor cores' products and with PEFT's
    for variant, case in report.items():
        assert case["lora_size"] > 10 * case["step"], case  # a missing or misplaced LoRA would show
        assert case["max_error"] <= case["step"], (variant, case)


PROMPT_BASE_CHECK = """
import json, torch
import torch.nn.functional as F
from llm.serving import nf4_kernels
from llm.serving.nf4 import NF4Matrix

torch.manual_seed(2)
code = torch.linspace(-1, 1, 16)
n, k = 128, 448  # 7 steps of 64: splits of 3 x 192 (the last one 64) and 2 x 256
weight = NF4Matrix(packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                   absmax=torch.rand((n, k // 64)) * 0.05 + 0.005, code=code)
# The interpreter rounds float32 to bf16 by truncation (the weights, then the output): so does the reference
w = (weight.dequantize(torch.float32).view(torch.int32) & -65536).view(torch.float32)
report = {}
for rows in (5, 40, 70):
    x = torch.randn(rows, k).to(torch.bfloat16)
    reference = F.linear(x.double(), w.double()).float()
    for (splits, per), warps in zip(((1, k), (3, 192), (2, 256), (1, k), (3, 192), (2, 256)), (4, 4, 4, 8, 8, 16)):
        out = torch.full((rows, n + 64), float("nan"), dtype=torch.bfloat16)
        nf4_kernels.prompt_base(x, weight, splits, per, warps, out=out[:, 32:32 + n])
        error = (out[:, 32:32 + n].float() - reference).abs()
        report[f"{rows}:{splits}:w{warps}"] = {
            # beyond the truncation of each output to bf16 (under 2^-7 of it)
            "excess": (error - reference.abs() * 2**-7).max().item(),
            "scale": reference.abs().max().item(),
            "outside_untouched": bool(out[:, :32].isnan().all() and out[:, 32 + n:].isnan().all()),
        }
print(json.dumps(report))
"""


def test_the_fused_prompt_base_computes_the_dequantized_product_in_any_split():
    """`prompt_base`: each weight tile dequantized in registers, K split as cuBLAS splits it, the parts added
    in order, written into a column slice of a wider output (the fused projection's parts)."""
    report = run_interpreted(PROMPT_BASE_CHECK)
    for case, found in report.items():
        assert found["excess"] <= 1e-5 * found["scale"], (case, found)
        assert found["outside_untouched"], case


def test_the_base_split_candidates_include_the_splits_cublas_was_seen_to_use():
    from llm.serving import nf4_kernels

    assert nf4_kernels.base_split_candidates(4096)[0] == (1, 4096)
    for k, split in ((4096, (2, 2048)), (4096, (3, 1408)), (14336, (4, 3584)), (14336, (3, 4800)),
                     (14336, (2, 7168))):
        assert split in nf4_kernels.base_split_candidates(k)
    assert all((s - 1) * per < k and per % 64 == 0 for k in (4096, 14336)
               for s, per in nf4_kernels.base_split_candidates(k))
