"""`finbot export-merged OUT_DIR`: the faithful merged checkpoint for vLLM or `transformers serve`.

The base is loaded exactly as the seed (and `ENGINE=reference`) loads it: NF4 4-bit with double
quantization and bf16 compute, the LoRA adapter on top as a `PeftModel`. Each projection is then
written as dequant(W_nf4) + scaling * B @ A (summed in float32, rounded once to bf16), lm_head
included since the adapter targets it; embeddings and norms are copied in bf16. The result is the
function the seed's model computes, as a plain `MistralForCausalLM` in bf16 safetensors with the
base's tokenizer files beside it.

The per-layer merge is `llm.serving.fast.merged_weight` (shared with the fast GPU engine), so the served
and exported weights are the same numbers.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A plain causal LM's state dict from a (4-bit, LoRA) `PeftModel` or a plain model.

    Keys are the plain model's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...);
    every linear layer is dequantized and has its active adapters merged.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from torch import nn

    from llm.serving.fast import _causal_lm, base_weight, merged_weight

    dtype = dtype or torch.bfloat16
    causal_lm = _causal_lm(model)
    state: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in causal_lm.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            state[f"{name}.weight"] = merged_weight(module, dtype).cpu()
        elif isinstance(module, nn.Linear):  # bnb's Linear4bit is an nn.Linear too
            base = module
            state[f"{name}.weight"] = base_weight(module).to(dtype).cpu()
        else:
            continue
        if getattr(base, "bias", None) is not None:
            state[f"{name}.bias"] = base.bias.detach().to(dtype).cpu()
        handled.add(name)
    for name, parameter in causal_lm.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in handled or any(owner.startswith(prefix + ".") for prefix in handled):
            continue
        state[name] = parameter.detach().to(dtype).cpu()
    return state


def plain_config(model: nn.Module, dtype: torch.dtype | None = None):  # noqa: ANN201 - PretrainedConfig
    """The model's config without its quantization settings, in `dtype`."""
    import torch

    from llm.serving.fast import _causal_lm

    config = copy.deepcopy(_causal_lm(model).config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = dtype or torch.bfloat16
    return config


def export_merged(
    base_model: str,
    adapter: str,
    out_dir: str | Path,
    device: str = "auto",
    max_shard_size: str = "5GB",
) -> Path:
    """Load the seed's model, merge, and write `out_dir` (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.loading import load_reference_model, load_tokenizer, resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    device = resolve_device(device)
    model = load_reference_model(base_model, adapter, device)
    state = merged_state_dict(model, torch.bfloat16)
    config = plain_config(model, torch.bfloat16)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"merged weights do not fit the architecture: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    load_tokenizer(base_model).save_pretrained(out)
    logger.info("merged checkpoint written to %s in %.1f s", out, time.monotonic() - started)
    return out
