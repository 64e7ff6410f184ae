"""Where `nf4`'s prompt forward first parts from the seed's, step by step (GPU): prints JSON.

The seed's model runs the 367-token Korean text once, with hooks that keep every step's input and
output in every layer. Each of `nf4`'s steps is then fed the seed's own input to that step, so a
step's line counts only what that step changes: outputs not bit for bit equal (of all), the
largest difference, the first layer where any differs. Steps: the norms, q/k/v, the rotary tables
and rotation, attention, o, the residual adds, gate/up, SiLU x up, down, the final norm and
lm_head (the reference path; then the GEMM steps again through `nf4`'s GPU prompt kernels).
Attention also runs through each SDPA backend with transformers' own arguments, to name the one
the seed's forward used. Last, the mean KL of whole `nf4` prefills against the seed's logits: the
reference path, as it ran before run 17 (flash attention, one stacked LoRA `A` product), and
through the GPU prompt kernels.

    python3 bench/nf4_layer_diff.py --tokenizer-file .tok/tokenizer.model.v1
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nf4_fidelity_parts import seed_on_korean_text, stacked_a_delta  # noqa: E402

from llm.fidelity import kl_summary  # noqa: E402
from llm.serving import mistral_decoder, nf4  # noqa: E402
from llm.serving.mistral_decoder import _prefill_attention, _rms_norm, _rotate_half, _silu_mul  # noqa: E402


class Differences:
    """Per step: outputs compared, outputs not bit for bit equal, largest |difference|, first layer."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = defaultdict(lambda: {"elements": 0, "differ": 0, "max_abs": 0.0, "first_layer": None})

    def compare(self, step: str, layer: int, ours: torch.Tensor, seeds: torch.Tensor) -> None:
        ours, seeds = ours.reshape(-1), seeds.reshape(-1).to(ours.dtype)
        entry = self.steps[step]
        differ = int((ours != seeds).sum())
        entry["elements"] += ours.numel()
        entry["differ"] += differ
        entry["max_abs"] = max(entry["max_abs"], float((ours.float() - seeds.float()).abs().max()))
        if differ and entry["first_layer"] is None:
            entry["first_layer"] = layer

    def report(self) -> dict:
        return {step: {**entry, "differ_fraction": entry["differ"] / max(entry["elements"], 1)}
                for step, entry in self.steps.items()}


