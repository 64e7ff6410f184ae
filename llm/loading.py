"""Loading the model in each serving mode and building the engine the bot uses."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from llm.engine import EngineChoice, FakeEngine, GenerationEngine, HFGenerateEngine

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_engine_choice(choice: EngineChoice, device: str) -> EngineChoice:
    """`auto` serves the reference path until a faster mode is available for the device."""
    if choice != "auto":
        return choice
    return "reference"


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def load_reference_model(base_model: str | None, adapter: str, device: str):  # noqa: ANN201
    """The seed's loading path: NF4 4-bit base with double quantization and bf16 compute,
    the LoRA adapter on top as an unmerged `PeftModel`.

    `base_model=None` takes the base recorded in the adapter's config, as the seed does;
    a setting can point it at a local copy instead.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    peft_config = PeftConfig.from_pretrained(adapter)
    base = base_model or peft_config.base_model_name_or_path
    if base_model and peft_config.base_model_name_or_path not in (None, base_model):
        logger.info(
            "adapter %s was trained on %s; loading base from %s",
            adapter, peft_config.base_model_name_or_path, base_model,
        )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, device_map={"": device}
    )
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def build_engine(
    choice: EngineChoice,
    base_model: str,
    adapter: str,
    device: str = "auto",
    fake_reply: str = "",
    fake_tokens_per_second: float = 0,
) -> GenerationEngine:
    device = resolve_device(device)
    choice = resolve_engine_choice(choice, device)
    started = time.monotonic()
    tokenizer = load_tokenizer(base_model)
    if choice == "fake":
        engine: GenerationEngine = FakeEngine(tokenizer, fake_reply, fake_tokens_per_second)
    elif choice == "reference":
        engine = HFGenerateEngine(load_reference_model(base_model, adapter, device), tokenizer)
    else:
        raise ValueError(f"engine mode {choice!r} is not available in this build")
    logger.info("engine %s ready on %s in %.1f s", engine.name, device, time.monotonic() - started)
    return engine
