"""Random-weight checkpoints in the real architecture, for tests and benchmarks.

Model weights can never be downloaded where finbot is developed, so tests and benchmarks build
their own: a `MistralForCausalLM` of any size with the real Mistral v1 tokenizer shipped by the
`mistral-common` package, plus a random LoRA adapter with the production adapter's
hyper-parameters (rank 32, alpha 8, dropout 0.05, attention + MLP projections and lm_head).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm.mistral_tokenizer import MISTRAL_TOKENIZER_CONFIG, write_tokenizer_dir  # noqa: F401 - re-exported
from llm.mistral_tokenizer import mistral_v1_tokenizer_file as bundled_tokenizer_file

ADAPTER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ADAPTER_RANK = 32
ADAPTER_ALPHA = 8
ADAPTER_DROPOUT = 0.05


def mistral_v1_tokenizer_file() -> Path:
    # A name of this module (not only of llm.mistral_tokenizer) so that GPU tests can point it at a
    # carried copy of the file where mistral-common is not installed (tests/gpu/conftest.py).
    return bundled_tokenizer_file()


def write_mistral_tokenizer(out_dir: Path, tokenizer_file: Path | None = None) -> None:
    """`tokenizer_file` defaults to mistral-common's copy (pass one where that package is absent)."""
    write_tokenizer_dir(out_dir, tokenizer_file or mistral_v1_tokenizer_file())


def tiny_mistral_config(num_hidden_layers: int = 2, hidden_size: int = 64):  # noqa: ANN201
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    )


def mistral_7b_config():  # noqa: ANN201
    """The exact shape of Mistral-7B-v0.1 (and so of komt-mistral-7b-v1)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        sliding_window=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_random_checkpoint(
    out_dir: Path,
    config=None,  # noqa: ANN001 - a transformers MistralConfig
    seed: int = 0,
    lora_init_std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    tokenizer_file: Path | None = None,
) -> tuple[Path, Path]:
    """Write `out_dir/base` (model + tokenizer) and `out_dir/adapter` (LoRA); return both paths.

    The adapter's B matrices are random too (PEFT initialises them to zero), so the adapter
    really changes the function and tests can tell a merged model from a plain base.
    `device="cuda"` initialises a 7B model in seconds instead of minutes on the CPU.
    """
    from transformers import MistralForCausalLM

    config = config or tiny_mistral_config()
    base_dir, adapter_dir = out_dir / "base", out_dir / "adapter"
    torch.manual_seed(seed)
    with torch.device(device):
        model = MistralForCausalLM(config).to(dtype)
    model.save_pretrained(base_dir)
    write_mistral_tokenizer(base_dir, tokenizer_file)

    peft_model = add_random_lora(model, std=lora_init_std)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def add_random_lora(model, std: float = 0.02):  # noqa: ANN001, ANN201 - transformers model -> peft PeftModel
    """Wrap `model` in a LoRA of the production adapter's shape, with random B matrices too.

    PEFT initialises B to zero, which would leave the function unchanged; drawing it lets tests
    tell a merged model from a plain base and gives benchmarks a realistic adapter. The draws come
    from torch's global RNG, not a seed of their own: callers seed once before building the model,
    so a given seed keeps giving the same checkpoint as before this was shared.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=ADAPTER_RANK,
        lora_alpha=ADAPTER_ALPHA,
        lora_dropout=ADAPTER_DROPOUT,
        target_modules=ADAPTER_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    return peft_model
