"""The element-wise steps that write x in the tensor-core kernel's operand order too
(`llm.serving.nf4_inputs`), run on the CPU by Triton's interpreter: x is eager PyTorch's within the
two rounding steps the interpreter's conversions cost (it truncates where the GPU rounds to nearest,
and x is rounded twice: the normalized value, then its product by the weight) and the operand-order copy is x's values exactly where the kernel reads them. The
GPU's bits: tests/gpu/test_nf4_inputs.py."""

from __future__ import annotations

from tests.triton_interpreter import needs_triton, run_interpreted

pytestmark = needs_triton

CHECK = """
import json, torch
from llm.serving import nf4_inputs, nf4_mma
from llm.serving.mistral_decoder import _add_rms_norm, _rms_norm, _silu_mul

torch.manual_seed(0)
report = {}


def within_a_rounding_step(ours, eager):  # of each of two roundings
    ours, eager = ours.float(), eager.float()
    return bool(((ours - eager).abs() <= eager.abs() * 2 ** -6 + 1e-30).all())


def copied_in_operand_order(xq, x):
    rows, k = x.shape
    row_of_value = nf4_mma.operand_order(torch.arange(16)[:, None].expand(16, k).float())
    real = row_of_value < rows  # the kernel reads only real rows' values
    return bool(torch.equal(xq[real], nf4_mma.operand_order(x)[real]))


for rows in (3, 16):
    k = 512  # 2 groups of 256 inputs
    residual = torch.randn(rows, k).to(torch.bfloat16)
    delta = torch.randn(rows, k).to(torch.bfloat16)
    weight = (torch.rand(k) + 0.5).to(torch.bfloat16)
    h, x, xq = nf4_inputs.add_norm_operand_order(residual, delta, weight, 1e-5)
    eager_h = _add_rms_norm(residual, delta, weight, 1e-5)[0]
    eager_x = _rms_norm(h, weight, 1e-5)  # of the kernel's h: its own rounding step is h's check
    gate_up = (torch.randn(rows, 2 * 768) * 3).to(torch.bfloat16)  # 3 groups: not a power of two
    silu, silu_q = nf4_inputs.silu_mul_operand_order(gate_up)
    report[rows] = {
        "h": within_a_rounding_step(h, eager_h), "x": within_a_rounding_step(x, eager_x),
        "xq": copied_in_operand_order(xq, x),
        "silu": within_a_rounding_step(silu, _silu_mul(gate_up)), "silu_q": copied_in_operand_order(silu_q, silu),
    }
try:
    nf4_inputs.silu_mul_operand_order(torch.zeros(2, 2 * 100, dtype=torch.bfloat16))
    report["bad_width"] = "accepted"
except ValueError as error:
    report["bad_width"] = str(error)
print(json.dumps(report))
"""


def test_the_steps_compute_eagers_values_and_copy_them_in_operand_order():
    report = run_interpreted(CHECK)
    for rows in ("3", "16"):
        assert report[rows] == {"h": True, "x": True, "xq": True, "silu": True, "silu_q": True}, report
    assert "multiple of 256 inputs" in report["bad_width"], report
