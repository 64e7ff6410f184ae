"""The seed's own 4-bit model, served as it is: bitsandbytes NF4 weights + the unmerged LoRA.

`nf4` mode keeps every projection in the very bytes bitsandbytes quantized (packed NF4, two
values per byte, high nibble first) with the absmax of each 64-value block. The nested (double)
quantization of those absmax values is undone once at load time, exactly as
`bitsandbytes.functional.dequantize_4bit` undoes it (8-bit code x second-level absmax, + offset,
float32), so a weight's dequantized value is always `bf16(code[nibble] * absmax)`: bit for bit
what bitsandbytes hands to its matmul.

The LoRA stays unmerged and is computed as PEFT computes it: `x` cast to the adapter's float32,
`B(A(x)) * scaling` in float32, rounded to bf16 and added to the base output (PEFT's bnb 4-bit
layer); for the bf16 lm_head, the float32 sum is rounded once (PEFT's plain Linear layer). So the
served function is the one the adapter was trained on, not a merge rounded to bf16.

Two paths compute the same thing:
- reference (CPU, and prompts on CUDA): dequantize (the Triton kernel on CUDA, PyTorch elsewhere)
  and multiply with `F.linear`, the LoRA with `F.linear` in float32;
- decode on CUDA (up to 16 rows): `llm.serving.nf4_kernels` reads the packed bytes directly (a GEMV that
  dequantizes in registers) and adds the LoRA's `B` product in its epilogue, after one small kernel
  for the `A` product shared by the projections that take the same input (q/k/v, gate/up).
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase

    from llm.serving.batching import BatchingEngine
    from llm.serving.mistral_decoder import MistralDecoder

logger = logging.getLogger(__name__)

BLOCK_SIZE = 64  # values per absmax block (bitsandbytes' 4-bit default, and the seed's)
# bitsandbytes' NF4 code table (its float32 values, as `QuantState.code` holds them): for kernels compiled
# or emulated without a model (the offline checks); served kernels take each weight's own table
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
MAX_KERNEL_ROWS = 16  # decode batches up to this many rows take the fused kernels
# Prompt chunks up to this many rows (a prefill's prompts together) take PEFT's own LoRA products:
# the seed's function bit for bit (run 20: prompt KL 0.0). Longer ones take the tensor cores' TF32x3
# products (KL ~0.001), which keep a 1,500-token prompt's first token within 80 ms (run 20: 85 ms
# with PEFT's products). Prompts longer than NF4_PREFILL_CHUNK are row-chunked anyway, which the
# seed does not do.
EXACT_PROMPT_ROWS = 512
# Every prompt chunk dequantizes every weight once (`fast`'s 512 rows: three passes for a
# 1,500-token prompt). 768 rows take two, for ~30 MB more of prefill transients.
NF4_PREFILL_CHUNK = 768


@dataclass
class NF4Matrix:
    """A [out_features, in_features] weight as bitsandbytes packed it."""

    packed: torch.Tensor  # uint8 [N, K // 2]: element 2j in the high nibble, 2j + 1 in the low one
    absmax: torch.Tensor  # float32 [N, K // 64]
    code: torch.Tensor  # float32 [16]: the NF4 values

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.code))

    @classmethod
    def from_bnb(cls, weight: nn.Parameter) -> NF4Matrix:
        """From a bitsandbytes `Params4bit` (nf4, blocksize 64), nested absmax resolved as bnb does."""
        import bitsandbytes.functional as bnbf

        quant_state = weight.quant_state
        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):  # bnb repacks for its CPU kernel
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, quant_state = _convert_weight_packed_for_cpu_inverse(data, copy.copy(quant_state))
        if quant_state.quant_type != "nf4" or quant_state.blocksize != BLOCK_SIZE:
            raise ValueError(
                f"nf4 mode needs NF4 weights in blocks of {BLOCK_SIZE}; got {quant_state.quant_type} "
                f"in blocks of {quant_state.blocksize}"
            )
        rows, cols = quant_state.shape
        if cols % BLOCK_SIZE:
            raise ValueError(f"in_features {cols} is not a multiple of the block size {BLOCK_SIZE}")
        absmax = quant_state.absmax
        if quant_state.nested:
            # The same three steps as bitsandbytes.functional.dequantize_4bit.
            absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
            absmax += quant_state.offset
        absmax = absmax.float()
        return cls(
            packed=data.reshape(rows, cols // 2).contiguous(),
            absmax=absmax.reshape(rows, cols // BLOCK_SIZE).contiguous(),
            code=quant_state.code.float().to(data.device).contiguous(),
        )

    @staticmethod
    def concat(parts: Sequence[NF4Matrix]) -> NF4Matrix:
        """Row-wise concatenation (q/k/v, gate/up share one GEMV)."""
        code = parts[0].code
        if any(not torch.equal(p.code, code) for p in parts[1:]):
            raise ValueError("fused projections use different NF4 code tables")
        return NF4Matrix(
            packed=torch.cat([p.packed for p in parts]),
            absmax=torch.cat([p.absmax for p in parts]),
            code=code,
        )

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, rows: slice | None = None) -> torch.Tensor:
        """bf16(code[nibble] * absmax) for every value (all rows, or `rows`)."""
        packed = self.packed if rows is None else self.packed[rows]
        absmax = self.absmax if rows is None else self.absmax[rows]
        if packed.is_cuda:
            from llm.serving import nf4_kernels

            if nf4_kernels.available(packed.device):
                return nf4_kernels.dequantize(packed, absmax, self.code, dtype)
        n, half = packed.shape
        nibbles = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(n, half * 2).long()
        values = self.code[nibbles].reshape(n, -1, BLOCK_SIZE) * absmax.unsqueeze(-1)
        return values.reshape(n, half * 2).to(dtype)


@dataclass
class LoraParts:
    """The LoRA of one projection, or of several fused ones taking the same input.

    `a` stacks the parts' A matrices ([sum of ranks, K], float32): one product gives every part's
    low-rank input. `b` holds, for each output row, its part's B row ([N, rank], float32).
    `segments` are (first row, end row, first column of `a`'s output) per part."""

    a: torch.Tensor
    b: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    rank: int
    scaling: float
    # The kernels' progress counters by name (`counters`): the tensor-core path's LoRA `A` kernel's
    # finished programs per rank block ("arrivals"), the fused kernel's ("fused"), the blocks of each
    # feature tile done when several split K ("tiles"). Per projection, so that no two kernels ever
    # share counters; every launch leaves them at zero.
    _counters: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def counters(self, name: str, size: int, device: torch.device) -> torch.Tensor:
        """The zeroed int32 counters `name` (at least `size`) on `device`, made on first use: outside
        a CUDA graph capture, since the tuner and the warm-up call every kernel before any capture."""
        found = self._counters.get(name)
        if found is None or found.device != device or found.numel() < size:
            found = self._counters[name] = torch.zeros(size, dtype=torch.int32, device=device)
        return found

    @classmethod
    def stacked(cls, a: torch.Tensor, b: torch.Tensor, part_rows: Sequence[int], rank: int,
                scaling: float) -> LoraParts:
        """The LoRA of a fused projection whose parts have `part_rows` output rows each, their `A` rows
        (rank each) and `B` rows stacked in that order."""
        segments, row = [], 0
        for i, rows in enumerate(part_rows):
            segments.append((row, row + rows, rank * i))
            row += rows
        return cls(a=a, b=b, segments=tuple(segments), rank=rank, scaling=scaling)

    @classmethod
    def from_peft(cls, modules: Sequence[nn.Module]) -> LoraParts | None:
        """From PEFT LoRA layers (one active adapter); None when none of them has an adapter."""
        from peft.tuners.lora import LoraLayer

        a_parts, b_parts, part_rows = [], [], []
        rank = scaling = None
        for module in modules:
            out_features = module.get_base_layer().out_features if isinstance(module, LoraLayer) else module.out_features
            adapters = [a for a in module.active_adapters if a in module.lora_A] if isinstance(module, LoraLayer) else []
            if getattr(module, "disable_adapters", False):
                adapters = []
            if len(adapters) > 1:
                raise ValueError("nf4 mode serves one active adapter")
            if not adapters:
                raise ValueError("nf4 mode needs the adapter on every fused projection")
            adapter = adapters[0]
            if module.use_dora.get(adapter, False) or getattr(module, "lora_variant", {}).get(adapter):
                raise ValueError(f"adapter {adapter!r} uses a LoRA variant nf4 mode does not compute")
            # Kept in the adapter's own dtype: PEFT computes the LoRA in it (float32 by default).
            a = module.lora_A[adapter].weight.detach()
            b = module.lora_B[adapter].weight.detach()
            if rank is None:
                rank, scaling = a.shape[0], float(module.scaling[adapter])
            elif a.shape[0] != rank or float(module.scaling[adapter]) != scaling:
                raise ValueError("fused projections have adapters of different rank or scaling")
            a_parts.append(a)
            b_parts.append(b)
            part_rows.append(out_features)
        assert rank is not None and scaling is not None
        return cls.stacked(torch.cat(a_parts).contiguous(), torch.cat(b_parts).contiguous(), part_rows, rank,
                           scaling)

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    @property
    def boundaries(self) -> list[int]:
        """The first output row of every part but the first (where a kernel tile must not straddle)."""
        return [start for start, _, _ in self.segments[1:]]

    def part_starts(self, n: int) -> tuple[int, int]:
        """The second and third parts' first rows, n where there is none: the kernels' SEG1, SEG2
        (a fused projection has at most three parts)."""
        starts = self.boundaries + [n, n]
        return starts[0], starts[1]

    def a_products(self, x: torch.Tensor) -> list[torch.Tensor]:
        """PEFT's `lora_A(x)` per original projection, in the adapter's dtype ([rows, rank] each):
        one product per part as PEFT runs them. One stacked `A` product for q/k/v rounds differently
        in float32 (on the H200, a few q/k/v outputs moved by a bf16 step; with per-projection
        products a prompt equals the seed's bit for bit: bench/nf4_layer_diff.py)."""
        xf = x.to(self.a.dtype)
        return [F.linear(xf, self.a[col : col + self.rank]) for _, _, col in self.segments]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(x)) in the adapter's dtype, [rows, N]: PEFT's `lora_B(lora_A(x)) * scaling`."""
        parts = [
            F.linear(t, self.b[start:end]) * self.scaling
            for (start, end, _), t in zip(self.segments, self.a_products(x), strict=True)
        ]
        return torch.cat(parts, dim=-1)


class NF4Projection:
    """One projection (or fused group): NF4 base + unmerged LoRA, computed as PEFT does.

    `round_lora_first`: PEFT's bnb 4-bit layer rounds the LoRA output to bf16 before adding it;
    its plain Linear layer (the lm_head) adds in float32 and rounds the sum once."""

    def __init__(self, weight: NF4Matrix, lora: LoraParts, round_lora_first: bool = True) -> None:
        self.weight = weight
        self.lora = lora
        self.round_lora_first = round_lora_first
        self.use_kernels = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not self.use_kernels:
            out = self.reference(flat)
        elif flat.shape[0] <= MAX_KERNEL_ROWS and not self._plan_prefers_dequantizing(flat.shape[0]):
            from llm.serving import nf4_kernels

            out = nf4_kernels.nf4_lora_linear(flat, self.weight, self.lora, self.round_lora_first)
        else:
            out = self.prompt(flat)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def after_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This projection of `silu(gate) * up` (gate_up = [gate | up], one row) in one launch with the
        element-wise step; None where the kernels do not serve it so (then: `_silu_mul` first)."""
        if not self.use_kernels:
            return None
        from llm.serving import nf4_kernels

        return nf4_kernels.nf4_after_silu_mul(gate_up, self.weight, self.lora, self.round_lora_first)

    def after_add_norm(self, residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(residual + delta, this projection of its RMSNorm), one row, in one launch; None where the
        kernels do not serve it so."""
        if not self.use_kernels:
            return None
        from llm.serving import nf4_kernels

        return nf4_kernels.nf4_after_add_norm(residual, delta, norm_weight, eps, self.weight, self.lora,
                                              self.round_lora_first)

    def _plan_prefers_dequantizing(self, rows: int) -> bool:
        from llm.serving import nf4_kernels

        return nf4_kernels.PLAN.use_reference(rows, *self.weight.shape)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequant(W).T as the seed's modules compute it for many rows (bitsandbytes' dequantize +
        F.linear): one original projection (LoRA part) at a time, its whole weight dequantized (cuBLAS
        picks its kernel and K split by N: a part's rows split otherwise would change its bits)."""
        return torch.cat(
            [F.linear(x, self.weight.dequantize(x.dtype, slice(start, end))) for start, end, _ in self.lora.segments],
            dim=-1,
        )

    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        """The reference function for many rows, on the GPU kernels' prompt path where it fits."""
        from llm.serving import nf4_kernels

        if not nf4_kernels.prompt_path_fits(self.lora.boundaries):
            return self.reference(x)
        return nf4_kernels.nf4_prompt_linear(x, self.weight, self.lora, self.round_lora_first,
                                             pefts_products=x.shape[0] <= EXACT_PROMPT_ROWS)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x)
        delta = self.lora.delta(x)
        if self.round_lora_first:
            return base + delta.to(base.dtype)
        return (base.float() + delta).to(base.dtype)


