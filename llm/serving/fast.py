"""Building the `fast` and `low-memory` serving modes from the seed's model.

Both start from exactly what the seed loads (`load_reference_model`: NF4 + double-quant base via
bitsandbytes, LoRA as an unmerged `PeftModel`).

`fast`: every bnb `Linear4bit` is dequantized (giving the very bf16 matrix the seed multiplies
with), the LoRA delta `scaling * B @ A` is added in float32 (lm_head included) and the sum is
rounded once to bf16. The served model therefore computes dequant(W_nf4) + BA, the function the
adapter was trained against, without 225 adapter calls per token. q/k/v and gate/up are fused,
the source modules are freed layer by layer (peak ~ the bf16 model), and decoding runs through
`MistralDecoder` with a static KV cache and CUDA graphs captured at start-up.

`low-memory`: the same decoder and graphs, but every projection stays the seed's own PEFT module
over the 4-bit weight (bnb's 4-bit kernels, the adapter unmerged in its own dtype), so memory stays
at the seed's ~4.5 GB plus the KV cache.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from llm.serving import programmatic_launch
from llm.serving.batching import BatchingEngine, DecoderStepModel, check_triton_sampling
from llm.serving.mistral_decoder import (
    DecodeGraphs,
    DecoderConfig,
    DenseHead,
    DenseLayer,
    MistralDecoder,
    ModuleLayer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The `MistralForCausalLM` inside a PeftModel (or the model itself)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def base_weight(layer: nn.Module) -> torch.Tensor:
    """A plain or bnb 4-bit Linear's weight as a dense tensor (dequantized as bnb's own matmul does)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):  # bnb repacks for its CPU kernel
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, quant_state = _convert_weight_packed_for_cpu_inverse(data, copy.copy(quant_state))
        return bnbf.dequantize_4bit(data, quant_state)
    return weight.data


def merged_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) + sum over active adapters of scaling * B @ A, summed in float32, rounded once."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return base_weight(module).to(dtype)
    if getattr(module, "merged", False):
        raise ValueError("adapter is already merged into a (quantized) base layer")
    if getattr(module, "disable_adapters", False):
        return base_weight(module.get_base_layer()).to(dtype)
    weight = base_weight(module.get_base_layer()).to(torch.float32)
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False) or getattr(module, "lora_variant", {}).get(adapter):
            raise ValueError(f"adapter {adapter!r} uses a LoRA variant this merge does not support")
        a = module.lora_A[adapter].weight.to(torch.float32)
        b = module.lora_B[adapter].weight.to(torch.float32)
        weight = weight + module.scaling[adapter] * (b @ a)
    return weight.to(dtype)


