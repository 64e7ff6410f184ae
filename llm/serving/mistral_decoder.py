"""A small Mistral decoder with a static, slot-based KV cache, for continuous batching.

It computes exactly what `transformers`' `MistralForCausalLM` computes (same RMSNorm in float32,
same rotary tables, same GQA attention, residual stream in the weights' dtype), but is laid out for
serving: the KV cache is allocated once as `[max_batch, kv_heads, max_seq_len, head_dim]` per
layer, every request owns one *slot* (a row of that cache), prompts are prefilled into their slots
(padded to one length, several at once), and one decode step advances every slot `0..n-1` by one
token, each at its own position.

The decode step and the padded prefill are pure functions of a few static buffers, so on CUDA
`DecodeGraphs` captures them once per bucket - (batch, KV length) for decode, (prompts, prompt
length) for prefill - at start-up and afterwards only replays graphs: no recompilation and no
per-kernel launch overhead per request. On the CPU the same functions run eagerly on the same
buckets, which is what CI tests.

With `kv_cache_tokens` the cache is *paged* instead (`PagedKV`): one pool of fixed-size blocks
per layer, `[num_blocks, kv_heads, block_size, head_dim]`, sized by a token budget shared by all
requests; a slot owns a list of blocks that grows with the request, and the block tables and
positions are static device buffers, so the same CUDA graphs serve any mix of lengths. Decode
attention then reads only each row's real length (Triton flash-decoding kernel on CUDA; a
gather-by-table + SDPA reference path elsewhere). Block 0 is a scratch block: idle and padded rows
of a step write their (unused) K/V there.

Projections are pluggable (`DenseLayer`: bf16 weights with the LoRA merged, q/k/v and gate/up
fused; `ModuleLayer`: any callables, e.g. PEFT's 4-bit LoRA layers for the low-memory mode).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.serving import programmatic_launch, triton_kernels

logger = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]

# Prompt rows per norm/projection/MLP call in prefill (bounds the activations; see `_rowwise`).
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None

    @classmethod
    def from_hf(cls, config) -> DecoderConfig:  # noqa: ANN001 - a transformers MistralConfig
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_theta = getattr(config, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope_theta),
            sliding_window=getattr(config, "sliding_window", None),
        )


class DenseLayer:
    """One decoder layer's projections as plain weight matrices (q/k/v and gate/up fused).

    `plan` (shared by all layers, set by `MistralDecoder.enable_triton`) routes decode-sized
    matmuls to the Triton skinny GEMM where it measured faster than cuBLAS; prefill-sized inputs
    and everything on the CPU stay F.linear."""

    plan: triton_kernels.GemmPlan | None = None

    def __init__(
        self,
        input_norm: torch.Tensor,
        post_norm: torch.Tensor,
        qkv: torch.Tensor,
        o: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> None:
        self.input_norm, self.post_norm = input_norm, post_norm
        self.w_qkv, self.w_o, self.w_gate_up, self.w_down = qkv, o, gate_up, down

    def _linear(self, x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        return _planned_linear(self.plan, x, w, name)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.w_qkv, "qkv")

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.w_o, "o")

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.w_gate_up, "gate_up")

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.w_down, "down")


def _planned_linear(
    plan: triton_kernels.GemmPlan | None, x: torch.Tensor, w: torch.Tensor, name: str
) -> torch.Tensor:
    if plan is not None and x.dim() == 2:
        config = plan.get(name, x.shape[0])
        if config is not None:
            return triton_kernels.skinny_matmul(x, w, config)
    return F.linear(x, w)


class DenseHead:
    """The (merged) lm_head as a weight matrix, routed through the same plan as the layers."""

    plan: triton_kernels.GemmPlan | None = None

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return _planned_linear(self.plan, x, self.weight, "lm_head")
        return F.linear(x, self.weight)


class ModuleLayer:
    """One decoder layer's projections as callables (e.g. PEFT LoRA layers over bnb 4-bit)."""

    def __init__(
        self,
        input_norm: torch.Tensor,
        post_norm: torch.Tensor,
        q: Projection,
        k: Projection,
        v: Projection,
        o: Projection,
        gate: Projection,
        up: Projection,
        down: Projection,
    ) -> None:
        self.input_norm, self.post_norm = input_norm, post_norm
        self._q, self._k, self._v, self._o = q, k, v, o
        self._gate, self._up, self._down = gate, up, down

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._q(x), self._k(x), self._v(x)], dim=-1)

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self._o(x)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._gate(x), self._up(x)], dim=-1)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self._down(x)