def capture_seed(model, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:  # noqa: ANN001 - a PeftModel
    """One forward of the seed's model; every layer's step inputs and outputs, and its logits."""
    lm = model.base_model.model
    kept: dict = defaultdict(dict)
    handles = []

    def keep(key: tuple, module: torch.nn.Module, what: str) -> None:
        def hook(_module, args, kwargs, output):  # noqa: ANN001, ANN202
            value = args[0] if args else kwargs.get("hidden_states")
            if what in ("in", "both"):
                kept[key][f"{key[-1]}_in"] = value.detach().clone()
            if what in ("out", "both"):
                out = output[0] if isinstance(output, tuple) else output
                kept[key][f"{key[-1]}_out"] = out.detach().clone()
            if what == "mask":
                kept[key]["mask"] = kwargs.get("attention_mask")
        handles.append(module.register_forward_hook(hook, with_kwargs=True))

    for index, block in enumerate(lm.model.layers):
        attn, mlp = block.self_attn, block.mlp
        keep((index, "layer"), block, "both")
        keep((index, "input_norm"), block.input_layernorm, "out")
        for name in ("q_proj", "k_proj", "v_proj"):
            keep((index, name), getattr(attn, name), "out")
        keep((index, "attn"), attn, "mask")
        keep((index, "o_proj"), attn.o_proj, "both")
        keep((index, "post_norm"), block.post_attention_layernorm, "both")
        keep((index, "gate_proj"), mlp.gate_proj, "out")
        keep((index, "up_proj"), mlp.up_proj, "out")
        keep((index, "down_proj"), mlp.down_proj, "both")
    keep(("final_norm",), lm.model.norm, "out")
    rotary: dict = {}
    handles.append(lm.model.rotary_emb.register_forward_hook(
        lambda _m, _a, out: rotary.update(cos=out[0].detach().clone(), sin=out[1].detach().clone())))
    try:
        logits = model(tokens).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    steps: dict = defaultdict(dict)
    for key, values in kept.items():
        steps[key[0] if len(key) > 1 else "model"].update(values)
    steps["model"].update(rotary)
    return steps, logits


def compare_layers(decoder, model, seed: dict, logits: torch.Tensor, diffs: Differences, gemms_only: bool) -> None:  # noqa: ANN001
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    cfg = decoder.config
    eps = cfg.rms_norm_eps
    group = cfg.num_heads // cfg.num_kv_heads
    cos, sin = seed["model"]["cos"], seed["model"]["sin"]  # [1, T, D]
    length = cos.shape[1]
    if not gemms_only:
        diffs.compare("rotary_cos_table", -1, decoder.cos[:length], cos[0])
        diffs.compare("rotary_sin_table", -1, decoder.sin[:length], sin[0])
    for index, layer in enumerate(decoder.layers):
        s = seed[index]
        h = s["layer_in"]
        qkv_seed = torch.cat([s["q_proj_out"], s["k_proj_out"], s["v_proj_out"]], dim=-1)
        diffs.compare("qkv", index, layer.qkv(s["input_norm_out"]), qkv_seed)
        diffs.compare("o", index, layer.o(s["o_proj_in"]), s["o_proj_out"])
        gate_up_seed = torch.cat([s["gate_proj_out"], s["up_proj_out"]], dim=-1)
        diffs.compare("gate_up", index, layer.gate_up(s["post_norm_out"]), gate_up_seed)
        diffs.compare("down", index, layer.down(s["down_proj_in"]), s["down_proj_out"])
        if gemms_only:
            continue
        diffs.compare("input_norm", index, _rms_norm(h, layer.input_norm, eps), s["input_norm_out"])
        q = s["q_proj_out"].view(1, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = s["k_proj_out"].view(1, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = s["v_proj_out"].view(1, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q_seed, k_seed = apply_rotary_pos_emb(q, k, cos, sin)
        ours_cos, ours_sin = decoder.cos[:length][None, None], decoder.sin[:length][None, None]
        diffs.compare("rotary_q", index, q * ours_cos + _rotate_half(q) * ours_sin, q_seed)
        diffs.compare("rotary_k", index, k * ours_cos + _rotate_half(k) * ours_sin, k_seed)
        attn = _prefill_attention(q_seed, k_seed, v, group, decoder.scale).transpose(1, 2).reshape(1, length, -1)
        diffs.compare("attention", index, attn, s["o_proj_in"])
        attn_module = model.base_model.model.model.layers[index].self_attn
        for name, backends in ATTENTION_VARIANTS.items():
            try:
                out = seed_style_attention(attn_module, q_seed, k_seed, v, s.get("mask"), backends)
            except RuntimeError as error:  # a backend that cannot serve these arguments
                diffs.steps[f"attention_seed_call_{name}"]["error"] = str(error).splitlines()[0][:200]
                continue
            diffs.compare(f"attention_seed_call_{name}", index, out.reshape(1, length, -1), s["o_proj_in"])
        diffs.compare("residual_attention", index, h + s["o_proj_out"], s["post_norm_in"])
        diffs.compare("post_norm", index, _rms_norm(s["post_norm_in"], layer.post_norm, eps), s["post_norm_out"])
        diffs.compare("silu_mul", index, _silu_mul(gate_up_seed), s["down_proj_in"])
        diffs.compare("residual_mlp", index, s["post_norm_in"] + s["down_proj_out"], s["layer_out"])
    last = seed[len(decoder.layers) - 1]["layer_out"]
    if not gemms_only:
        diffs.compare("final_norm", -1, _rms_norm(last, decoder.final_norm, eps), seed["model"]["final_norm_out"])
    diffs.compare("lm_head", -1, decoder.lm_head(seed["model"]["final_norm_out"]), logits)


ATTENTION_VARIANTS: dict[str, list[SDPBackend] | None] = {
    "default": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


def seed_style_attention(module, q, k, v, mask, backends):  # noqa: ANN001, ANN201
    """transformers' own SDPA call (its GQA handling, causal flag and mask) -> [B, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if backends is None:
        return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)[0]
    with sdpa_kernel(backends):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)[0]


@torch.inference_mode()
def main() -> None:
    model, ids, tokens = seed_on_korean_text()
    seed, logits = capture_seed(model, tokens)
    masks = {str(type(seed[i].get("mask")).__name__) for i in range(len(model.base_model.model.model.layers))}
    report: dict = {"device": torch.cuda.get_device_name(0), "positions": len(ids), "seed_attention_masks": sorted(masks),
                    "sdpa_priority": [str(b) for b in torch._C._get_sdp_priority_order()]
                    if hasattr(torch._C, "_get_sdp_priority_order") else None}

    decoder = nf4.build_nf4_decoder(model, max_batch=1, max_seq_len=512)
    diffs = Differences()
    compare_layers(decoder, model, seed, logits, diffs, gemms_only=False)
    report["reference_path"] = diffs.report()
    print(json.dumps(report, indent=1), flush=True)

    reference = logits.float().cpu()
    ids_tensor = torch.tensor(ids)

    def kl(name: str) -> None:
        summary = kl_summary(reference, decoder.prefill(0, ids_tensor, all_logits=True).float().cpu())
        report.setdefault("kl", {})[name] = {"kl_mean": summary["kl_mean"], "top1_agreement": summary["top1_agreement"]}
        print(name, report["kl"][name], flush=True)

    kl("reference_path")
    # The reference path as it ran before run 17: flash attention and one stacked LoRA `A` product
    original_attention, pefts_delta = mistral_decoder._prefill_attention, nf4.LoraParts.delta
    try:
        mistral_decoder._prefill_attention = lambda q, k, v, group, scale: seed_style_attention(
            model.base_model.model.model.layers[0].self_attn, q, k, v, None, ATTENTION_VARIANTS["flash"]
        ).transpose(1, 2)
        nf4.LoraParts.delta = stacked_a_delta
        kl("reference_path_before_run_17")
    finally:
        mistral_decoder._prefill_attention, nf4.LoraParts.delta = original_attention, pefts_delta
    if nf4.enable_nf4_kernels(decoder):
        kernel_diffs = Differences()
        compare_layers(decoder, model, seed, logits, kernel_diffs, gemms_only=True)
        report["prompt_kernels"] = kernel_diffs.report()
        kl("prompt_kernels")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
