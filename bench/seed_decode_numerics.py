"""What the seed computes for one row of x, projection by projection (GPU, bitsandbytes): prints JSON.

HF's `generate` feeds the seed one token at a time, and bitsandbytes sends a single row to its
`gemv_4bit` kernel instead of dequantizing and multiplying. This script measures how that output
relates to candidate formulas, on random weights quantized as the seed's are:
- `dequant_matmul`: x @ dequantize_4bit(W).T (cuBLAS), what the seed computes for prompts and what
  `nf4`'s kernels compute at every row count;
- `gemv_weights`: the same multiply with the weights gemv_4bit forms, bf16(bf16(code) * bf16(absmax));
- `gemv_products`: those weights, each product x * w rounded to bf16, summed in float32 (the
  kernel's arithmetic, in another summation order).
For each: the share of outputs bit for bit equal to gemv_4bit's and the RMS of the difference
relative to the outputs' RMS.

    python3 bench/seed_decode_numerics.py [--rows-of-x 8]
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096), "down": (4096, 14336)}


def quantized(n: int, k: int, generator: torch.Generator):  # noqa: ANN201
    import bitsandbytes as bnb

    weight = (torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer).to("cuda:0")
    return layer


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    ref, cand = reference.float(), candidate.float()
    return {
        "equal_share": round(float((reference == candidate).float().mean()), 4),
        "rel_rms_diff": float(((ref - cand).pow(2).mean() / ref.pow(2).mean()).sqrt()),
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows-of-x", type=int, default=8, help="independent x rows tried per projection")
    args = parser.parse_args()
    from llm.serving.nf4 import NF4Matrix

    generator = torch.Generator().manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(0)}
    for name, (n, k) in SHAPES.items():
        layer = quantized(n, k, generator)
        matrix = NF4Matrix.from_bnb(layer.weight)
        nibbles = torch.stack((matrix.packed >> 4, matrix.packed & 0xF), dim=-1).reshape(n, k).long()
        code_bf16 = matrix.code.to(torch.bfloat16)
        absmax_bf16 = matrix.absmax.to(torch.bfloat16)
        w_gemv = (code_bf16[nibbles].reshape(n, k // 64, 64) * absmax_bf16.unsqueeze(-1)).reshape(n, k)
        w_dequant = matrix.dequantize()
        stats: dict[str, list] = {"dequant_matmul": [], "gemv_weights": [], "gemv_products": [],
                                  "prefill_row_vs_dequant_matmul": []}
        for _ in range(args.rows_of_x):
            x = torch.randn(1, k, generator=generator).to(torch.bfloat16).cuda()
            seed_decode = layer(x)  # one row: gemv_4bit
            seed_prefill = layer(x.expand(2, k).contiguous())[:1]  # two rows: dequantize + matmul
            dequant = torch.nn.functional.linear(x, w_dequant)
            stats["dequant_matmul"].append(compare(seed_decode, dequant))
            stats["gemv_weights"].append(compare(seed_decode, torch.nn.functional.linear(x, w_gemv)))
            products = (x * w_gemv).float().sum(-1).to(torch.bfloat16).unsqueeze(0)
            stats["gemv_products"].append(compare(seed_decode, products))
            stats["prefill_row_vs_dequant_matmul"].append(compare(seed_prefill, dequant))
        report[name] = {
            key: {metric: round(sum(s[metric] for s in values) / len(values), 6) for metric in values[0]}
            for key, values in stats.items()
        }
        report[name]["weights_equal_share"] = round(float((w_gemv == w_dequant).float().mean()), 4)
        del layer, matrix, nibbles, w_gemv, w_dequant
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