Layer = DenseLayer | ModuleLayer


# --- element-wise pieces (optionally torch.compile'd; matmuls stay in cuBLAS / bnb) -------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Exactly MistralRMSNorm: statistics in float32, cast back, then scale in the input dtype.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta
    return h, _rms_norm(h, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_decode(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [n, (H+2K)*D] -> q [n, K, H/K, D], k [n, K, D], v [n, K, D] with rotary applied."""
    n = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(n, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(n, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].reshape(n, num_kv_heads, head_dim)
    cos = cos_table[positions].unsqueeze(1)
    sin = sin_table[positions].unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim), k, v


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """Causal attention over whole prompts: q [P, H, T, D], k/v [P, K, T, D] -> [P, H, T, D].

    Called as transformers' SDPA integration calls it for the seed's model (no mask, `is_causal`,
    `enable_gqa`, PyTorch's own backend choice), so a prompt's attention is the seed's bit for bit.
    Restricting the backends is not free: on an H200 with torch 2.11 PyTorch picks cuDNN, and
    flash attention instead changed 16 % of the outputs by a rounding step and doubled the prompt
    KL against the seed (bench/nf4_layer_diff.py). cuDNN builds a plan per new shape: the captured
    prefill buckets build theirs at start-up; a prompt longer than every bucket pays it once per
    new length."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up



class PagedKV:
    """Host-side block allocator of a paged KV cache (one per decoder; every layer uses the same
    block ids). Block 0 is never handed out: rows without a request point at it."""

    def __init__(self, num_blocks: int, block_size: int, max_batch: int, max_seq_len: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks = -(-max_seq_len // block_size)
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.blocks: list[list[int]] = [[] for _ in range(max_batch)]
        # The tables as the kernels read them (int32, one row per slot); copied to the device per step.
        self.table = torch.zeros((max_batch, self.max_blocks), dtype=torch.int32)

    @property
    def free_tokens(self) -> int:
        return len(self.free) * self.block_size

    def ensure(self, slot: int, tokens: int) -> bool:
        """Give `slot` blocks for `tokens` positions; all or nothing (False: not enough free)."""
        owned = self.blocks[slot]
        need = -(-tokens // self.block_size) - len(owned)
        if need <= 0:
            return True
        if len(owned) + need > self.max_blocks or need > len(self.free):
            return False
        for _ in range(need):
            block = self.free.pop()
            self.table[slot, len(owned)] = block
            owned.append(block)
        return True

    def release(self, slot: int) -> None:
        owned = self.blocks[slot]
        if owned:
            self.free.extend(reversed(owned))
            owned.clear()
            self.table[slot].zero_()


class MistralDecoder:
    """Weights + KV cache + prefill/decode as plain (eager) functions. See the module docstring."""

    def __init__(
        self,
        config: DecoderConfig,
        embed: torch.Tensor,
        layers: Sequence[Layer],
        final_norm: torch.Tensor,
        lm_head: Projection,
        max_batch: int,
        max_seq_len: int,
        compile_kernels: bool = False,
        kv_cache_tokens: int | None = None,
        kv_block_size: int = 32,
        scratch_row: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if config.sliding_window is not None and max_seq_len > config.sliding_window:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the sliding window {config.sliding_window}; "
                "this decoder implements full attention only"
            )
        self.config = config
        self.embed = embed
        self.layers = list(layers)
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = embed.device
        self.dtype = embed.dtype
        self.paged = kv_cache_tokens is not None
        self.has_scratch = self.paged or scratch_row
        self.kv: PagedKV | None = None
        if self.paged:
            if kv_block_size < 16 or kv_block_size & (kv_block_size - 1):
                raise ValueError("kv_block_size must be a power of two >= 16 (the kernel's tl.dot tile)")
            # One request must always fit, or a lone request could never grow (no preemption target).
            tokens = max(int(kv_cache_tokens), max_seq_len)
            num_blocks = -(-tokens // kv_block_size) + 1  # + the scratch block 0
            self.kv = PagedKV(num_blocks, kv_block_size, max_batch, max_seq_len)
            shape = (num_blocks, config.num_kv_heads, kv_block_size, config.head_dim)
            self.block_table = torch.zeros(
                (max_batch, self.kv.max_blocks), dtype=torch.int32, device=self.device
            )
        else:
            # `scratch_row`: one more row, where the padding rows of a bucketed prefill write.
            shape = (max_batch + int(scratch_row), config.num_kv_heads, max_seq_len, config.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # Rotary tables as transformers builds them: float32 angles, cos/sin cast to the dtype.
        inv_freq = 1.0 / (
            config.rope_theta
            ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).to(torch.float32) / config.head_dim)
        )
        angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        self.cos = emb.cos().to(self.dtype).to(self.device)
        self.sin = emb.sin().to(self.dtype).to(self.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)

        self._norm: Callable = _rms_norm
        self._add_norm: Callable = _add_rms_norm
        self._rope: Callable = _rope_decode
        self._silu_mul: Callable = _silu_mul
        # Triton decode kernels (CUDA only, `enable_triton`): fused rotary + KV-cache write.
        self.fused_rope_kv = False
        self.gemm_plan: triton_kernels.GemmPlan | None = None
        if compile_kernels:
            self.enable_compiled_kernels()

    def enable_compiled_kernels(self) -> None:
        """Fuse the element-wise pieces of the decode step with Inductor (one compile, any shape).
        Inductor computes a fused chain in float32 and drops the bf16 roundings between its ops
        (a quarter of the outputs then differ from eager PyTorch's, which are HF's); it is told to
        keep them, so that the fused pieces compute exactly the reference's values."""
        options: dict = {"emulate_precision_casts": True}
        if programmatic_launch.enabled(self.device) and hasattr(torch._inductor.config.triton, "enable_pdl"):
            # scheduled while the kernel before finishes, as the decode step's own kernels are
            options["triton.enable_pdl"] = True
        self._norm = torch.compile(_rms_norm, dynamic=True, options=options)
        self._add_norm = torch.compile(_add_rms_norm, dynamic=True, options=options)
        self._rope = torch.compile(_rope_decode, dynamic=True, options=options)
        self._silu_mul = torch.compile(_silu_mul, dynamic=True, options=options)

    def disable_compiled_kernels(self) -> None:
        self._norm, self._add_norm, self._rope, self._silu_mul = (
            _rms_norm, _add_rms_norm, _rope_decode, _silu_mul,
        )

    def enable_triton(self, batch_sizes: Sequence[int], tune_gemm: bool = True) -> dict:
        """Switch the decode step to the Triton kernels (before graph capture): the fused
        rotary + KV write, and per (projection, batch size) the faster of Triton and cuBLAS,
        timed here. Returns what was chosen. No-op without CUDA + Triton."""
        if not triton_kernels.available(self.device):
            return {"triton": False}
        self.fused_rope_kv = True
        info: dict = {"triton": True, "fused_rope_kv": True}
        dense = [layer for layer in self.layers if isinstance(layer, DenseLayer)]
        if tune_gemm and dense and len(dense) == len(self.layers):
            plan = triton_kernels.GemmPlan()
            weights = {
                "qkv": [layer.w_qkv for layer in dense],
                "o": [layer.w_o for layer in dense],
                "gate_up": [layer.w_gate_up for layer in dense],
                "down": [layer.w_down for layer in dense],
            }
            if isinstance(self.lm_head, DenseHead):
                weights["lm_head"] = [self.lm_head.weight]
            plan.tune(weights, batch_sizes)
            self.set_gemm_plan(plan)
            info["gemm"] = plan.summary()
        return info

    def set_gemm_plan(self, plan: triton_kernels.GemmPlan | None) -> None:
        self.gemm_plan = plan
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                layer.plan = plan
        if isinstance(self.lm_head, DenseHead):
            self.lm_head.plan = plan

    def disable_triton(self) -> None:
        self.fused_rope_kv = False
        self.set_gemm_plan(None)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    @property
    def reads_real_lengths(self) -> bool:
        """Decode attention costs each row's own length (paged + Triton), not the KV bucket's."""
        return self.paged and self.fused_rope_kv

    def kv_reserve(self, slot: int, tokens: int) -> bool:
        """Blocks for `tokens` positions of `slot` (always True for the static cache)."""
        if self.kv is None:
            return tokens <= self.max_seq_len
        return self.kv.ensure(slot, tokens)

    def kv_release(self, slot: int) -> None:
        if self.kv is not None:
            self.kv.release(slot)

    def _rowwise(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, features: int) -> torch.Tensor:
        """fn over x [1, T, H] in chunks of `prefill_chunk` rows (fn is row-wise: same result).
        Bounds the prefill transients - float32 RMSNorm temporaries and T x 28,672 gate/up
        activations - that otherwise make a long prompt the serving memory peak."""
        chunk = self.prefill_chunk
        if x.shape[1] <= chunk:
            return fn(x)
        out = x.new_empty((*x.shape[:-1], features))
        for start in range(0, x.shape[1], chunk):
            out[:, start : start + chunk] = fn(x[:, start : start + chunk])
        return out

    def _prefill_qkv(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        return self._rowwise(lambda c: layer.qkv(_rms_norm(c, layer.input_norm, cfg.rms_norm_eps)), h, width)

    def _mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        """h + MLP(norm(h)) for prefill, row-chunked (see `_rowwise`)."""
        eps = self.config.rms_norm_eps
        return h + self._rowwise(
            lambda c: layer.down(_silu_mul(layer.gate_up(_rms_norm(c, layer.post_norm, eps)))), h, h.shape[-1]
        )

    # --- prefill: prompts padded to one length, written into their slots ------------------------

    @property
    def scratch_slot(self) -> int:
        """Where padding rows of `prefill_padded` write: the static cache's extra row (the paged
        cache's scratch block 0 is reached through all-zero table rows instead)."""
        return self.max_batch

    def prefill_destination(self, slots: Sequence[int], lengths: Sequence[int], rows: int) -> torch.Tensor:
        """Host tensor telling the prefill where each of `rows` padded rows writes: the slot ids
        (padding rows: the scratch slot), or for the paged cache the slots' block-table rows
        after reserving blocks for `lengths` (padding rows all zero: the scratch block)."""
        for slot, length in zip(slots, lengths, strict=True):
            if not 0 <= slot < self.max_batch:
                raise ValueError(f"slot {slot} out of range")
            if not 0 < length <= self.max_seq_len:
                raise ValueError(f"prompt of {length} tokens does not fit max_seq_len {self.max_seq_len}")
        if self.kv is None:
            dest = torch.full((rows,), self.scratch_slot, dtype=torch.long)
            dest[: len(slots)] = torch.tensor(list(slots), dtype=torch.long)
            return dest
        for slot, length in zip(slots, lengths, strict=True):
            if not self.kv.ensure(slot, length):
                raise RuntimeError(f"KV cache full: no blocks for a {length}-token prompt")
        dest = torch.zeros((rows, self.kv.max_blocks), dtype=torch.int32)
        dest[: len(slots)] = self.kv.table[list(slots)]
        return dest

    def _prefill_hidden(self, ids: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """The layers over prompts padded to one length, ids [P, T] -> hidden states [P, T, H],
        K/V of all T positions written as `dest` says. A row's padding lands past its prompt,
        where decode overwrites a position before it ever reads it, or in scratch; causal
        attention keeps every real token blind to the padding after it."""
        cfg = self.config
        rows, length = ids.shape
        group = cfg.num_heads // cfg.num_kv_heads
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        cos, sin = self.cos[:length][None, None], self.sin[:length][None, None]
        if self.kv is not None:
            positions = torch.arange(length, device=ids.device)
            blocks = dest.long()[:, torch.div(positions, self.kv.block_size, rounding_mode="floor")]  # [P, T]
            offsets = (positions % self.kv.block_size)[None, :].expand(rows, length)
        h = F.embedding(ids.reshape(1, rows * length), self.embed)  # [1, P*T, H]
        for index, layer in enumerate(self.layers):
            qkv = self._prefill_qkv(layer, h).view(rows, length, -1)
            q = qkv[..., :q_size].view(rows, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
            k = qkv[..., q_size : q_size + kv_size].view(rows, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size :].view(rows, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if self.kv is None:
                self.k_cache[index][dest, :, :length] = k
                self.v_cache[index][dest, :, :length] = v
            else:
                self.k_cache[index][blocks, :, offsets] = k.transpose(1, 2)
                self.v_cache[index][blocks, :, offsets] = v.transpose(1, 2)
            attn = _prefill_attention(q, k, v, group, self.scale)
            attn = attn.transpose(1, 2).reshape(1, rows * length, q_size)
            h = self._mlp(layer, h + layer.o(attn))
        return h.view(rows, length, -1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(h, self.final_norm, self.config.rms_norm_eps)).float()

    @torch.inference_mode()
    def prefill_padded(self, ids: torch.Tensor, last: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """Prompts padded to one bucket: ids [P, T], last [P] (index of each row's last real
        token), dest from `prefill_destination`. Returns float32 logits [P, V] at `last`. A pure
        function of its inputs and the cache: `DecodeGraphs` captures it once per (P, T) bucket."""
        h = self._prefill_hidden(ids, dest)
        return self._logits(h[torch.arange(ids.shape[0], device=ids.device), last])

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Fill `slot`'s cache with `token_ids` [T]; return float32 logits of the last position
        [V] (or of every position [T, V] with `all_logits`)."""
        logits = self.prefill_many([slot], [token_ids], all_logits=all_logits)
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def prefill_many(
        self, slots: Sequence[int], prompts: Sequence[torch.Tensor], all_logits: bool = False, pad_to: int = 0
    ) -> torch.Tensor:
        """Several prompts into their slots in one forward, eagerly, padded to the longest (or to
        `pad_to` tokens, as a prefill bucket pads them): the projections run once over all prompts'
        tokens (one weight read instead of one per prompt). Returns float32 last-position logits
        [n, V], or with `all_logits` those of every prompt token, prompts concatenated [sum(T), V]
        (the fidelity checks compare every position)."""
        lengths = [int(p.shape[0]) for p in prompts]
        if len(slots) != len(prompts) or len(set(slots)) != len(slots):
            raise ValueError("one distinct slot per prompt")
        dest = self.prefill_destination(slots, lengths, len(slots)).to(self.device)
        ids, last = pad_prompts(prompts, len(prompts), max(*lengths, pad_to))
        h = self._prefill_hidden(ids.to(self.device), dest)
        if all_logits:
            return self._logits(torch.cat([h[row, :n] for row, n in enumerate(lengths)]))
        return self._logits(h[torch.arange(len(prompts), device=self.device), last.to(self.device)])

    # --- decode: one token for each of slots 0..n-1, each at its own position ------------------

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """tokens, positions [n] (slot i = row i); attends to cache positions < kv_len that are
        <= the row's own position. Returns logits [n, V] in the weights' dtype. Pure function of
        its inputs and the cache: safe to capture in a CUDA graph."""
        cfg = self.config
        n = tokens.shape[0]
        eps = cfg.rms_norm_eps
        if self.paged:
            return self._decode_step_paged(tokens, positions, kv_len)
        rows = torch.arange(n, device=tokens.device)
        visible = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        # Additive mask in the activations' dtype, built once per step: a boolean mask made SDPA
        # (cuDNN) convert it to a float bias in every layer (3 extra kernels x 32 layers, profile).
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device).masked_fill_(
            ~visible, float("-inf")
        )
        h = F.embedding(tokens, self.embed)  # [n, H]
        qkv = self.layers[0].qkv(self._norm(h, self.layers[0].input_norm, eps))
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if self.fused_rope_kv:  # one launch instead of rope + two index_put kernels
                q = triton_kernels.rope_kv_write(
                    qkv, self.cos, self.sin, positions, k_cache, v_cache,
                    cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                ).view(n, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
            else:
                q, k, v = self._rope(
                    qkv, self.cos, self.sin, positions, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
                )
                k_cache[rows, :, positions] = k
                v_cache[rows, :, positions] = v
            attn = F.scaled_dot_product_attention(
                q, k_cache[:n, :, :kv_len], v_cache[:n, :, :kv_len], attn_mask=mask, scale=self.scale
            )  # [n, K, G, D]: the G query heads of a KV group attend as G "query positions"
            h, gate_up = self._add_norm_then(layer, "gate_up", h, layer.o(attn.reshape(n, -1)), eps)
            mlp = self._down_of(layer, gate_up)
            if index + 1 < len(self.layers):
                h, qkv = self._add_norm_then(self.layers[index + 1], "qkv", h, mlp, eps)
        _, x = self._add_norm(h, mlp, self.final_norm, eps)
        return self.lm_head(x)

    def _decode_step_paged(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`decode_step` over the paged pool. Rows with position 0 are idle (a real decode position
        is >= 1, after a prompt): their table row is replaced by the scratch block in the graph."""
        cfg = self.config
        n = tokens.shape[0]
        eps = cfg.rms_norm_eps
        table = torch.where(positions[:, None] > 0, self.block_table[:n], 0)
        triton_attn = self.fused_rope_kv
        if not triton_attn:  # reference path: gather each row's first kv_len positions by table
            block_size = self.kv.block_size
            pages = -(-kv_len // block_size)
            rows = torch.arange(n, device=tokens.device)
            page_of = table.long()[rows, torch.div(positions, block_size, rounding_mode="floor")]
            offset = positions % block_size
            gather = table[:, :pages].long()
            visible = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device).masked_fill_(
                ~visible, float("-inf")
            )
        h = F.embedding(tokens, self.embed)
        qkv = self.layers[0].qkv(self._norm(h, self.layers[0].input_norm, eps))
        for index, layer in enumerate(self.layers):
            k_pool, v_pool = self.k_cache[index], self.v_cache[index]
            if triton_attn:
                q = triton_kernels.rope_kv_write_paged(
                    qkv, self.cos, self.sin, positions, table, k_pool, v_pool,
                    cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                )
                attn = triton_kernels.paged_decode_attention(
                    q, k_pool, v_pool, table, positions, self.scale, cfg.num_heads
                )
            else:
                q, k, v = self._rope(
                    qkv, self.cos, self.sin, positions, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
                )
                k_pool[page_of, :, offset] = k
                v_pool[page_of, :, offset] = v
                # [n, pages, K, bs, D] -> [n, K, pages * bs, D], cut to kv_len
                keys = k_pool[gather].transpose(1, 2).reshape(n, cfg.num_kv_heads, -1, cfg.head_dim)[:, :, :kv_len]
                values = v_pool[gather].transpose(1, 2).reshape(n, cfg.num_kv_heads, -1, cfg.head_dim)[:, :, :kv_len]
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            h, gate_up = self._add_norm_then(layer, "gate_up", h, layer.o(attn.reshape(n, -1)), eps)
            mlp = self._down_of(layer, gate_up)
            if index + 1 < len(self.layers):
                h, qkv = self._add_norm_then(self.layers[index + 1], "qkv", h, mlp, eps)
        _, x = self._add_norm(h, mlp, self.final_norm, eps)
        return self.lm_head(x)

    def _add_norm_then(self, layer: Layer, name: str, h: torch.Tensor, delta: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, layer.<name>(its RMSNorm)), name "qkv" (input_norm) or "gate_up" (post_norm):
        in the projection's own launch where the layer offers that (`nf4`'s one-row kernel), else as
        separate steps."""
        norm = layer.input_norm if name == "qkv" else layer.post_norm
        fused = getattr(layer, "after_add_norm", None)
        result = fused(name, h, delta, norm, eps) if fused is not None else None
        if result is not None:
            return result
        h, x = self._add_norm(h, delta, norm, eps)
        return h, getattr(layer, name)(x)

    def _down_of(self, layer: Layer, gate_up: torch.Tensor) -> torch.Tensor:
        """layer.down(silu(gate) * up): in one launch where the layer offers that, else as two steps."""
        fused = getattr(layer, "down_after_silu_mul", None)
        result = fused(gate_up) if fused is not None else None
        return result if result is not None else layer.down(self._silu_mul(gate_up))

    def close(self) -> None:
        self.k_cache.clear()
        self.v_cache.clear()
        self.layers.clear()


def pad_prompts(prompts: Sequence[torch.Tensor], rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tensors for a padded prefill: ids [rows, length] (each prompt first, zeros after;
    rows past the prompts all zeros) and the index of each row's last prompt token [rows]."""
    ids = torch.zeros((rows, length), dtype=torch.long)
    last = torch.zeros(rows, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : prompt.shape[0]] = prompt.to(torch.long)
        last[row] = prompt.shape[0] - 1
    return ids, last


def _prefill_length_buckets(max_seq_len: int) -> list[int]:
    """Padded prompt lengths of the captured prefills: at most 50 % padding (33 % from 256 up)."""
    steps = [32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    return [size for size in steps if size < max_seq_len] + [max_seq_len]


def _buckets(limit: int, start: int) -> list[int]:
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


class DecodeGraphs:
    """Runs `MistralDecoder.decode_step` through CUDA graphs captured per (batch, KV-length) bucket.

    All graphs are captured in `capture()` (start-up); `decode()` only copies inputs into static
    buffers and replays. Without CUDA (or with `use_graphs=False`) it runs the step eagerly on the
    same buckets, so the bucketing logic is exercised on the CPU too.
    """

    def __init__(
        self,
        decoder: MistralDecoder,
        use_graphs: bool = True,
        batch_buckets: Sequence[int] | None = None,
        kv_buckets: Sequence[int] | None = None,
        bucketed_prefill: bool = False,
        prefill_token_budget: int = 2048,
    ) -> None:
        self.decoder = decoder
        self.max_batch = decoder.max_batch
        self.max_seq_len = decoder.max_seq_len
        self.use_graphs = use_graphs and decoder.device.type == "cuda"
        self.batch_buckets = sorted(batch_buckets or _buckets(decoder.max_batch, 1))
        self.kv_buckets = sorted(kv_buckets or _buckets(decoder.max_seq_len, min(256, decoder.max_seq_len)))
        if self.batch_buckets[-1] != self.max_batch or self.kv_buckets[-1] != self.max_seq_len:
            raise ValueError("the largest buckets must equal max_batch and max_seq_len")
        device = decoder.device
        self._tokens = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self._positions = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captured = False
        # Bucketed prefill: prompts padded to (rows, length) buckets of at most
        # `prefill_token_budget` tokens, one CUDA graph per bucket. An eager prefill of a short
        # prompt is bound by the host launching ~1,500 kernels (34 ms for 32 tokens, run 7),
        # a stall every running answer waits through.
        if bucketed_prefill and not decoder.has_scratch:
            raise ValueError("bucketed prefill needs a paged cache or a static one with scratch_row=True")
        self.bucketed_prefill = bucketed_prefill
        self.prefill_token_budget = prefill_token_budget
        self.prefill_lengths = _prefill_length_buckets(decoder.max_seq_len)
        self.prefill_rows = _buckets(decoder.max_batch, 1)
        self._prefill_ids = torch.zeros(prefill_token_budget, dtype=torch.long, device=device)
        self._prefill_last = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self._prefill_dest = (
            decoder.prefill_destination([], [], self.max_batch).to(device) if bucketed_prefill else None
        )
        self._prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _bucket(self, buckets: Sequence[int], value: int) -> int:
        for size in buckets:
            if size >= value:
                return size
        raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")

    def _capture_kv_buckets(self) -> list[int]:
        # The paged Triton attention reads each row's own length: one graph per batch bucket does.
        return [self.max_seq_len] if self.decoder.reads_real_lengths else list(self.kv_buckets)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compile) and capture every bucket. Largest first, sharing one memory pool."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in reversed(self.batch_buckets):
                for kv_len in reversed(self._capture_kv_buckets()):
                    self._positions.zero_()
                    self._tokens.zero_()
                    for _ in range(2):  # compile + warm cuBLAS/Inductor for this shape
                        self.decoder.decode_step(self._tokens[:n], self._positions[:n], kv_len)
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        out = self.decoder.decode_step(self._tokens[:n], self._positions[:n], kv_len)
                    graph.replay()  # upload now: a graph's first launch costs extra (not per request)
                    self._graphs[(n, kv_len)] = (graph, out)
            if self.bucketed_prefill:
                try:
                    self._capture_prefill(pool, stream)
                except Exception as error:  # keep the decode graphs; prefill runs eagerly
                    logger.warning("prefill graph capture failed, prefilling eagerly: %r", error)
                    self._prefill_graphs.clear()
                    self.bucketed_prefill = False
                    stream.synchronize()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.captured = True

    @property
    def prefill_graph_count(self) -> int:
        return len(self._prefill_graphs)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, length) of every prefill bucket, largest first."""
        shapes = [
            (rows, length) for length in self.prefill_lengths for rows in self.prefill_rows
            if rows * length <= self.prefill_token_budget
        ]
        return sorted(shapes, key=lambda shape: (-shape[0] * shape[1], -shape[1]))

    def _prefill_buffers(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._prefill_ids[: rows * length].view(rows, length), self._prefill_last[:rows], self._prefill_dest[:rows]

    def _capture_prefill(self, pool, stream: torch.cuda.Stream) -> None:  # noqa: ANN001 - a graph pool handle
        self._prefill_dest.copy_(self.decoder.prefill_destination([], [], self.max_batch))  # all scratch
        for rows, length in self.prefill_shapes():
            ids, last, dest = self._prefill_buffers(rows, length)
            ids.zero_()
            last.zero_()
            self.decoder.prefill_padded(ids, last, dest)  # warm cuBLAS / attention for this shape
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.decoder.prefill_padded(ids, last, dest)
            graph.replay()
            self._prefill_graphs[(rows, length)] = (graph, out)

    def _prefill_bucket(self, count: int, longest: int) -> tuple[int, int] | None:
        """The smallest (rows, length) bucket for `count` prompts of up to `longest` tokens."""
        if count > self.prefill_rows[-1] or longest > self.prefill_lengths[-1]:
            return None
        rows = self._bucket(self.prefill_rows, count)
        length = self._bucket(self.prefill_lengths, longest)
        return (rows, length) if rows * length <= self.prefill_token_budget else None

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[int], prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """`MistralDecoder.prefill_many` (float32 last-position logits [n, V]), through the
        prefill buckets when `bucketed_prefill`: prompts are grouped in arrival order into as few
        buckets as fit the token budget, each group one graph replay (eager off CUDA). A prompt
        longer than every bucket is prefilled eagerly on its own."""
        if not self.bucketed_prefill:
            return self.decoder.prefill_many(slots, prompts)
        lengths = [int(p.shape[0]) for p in prompts]
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(prompts):
            end = start + 1
            while end < len(prompts) and self._prefill_bucket(end + 1 - start, max(lengths[start : end + 1])):
                end += 1
            bucket = self._prefill_bucket(end - start, max(lengths[start:end]))
            if bucket is None:
                outputs.append(self.decoder.prefill_many(slots[start:end], prompts[start:end]))
            else:
                outputs.append(self._prefill_padded(slots[start:end], prompts[start:end], *bucket))
            start = end
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _prefill_padded(
        self, slots: Sequence[int], prompts: Sequence[torch.Tensor], rows: int, length: int
    ) -> torch.Tensor:
        decoder = self.decoder
        dest = decoder.prefill_destination(slots, [int(p.shape[0]) for p in prompts], rows)
        host_ids, host_last = pad_prompts(prompts, rows, length)
        ids, last, dest_buffer = self._prefill_buffers(rows, length)
        for buffer, host in ((ids, host_ids), (last, host_last), (dest_buffer, dest)):
            buffer.copy_(host.pin_memory() if decoder.device.type == "cuda" else host, non_blocking=True)
        captured = self._prefill_graphs.get((rows, length))
        if captured is None:
            return decoder.prefill_padded(ids, last, dest_buffer)[: len(prompts)]
        graph, out = captured
        graph.replay()
        return out[: len(prompts)].clone()  # the next replay overwrites `out`

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """One step for slots 0..len(tokens)-1. `tokens` may be a device tensor (the previous
        step's samples, never copied through the host). Returns float32 logits [len(tokens), V]."""
        n = len(tokens)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"batch of {n} outside 1..{self.max_batch}")
        top = max(positions)
        if top >= self.max_seq_len:
            raise ValueError(f"position {top} outside the KV cache of {self.max_seq_len}")
        n_bucket = self._bucket(self.batch_buckets, n)
        kv_bucket = self._bucket(self._capture_kv_buckets(), top + 1)
        decoder = self.decoder
        if decoder.kv is not None:
            for row, position in enumerate(positions):
                if position > 0 and not decoder.kv.ensure(row, position + 1):
                    raise RuntimeError(f"KV cache full: slot {row} cannot grow to {position + 1} tokens")
            # A fresh pinned copy per step: the previous step's copy may still be in flight.
            table = decoder.kv.table[:n_bucket]
            if decoder.device.type == "cuda":
                table = table.pin_memory()
            decoder.block_table[:n_bucket].copy_(table, non_blocking=True)
        padded_positions = list(positions) + [0] * (n_bucket - n)
        if isinstance(tokens, torch.Tensor):
            self._tokens[:n].copy_(tokens, non_blocking=True)
            if n_bucket > n:
                self._tokens[n:n_bucket].zero_()
            pinned = self._positions.device.type == "cuda"
            self._positions[:n_bucket].copy_(
                torch.tensor(padded_positions, dtype=torch.long, pin_memory=pinned), non_blocking=True
            )
        else:
            host = torch.tensor([list(tokens) + [0] * (n_bucket - n), padded_positions], dtype=torch.long)
            self._tokens[:n_bucket].copy_(host[0], non_blocking=True)
            self._positions[:n_bucket].copy_(host[1], non_blocking=True)
        if self.captured:
            graph, out = self._graphs[(n_bucket, kv_bucket)]
            graph.replay()
        else:
            out = self.decoder.decode_step(self._tokens[:n_bucket], self._positions[:n_bucket], kv_bucket)
        return out[:n].float()

    def close(self) -> None:
        self._graphs.clear()
        self._prefill_graphs.clear()
        self.decoder.close()