def _free(parent: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(parent, name, nn.Identity())


def build_merged_decoder(
    model: nn.Module,
    max_batch: int,
    max_seq_len: int,
    dtype: torch.dtype | None = None,
    free_source: bool = False,
    compile_kernels: bool = False,
    kv_cache_tokens: int | None = None,
    kv_block_size: int = 32,
) -> MistralDecoder:
    """A dense `MistralDecoder` with the LoRA merged (paged KV cache of `kv_cache_tokens` tokens
    in `kv_block_size`-token blocks, or the static per-slot cache when None). `free_source` empties the source model's
    projections as it goes (the model is unusable afterwards) so the peak stays near one copy."""
    lm = _causal_lm(model)
    config = DecoderConfig.from_hf(lm.config)
    embed = lm.model.embed_tokens.weight.data
    dtype = dtype or embed.dtype
    layers = []
    with torch.no_grad():
        for index, block in enumerate(lm.model.layers):
            attn, mlp = block.self_attn, block.mlp
            layer = DenseLayer(
                input_norm=block.input_layernorm.weight.data.to(dtype),
                post_norm=block.post_attention_layernorm.weight.data.to(dtype),
                qkv=torch.cat([merged_weight(getattr(attn, n), dtype) for n in _ATTN[:3]]),
                o=merged_weight(attn.o_proj, dtype),
                gate_up=torch.cat([merged_weight(getattr(mlp, n), dtype) for n in _MLP[:2]]),
                down=merged_weight(mlp.down_proj, dtype),
            )
            layers.append(layer)
            if free_source:
                _free(attn, _ATTN)
                _free(mlp, _MLP)
                if index % 4 == 3:  # bnb's Params4bit <-> Linear4bit reference cycle needs the GC
                    gc.collect()
        lm_head_weight = merged_weight(lm.lm_head, dtype)
        if free_source:
            lm.lm_head = nn.Identity()
        embed = embed.to(dtype)
        final_norm = lm.model.norm.weight.data.to(dtype)
    if free_source:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return MistralDecoder(
        config, embed, layers, final_norm, DenseHead(lm_head_weight), max_batch, max_seq_len,
        compile_kernels=compile_kernels, kv_cache_tokens=kv_cache_tokens, kv_block_size=kv_block_size,
        scratch_row=True,  # for the bucketed (graph-captured) prefill of `fast`
    )


def build_module_decoder(
    model: nn.Module, max_batch: int, max_seq_len: int, compile_kernels: bool = False
) -> MistralDecoder:
    """A `MistralDecoder` whose projections are the model's own modules (4-bit + unmerged LoRA)."""
    lm = _causal_lm(model)
    config = DecoderConfig.from_hf(lm.config)
    layers = []
    for block in lm.model.layers:
        attn, mlp = block.self_attn, block.mlp
        layers.append(
            ModuleLayer(
                block.input_layernorm.weight.data,
                block.post_attention_layernorm.weight.data,
                attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            )
        )
    return MistralDecoder(
        config,
        lm.model.embed_tokens.weight.data,
        layers,
        lm.model.norm.weight.data,
        lm.lm_head,
        max_batch,
        max_seq_len,
        compile_kernels=compile_kernels,
    )


def _warm_up(graphs: DecodeGraphs, compile_kernels: bool, triton: bool = False) -> dict:
    """Compile (optional), pick Triton kernels (optional, CUDA only) and capture all buckets;
    fall back to plainer settings if that fails."""
    info: dict = {"cuda_graphs": False, "compiled_kernels": False, "triton": False}
    decoder = graphs.decoder
    started = time.monotonic()
    if graphs.use_graphs:
        use_triton = False
        if triton:
            try:  # times Triton vs cuBLAS per (projection, batch bucket) before any capture
                info["triton_plan"] = decoder.enable_triton(graphs.batch_buckets)
                use_triton = decoder.fused_rope_kv
            except Exception as error:  # e.g. a Triton that cannot compile for this GPU
                logger.warning("Triton kernels unavailable, using cuBLAS + PyTorch: %r", error)
                info["triton_error"] = repr(error)
                decoder.disable_triton()
        attempts = [(c, t) for c in ([True, False] if compile_kernels else [False])
                    for t in ([True, False] if use_triton else [False])]
        for compiled, with_triton in attempts:
            try:
                if compiled:
                    decoder.enable_compiled_kernels()
                else:
                    decoder.disable_compiled_kernels()
                if not with_triton:
                    decoder.disable_triton()
                graphs.capture()
                info.update(cuda_graphs=True, compiled_kernels=compiled, triton=with_triton)
                break
            except Exception as error:  # e.g. no Triton/compiler on this machine
                logger.warning(
                    "graph capture (compiled=%s, triton=%s) failed, falling back: %r", compiled, with_triton, error
                )
                graphs._graphs.clear()
                info[f"capture_error_compiled_{compiled}_triton_{with_triton}"] = repr(error)
                torch.cuda.synchronize()
        else:
            decoder.disable_compiled_kernels()
            decoder.disable_triton()
            graphs.use_graphs = False
    # one real prefill + decode so the first request pays no lazy initialisation
    graphs.prefill_many([0], [torch.tensor([1, 2, 3])])
    graphs.decode([1], [3])
    decoder.kv_release(0)
    info.update(check_triton_sampling(decoder.device, decoder.config.vocab_size))
    info["warm_up_s"] = round(time.monotonic() - started, 2)
    # decode kernels scheduled while the one before finishes (Hopper and newer)
    info["programmatic_launch"] = programmatic_launch.enabled(decoder.device)
    info["buckets"] = {"batch": graphs.batch_buckets, "kv_len": graphs.kv_buckets}
    info["prefill_graphs"] = graphs.prefill_graph_count
    if graphs.bucketed_prefill:
        info["prefill_buckets"] = {"rows": graphs.prefill_rows, "length": graphs.prefill_lengths,
                                   "token_budget": graphs.prefill_token_budget}
    info["kv_cache_gb"] = round(decoder.kv_cache_bytes / 1e9, 3)
    info["kv_paged"] = decoder.paged
    if decoder.kv is not None:
        info["kv_cache_tokens"] = (decoder.kv.num_blocks - 1) * decoder.kv.block_size
        info["kv_block_size"] = decoder.kv.block_size
        info["paged_attention"] = "triton" if decoder.reads_real_lengths else "torch-gather"
    return info


def _kv_buckets(max_seq_len: int, step: int = 256) -> list[int] | None:
    """KV-length buckets every 256 tokens: a batch's attention reads the cache up to its bucket,
    so at batch 16 the doubling buckets (..., 512, 1024, 2048) read up to 2x the KV needed.
    More buckets only cost capture time (the graphs share one memory pool)."""
    if max_seq_len <= step:
        return None
    sizes = list(range(step, max_seq_len, step))
    return [*sizes, max_seq_len]


# Default KV token budget of `fast` (paged, all requests together). 128 KiB per token for
# Mistral-7B in bf16: 9,728 tokens = 1.28 GB; with the 14.48 GB of weights, graph buffers and
# workspaces run 8 measured a 15.93 GB allocated serving peak (prefill runs in CUDA graphs, so its
# activations stay in the graph pool: 16.44 GB reserved). It holds 16 requests of ~600 tokens
# (prompt + answer) at once: the bench's 16 staggered requests (up to 9,376 tokens) run without
# preemption; 8,192 tokens (15.69 GB) preempted twice and lost 19 % of the throughput (run 8a).
FAST_KV_CACHE_TOKENS = 9728


def build_fast_engine(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_batch: int = 16,
    max_seq_len: int = 2048,
    max_queue: int = 32,
    cuda_graphs: bool = True,
    compile_kernels: bool = True,
    dtype: torch.dtype | None = None,
    free_source: bool = True,
    triton_kernels: bool = True,
    paged_kv: bool = True,
    kv_cache_tokens: int | None = None,
    kv_block_size: int = 32,
) -> BatchingEngine:
    """`fast` mode from the seed's model (consumed when `free_source`). `triton_kernels`: the
    decode step's Triton GEMMs (where faster than cuBLAS), fused rotary + KV write and paged
    decode attention (CUDA). `paged_kv` (default): a block-allocated KV cache of `kv_cache_tokens`
    tokens shared by all requests (default `FAST_KV_CACHE_TOKENS`, at most max_batch x
    max_seq_len, at least max_seq_len); False: the static max_batch x max_seq_len cache (4.3 GB
    at 16 x 2048 instead of 1.3 GB; run 8 measured it 5 % slower on the 16 staggered requests).
    Prompts are prefilled through CUDA graphs captured per (rows, length) bucket."""
    tokens = None
    if paged_kv:
        tokens = kv_cache_tokens or min(FAST_KV_CACHE_TOKENS, max_batch * max_seq_len)
    decoder = build_merged_decoder(
        model, max_batch, max_seq_len, dtype=dtype, free_source=free_source,
        kv_cache_tokens=tokens, kv_block_size=kv_block_size,
    )
    graphs = serving_graphs(decoder, max_seq_len, cuda_graphs)
    info = _warm_up(graphs, compile_kernels, triton=triton_kernels)
    return BatchingEngine(DecoderStepModel(graphs), tokenizer, name="fast", max_queue=max_queue, info=info)


def serving_graphs(decoder: MistralDecoder, max_seq_len: int, cuda_graphs: bool) -> DecodeGraphs:
    """The decode and bucketed-prefill graphs every batched serving mode runs (`fast`, `nf4`)."""
    return DecodeGraphs(
        decoder, use_graphs=cuda_graphs, kv_buckets=_kv_buckets(max_seq_len), bucketed_prefill=True
    )


def build_low_memory_engine(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_batch: int = 2,
    max_seq_len: int = 2048,
    max_queue: int = 32,
    cuda_graphs: bool = True,
    compile_kernels: bool = True,
) -> BatchingEngine:
    """`low-memory` mode: the seed's 4-bit modules as they are, under the graph-captured decoder."""
    decoder = build_module_decoder(model, max_batch, max_seq_len)
    graphs = DecodeGraphs(decoder, use_graphs=cuda_graphs)
    info = _warm_up(graphs, compile_kernels)
    return BatchingEngine(
        DecoderStepModel(graphs), tokenizer, name="low-memory", max_queue=max_queue, info=info
    )