class DenseLoraHead:
    """The bf16 lm_head with its unmerged LoRA (PEFT's plain Linear: the float32 sum rounded once)."""

    def __init__(self, weight: torch.Tensor, lora: LoraParts) -> None:
        self.weight = weight
        self.lora = lora

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = (F.linear(flat, self.weight).float() + self.lora.delta(flat)).to(self.weight.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class NF4Layer:
    """A decoder layer's projections for `MistralDecoder`: q/k/v and gate/up fused, all NF4."""

    def __init__(
        self,
        input_norm: torch.Tensor,
        post_norm: torch.Tensor,
        qkv: NF4Projection,
        o: NF4Projection,
        gate_up: NF4Projection,
        down: NF4Projection,
    ) -> None:
        self.input_norm, self.post_norm = input_norm, post_norm
        self.projections = {"qkv": qkv, "o": o, "gate_up": gate_up, "down": down}

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.projections["qkv"](x)

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self.projections["o"](x)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return self.projections["gate_up"](x)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self.projections["down"](x)

    # The decode step's element-wise pieces inside the next projection's launch, where the kernels
    # serve that (one row): `MistralDecoder` falls back to the separate pieces on None.
    def after_add_norm(self, name: str, h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.projections[name].after_add_norm(h, delta, norm_weight, eps)

    def down_after_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        return self.projections["down"].after_silu_mul(gate_up)

    @property
    def nbytes(self) -> int:
        return sum(p.weight.nbytes + p.lora.nbytes for p in self.projections.values())


def _nf4_projection(modules: Sequence[nn.Module]) -> NF4Projection:
    bases = [m.get_base_layer() for m in modules]
    weight = NF4Matrix.concat([NF4Matrix.from_bnb(b.weight) for b in bases])
    lora = LoraParts.from_peft(modules)
    assert lora is not None
    return NF4Projection(weight, lora)


def build_nf4_decoder(
    model: nn.Module,
    max_batch: int,
    max_seq_len: int,
    free_source: bool = False,
    compile_kernels: bool = False,
    kv_cache_tokens: int | None = None,
    kv_block_size: int = 32,
) -> MistralDecoder:
    """A `MistralDecoder` over the seed's NF4 weights and unmerged LoRA (see the module docstring).

    `free_source` empties the source model's projections as it goes (unusable afterwards)."""
    from llm.serving.fast import _ATTN, _MLP, _causal_lm, _free
    from llm.serving.mistral_decoder import DecoderConfig, MistralDecoder

    lm = _causal_lm(model)
    config = DecoderConfig.from_hf(lm.config)
    embed = lm.model.embed_tokens.weight.data
    dtype = embed.dtype
    layers = []
    with torch.no_grad():
        for index, block in enumerate(lm.model.layers):
            attn, mlp = block.self_attn, block.mlp
            layers.append(
                NF4Layer(
                    input_norm=block.input_layernorm.weight.data.to(dtype),
                    post_norm=block.post_attention_layernorm.weight.data.to(dtype),
                    qkv=_nf4_projection([getattr(attn, n) for n in _ATTN[:3]]),
                    o=_nf4_projection([attn.o_proj]),
                    gate_up=_nf4_projection([getattr(mlp, n) for n in _MLP[:2]]),
                    down=_nf4_projection([mlp.down_proj]),
                )
            )
            if free_source:
                _free(attn, _ATTN)
                _free(mlp, _MLP)
                if index % 4 == 3:  # bnb's Params4bit <-> Linear4bit reference cycle needs the GC
                    gc.collect()
        head_module = lm.lm_head
        head_lora = LoraParts.from_peft([head_module])
        assert head_lora is not None
        head = DenseLoraHead(head_module.get_base_layer().weight.data.to(dtype), head_lora)
        if free_source:
            lm.lm_head = nn.Identity()
        final_norm = lm.model.norm.weight.data.to(dtype)
    if free_source:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return MistralDecoder(
        config, embed, layers, final_norm, head, max_batch, max_seq_len,
        compile_kernels=compile_kernels, kv_cache_tokens=kv_cache_tokens, kv_block_size=kv_block_size,
        scratch_row=True, prefill_chunk=NF4_PREFILL_CHUNK,
    )


def enable_nf4_kernels(decoder: MistralDecoder) -> bool:
    """Route decode-sized projections to the fused Triton kernels (CUDA + Triton, float32 adapter)."""
    from llm.serving import nf4_kernels

    if not nf4_kernels.available(decoder.device):
        return False
    if any(p.lora.a.dtype != torch.float32 for layer in decoder.layers for p in layer.projections.values()):
        logger.warning("nf4 kernels need a float32 adapter (PEFT's default); using the PyTorch path")
        return False
    enabled = False
    for layer in decoder.layers:
        for projection in layer.projections.values():
            n, k = projection.weight.shape
            projection.use_kernels = nf4_kernels.supports(n, k, projection.lora.boundaries, projection.lora.rank)
            enabled = enabled or projection.use_kernels
    return enabled


def disable_nf4_kernels(decoder: MistralDecoder) -> None:
    for layer in decoder.layers:
        for projection in layer.projections.values():
            projection.use_kernels = False


def build_nf4_engine(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_batch: int = 16,
    max_seq_len: int = 2048,
    max_queue: int = 32,
    cuda_graphs: bool = True,
    compile_kernels: bool = True,
    free_source: bool = True,
    triton_kernels: bool = True,
    kv_cache_tokens: int | None = None,
    kv_block_size: int = 32,
    tuning_cache: Path | None = None,
) -> BatchingEngine:
    """`nf4` mode from the seed's model (consumed when `free_source`): its NF4 weights and unmerged
    LoRA under `fast`'s decoder (paged KV cache, graph-captured decode and prefill, continuous
    batching), decode projections through the fused NF4 kernels (CUDA). `tuning_cache`: a JSON file
    where the kernel tuner keeps its choice for the next start (`llm.serving.tuning_cache`)."""
    import time

    from llm.serving import nf4_kernels
    from llm.serving.batching import BatchingEngine, DecoderStepModel
    from llm.serving.fast import FAST_KV_CACHE_TOKENS, _warm_up, serving_graphs

    started = time.monotonic()
    # The same pool as `fast`: the bench's 16 staggered requests run without preemption.
    tokens = kv_cache_tokens or min(FAST_KV_CACHE_TOKENS, max_batch * max_seq_len)
    decoder = build_nf4_decoder(
        model, max_batch, max_seq_len, free_source=free_source, kv_cache_tokens=tokens, kv_block_size=kv_block_size
    )
    graphs = serving_graphs(decoder, max_seq_len, cuda_graphs)
    info: dict = {"nf4_kernels": False}
    if triton_kernels and enable_nf4_kernels(decoder):
        try:
            groups = {name: [layer.projections[name] for layer in decoder.layers]
                      for name in ("qkv", "o", "gate_up", "down")}
            info["nf4_plan"] = nf4_kernels.tune(groups, graphs.batch_buckets, cache=tuning_cache)
            info["nf4_kernels"] = True
            info["nf4_exact_prompt_rows"] = EXACT_PROMPT_ROWS  # PEFT's own LoRA products up to here
            prompt_rows = [rows * min(length, decoder.prefill_chunk) for rows, length in graphs.prefill_shapes()]
            bases = nf4_kernels.plan_prompt_bases(groups, prompt_rows)
            if bases:
                info["nf4_prompt_bases"] = bases
        except Exception as error:  # e.g. a Triton that cannot compile for this GPU
            logger.warning("nf4 kernels unavailable, dequantizing for cuBLAS instead: %r", error)
            info["nf4_kernel_error"] = repr(error)
            disable_nf4_kernels(decoder)
    info.update(_warm_up(graphs, compile_kernels, triton=triton_kernels))
    info["weights_gb"] = round(
        (sum(layer.nbytes for layer in decoder.layers) + decoder.embed.numel() * decoder.embed.element_size()
         + decoder.lm_head.weight.numel() * decoder.lm_head.weight.element_size() + decoder.lm_head.lora.nbytes) / 1e9,
        3,
    )
    info["build_s"] = round(time.monotonic() - started, 2)
    return BatchingEngine(DecoderStepModel(graphs), tokenizer, name="nf4", max_queue=max_queue, info=info)
