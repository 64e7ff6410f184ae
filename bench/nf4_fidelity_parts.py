"""Where `nf4`'s prompt KL against the seed comes from, and the seed's own floors (GPU): prints JSON.

The reference is the seed's prompt forward over the 367-token Korean text (bench_engines.py's
`fidelity_prefill`). Every line is the mean KL(reference || variant):
- the seed itself, run differently: the same text as two identical rows (each GEMM has twice the
  rows), in chunks of 128 tokens through its KV cache, and token by token (its `generate` path);
- `nf4`'s decoder (PyTorch path, no kernels) as it is, then with one thing changed at a time: the
  base GEMMs in the seed's shapes (one per projection, not fused and chunked), the LoRA's `A`
  products stacked into one (as the reference path ran them before run 17; PEFT runs one each);
- `nf4`'s decoder with its GPU prompt kernels (what serving runs for prompts).

    python3 bench/nf4_fidelity_parts.py --tokenizer-file .tok/tokenizer.model.v1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import build_seed_model, make_tokenizer, seed_decode_logits  # noqa: E402

from llm.fidelity import KOREAN_FINANCE_TEXT, kl_summary  # noqa: E402
from llm.serving import nf4  # noqa: E402


def seed_shaped_base(self: nf4.NF4Projection, x: torch.Tensor) -> torch.Tensor:
    """One GEMM per original projection, as the seed's model runs them."""
    weight = self.weight.dequantize(x.dtype)
    return torch.cat([F.linear(x, weight[start:end]) for start, end, _ in self.lora.segments], dim=-1)


def stacked_a_delta(self: nf4.LoraParts, x: torch.Tensor) -> torch.Tensor:
    """The LoRA with one stacked `A` product for all parts (`nf4`'s reference path before run 17;
    PEFT, and `LoraParts.delta` now, run one per original projection)."""
    t = F.linear(x.to(self.a.dtype), self.a)
    return torch.cat([
        F.linear(t[:, col : col + self.rank], self.b[start:end]) * self.scaling
        for start, end, col in self.segments
    ], dim=-1)


def seed_on_korean_text() -> tuple[torch.nn.Module, list[int], torch.Tensor]:
    """The command line (--tokenizer-file), the seed's model on the GPU, the 367-token Korean text's
    ids and them as a [1, T] GPU tensor: what both fidelity scripts start from."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-file", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this needs a CUDA GPU with bitsandbytes: run it on the device machine (bench/NOTES.md)")
    tokenizer = make_tokenizer(args.tokenizer_file, Path(tempfile.mkdtemp()) / "tok")
    ids = tokenizer(KOREAN_FINANCE_TEXT).input_ids
    return build_seed_model(), ids, torch.tensor([ids], device="cuda:0")


@torch.inference_mode()
def main() -> None:
    model, ids, tokens = seed_on_korean_text()
    reference = model(tokens).logits[0].float().cpu()
    report: dict = {"device": torch.cuda.get_device_name(0), "positions": len(ids)}

    def record(name: str, logits: torch.Tensor) -> None:
        summary = kl_summary(reference, logits.float().cpu())
        report[name] = {"kl_mean": summary["kl_mean"], "top1_agreement": summary["top1_agreement"]}
        print(name, report[name], flush=True)

    record("seed_again", model(tokens).logits[0])
    record("seed_two_rows", model(tokens.expand(2, -1).contiguous()).logits[0])
    past, chunks = None, []
    for start in range(0, len(ids), 128):
        out = model(input_ids=tokens[:, start : start + 128], past_key_values=past, use_cache=True)
        past = out.past_key_values
        chunks.append(out.logits[0])
    record("seed_chunks_of_128", torch.cat(chunks))
    del past, chunks
    record("seed_token_by_token", seed_decode_logits(model, ids))

    decoder = nf4.build_nf4_decoder(model, max_batch=1, max_seq_len=512)
    ids_tensor = torch.tensor(ids)

    def prefill() -> torch.Tensor:
        return decoder.prefill(0, ids_tensor, all_logits=True)

    record("nf4_reference_path", prefill())
    base, delta = nf4.NF4Projection.base, nf4.LoraParts.delta
    try:
        nf4.NF4Projection.base = seed_shaped_base
        record("nf4_seed_shaped_base", prefill())
        nf4.NF4Projection.base = base
        nf4.LoraParts.delta = stacked_a_delta
        record("nf4_stacked_lora_a", prefill())
    finally:
        nf4.NF4Projection.base, nf4.LoraParts.delta = base, delta
    if nf4.enable_nf4_kernels(decoder):
        record("nf4_prompt_kernels", prefill())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
