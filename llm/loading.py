"""Loading the model in each serving mode and building the engine the bot uses."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from llm.engine import EngineChoice, FakeEngine, GenerationEngine, HFGenerateEngine

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase

    from llm.openai_engine import OpenAIEngineConfig

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


# Total GPU memory (GB) from which `auto` serves `fast`: its peak is 16.0 GB of tensors (16.6 GB
# reserved) plus the CUDA context. A 16 GiB card (~17 GB) cannot hold it; `nf4` (6.4 GB) fits there.
AUTO_FAST_MIN_GPU_GB = 18.0


def resolve_engine_choice(choice: EngineChoice, device: str, total_memory_gb: float | None = None) -> EngineChoice:
    """`auto` is `fast` on a CUDA device with room for it, `nf4` on a smaller one, and `reference`
    elsewhere.

    `fast` needs CUDA for what makes it fast (bf16 weights, CUDA graphs); on the CPU it would only
    be a slower copy of the reference, so the CPU keeps the seed's exact path. On a GPU under
    `AUTO_FAST_MIN_GPU_GB` (`total_memory_gb`: its total memory) `fast` cannot load, while `nf4`, the
    seed's own 4-bit weights, needs 6.4 GB. `device` is the resolved device string ("cuda:0",
    "cpu", ...), so this is testable without a GPU.
    """
    if choice != "auto":
        return choice
    if not device.startswith("cuda"):
        return "reference"
    return "nf4" if total_memory_gb is not None and total_memory_gb < AUTO_FAST_MIN_GPU_GB else "fast"


def gpu_total_gb(device: str) -> float | None:
    """The total memory of a CUDA `device` in GB (None for any other device)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9


def resolve_engine(choice: EngineChoice, device: str) -> EngineChoice:
    """The mode `choice` serves on the resolved `device` (`auto`: by that GPU's memory)."""
    return resolve_engine_choice(choice, device, gpu_total_gb(device) if choice == "auto" else None)


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def load_fake_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    """The fake engine's tokenizer, never from the hub: `ENGINE=fake` must work with no network.

    A model directory's own tokenizer when `base_model` is one (tests use their tiny checkpoint's);
    otherwise Mistral's v1 tokenizer as shipped by mistral-common (the base model's), read without
    importing transformers, so that the fake engine starts in a second.
    """
    from pathlib import Path

    if Path(base_model).expanduser().is_dir():
        return load_tokenizer(str(Path(base_model).expanduser()))
    from llm.mistral_tokenizer import BundledMistralTokenizer

    return BundledMistralTokenizer()  # type: ignore[return-value] - the subset of the interface finbot uses


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
    *,
    fake_fail_on: str = "",
    max_batch: int | None = None,
    max_seq_len: int = 2048,
    max_queue: int = 32,
    cuda_graphs: bool = True,
    compile_kernels: bool = True,
    openai_config: OpenAIEngineConfig | None = None,
    paged_kv: bool = True,
    kv_cache_tokens: int | None = None,
    kv_block_size: int = 32,
    nf4_tuning_cache: Path | None = None,
) -> GenerationEngine:
    """Load the model for `choice` and return a ready engine (warm-up/graph capture included).

    Knobs for `fast`, `nf4` and `low-memory` (ignored by `reference` and `fake`):
    - `max_batch`: concurrent requests in the running batch (default 16 fast and nf4, 2 low-memory);
      with `max_seq_len` it sizes the KV cache: 128 KiB per token slot for Mistral-7B in bf16,
      16 x 2048 = 4.3 GB.
    - `max_seq_len`: prompt + answer tokens per request (prompts longer than this fail).
    - `max_queue`: requests waiting for a slot before `EngineBusyError`.
    - `cuda_graphs`: capture decode steps in CUDA graphs at start-up.
    - `compile_kernels`: fuse element-wise decode pieces with torch.compile (falls back if it fails).
    - `paged_kv` (fast only, default on; nf4 always pages): a block-allocated KV cache shared by all requests,
      sized by `kv_cache_tokens` (default 9,728 tokens = 1.3 GB: fast's peak 15.9 GB instead of
      19.2) in blocks of `kv_block_size` tokens; requests wait (or the youngest is preempted and
      later resumed) when it is full. Off: the static max_batch x max_seq_len cache (4.3 GB).
    - `nf4_tuning_cache` (nf4 only): a JSON file that keeps the kernel tuner's choice, so that the next
      start on the same GPU and version checks it instead of timing every layout (None: tune every start).

    `fake_fail_on` (fake only, for fault tests) makes chosen questions fail like a GPU does, see
    `llm.fault_injection`.

    `openai` sends the prompt ids to a remote OpenAI-compatible server (`openai_config`); only the
    tokenizer is loaded here, from `base_model`.
    """
    if choice == "fake" and device == "auto":
        device = "cpu"  # no model on any device: not even torch needs importing
    device = resolve_device(device)
    requested, choice = choice, resolve_engine(choice, device)
    if requested == "auto" and choice == "nf4":
        logger.info("ENGINE=auto: this GPU has %.1f GB in all, too little for fast (about 16 GB); serving nf4 "
                    "(the seed's own 4-bit weights, about 6.4 GB)", gpu_total_gb(device))
    if choice == "low-memory":
        logger.warning(
            "ENGINE=low-memory is retired in favour of ENGINE=nf4 (the same 4-bit weights: faster, 16 answers "
            "at once, closer to the reference); it is kept for this release only"
        )
    started = time.monotonic()
    tokenizer = load_fake_tokenizer(base_model) if choice == "fake" else load_tokenizer(base_model)
    if choice == "fake":
        engine: GenerationEngine = FakeEngine(tokenizer, fake_reply, fake_tokens_per_second)
        if fake_fail_on:
            from llm.fault_injection import with_faults

            engine = with_faults(engine, fake_fail_on)
    elif choice == "reference":
        engine = HFGenerateEngine(load_reference_model(base_model, adapter, device), tokenizer)
    elif choice in ("fast", "low-memory", "nf4"):
        from llm.serving.fast import build_fast_engine, build_low_memory_engine
        from llm.serving.nf4 import build_nf4_engine

        model = load_reference_model(base_model, adapter, device)
        kwargs: dict = {}
        if choice == "fast":
            kwargs = {"paged_kv": paged_kv, "kv_cache_tokens": kv_cache_tokens, "kv_block_size": kv_block_size}
        elif choice == "nf4":
            kwargs = {"kv_cache_tokens": kv_cache_tokens, "kv_block_size": kv_block_size,
                      "tuning_cache": nf4_tuning_cache}
        build = {"fast": build_fast_engine, "low-memory": build_low_memory_engine, "nf4": build_nf4_engine}[choice]
        engine = build(
            model,
            tokenizer,
            max_batch=max_batch or (2 if choice == "low-memory" else 16),
            max_seq_len=max_seq_len,
            max_queue=max_queue,
            cuda_graphs=cuda_graphs,
            compile_kernels=compile_kernels,
            **kwargs,
        )
        del model
    elif choice == "openai":
        from llm.openai_engine import build_openai_engine

        engine = build_openai_engine(tokenizer, openai_config)
    else:
        raise ValueError(f"engine mode {choice!r} is not available in this build")
    logger.info("engine %s ready on %s in %.1f s", engine.name, device, time.monotonic() - started)
    return engine
