"""Decode-only Triton kernels for the `fast` mode (CUDA only; everything here is optional).

Why: at batch 1..16 a decode step is a chain of weight-streaming matrix products. cuBLAS picks
split-K kernels for the 4096-wide projections (q/k/v, o) that reach only ~1.2-1.8 TB/s on an H100
(bench/NOTES.md), and the rotary embedding + the two KV-cache writes are three launches per layer.

- `skinny_matmul(x, w, config)`: y = x @ w.T for x [M<=16, K] and w [N, K] in bf16 with float32
  accumulation (the same function as F.linear, a different summation order). M == 1 uses a
  multiply-reduce tile loop (no tensor cores needed for a GEMV); M > 1 pads M to 16 and uses tl.dot.
- `GemmPlan`: at start-up, per (projection, batch bucket), times every Triton config against
  cuBLAS inside CUDA graphs over all 32 layers' weights (so the L2 cache does not flatter anyone)
  and keeps the faster. Where cuBLAS wins, F.linear is used as before.
- `rope_kv_write(...)`: rotary on q and k, then k and v written straight into the KV cache at each
  row's position, in one launch instead of three.

On the CPU (CI) Triton is absent or has no GPU backend: `available()` is False and callers keep
their eager PyTorch paths.
"""

# Triton kernel arguments are pointers / ints typed by Triton itself, not Python annotations.
# ruff: noqa: ANN001

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.serving import programmatic_launch

logger = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch only.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton path"
    _HAVE_TRITON = False


def available(device: torch.device) -> bool:
    """Triton kernels can run on `device` (a CUDA device with a working Triton)."""
    return _HAVE_TRITON and torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def fits(self, n: int, k: int) -> bool:
        return k % self.block_k == 0 and n >= self.block_n


# Few configs on purpose: each one is a Triton compile at start-up (~1 s).
GEMV_CONFIGS = (  # M == 1: multiply-reduce, enough programs to keep every SM's loads in flight
    GemmConfig(8, 512, 4, 1),
    GemmConfig(16, 512, 8, 1),
    GemmConfig(4, 1024, 4, 1),
    GemmConfig(32, 256, 8, 1),
    GemmConfig(4, 1024, 4, 3),
    GemmConfig(8, 512, 4, 3),
    GemmConfig(2, 2048, 4, 1),  # won every M == 1 shape in run 2 (qkv, o, gate_up, down, lm_head)
    GemmConfig(1, 2048, 4, 1),
    GemmConfig(2, 2048, 8, 1),
    GemmConfig(4, 2048, 8, 1),
)
DOT_CONFIGS = (  # 1 < M <= 16: tl.dot on a 16-row tile, software-pipelined loads
    GemmConfig(16, 256, 4, 4),
    GemmConfig(32, 256, 4, 4),
    GemmConfig(64, 128, 4, 4),
    GemmConfig(16, 512, 4, 3),
)
MAX_M = 16


if _HAVE_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # One program = BLOCK_N output features; K is a multiple of BLOCK_K (checked on the host).
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + k).to(tl.float32)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _skinny_dot_kernel(
        x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m[:, None] * stride_x
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)  # bf16 x bf16 -> float32 accumulate
        y_ptrs = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _bf16(v):
        # v rounded to the nearest bf16 (ties to even), kept in float32. In integer arithmetic on
        # purpose: written as casts, the compiler turns the products and their sum into one bf16
        # FMA (a single rounding, run 16's PTX), which is not eager's two roundings.
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _rotated_head(src, cos_ptr, sin_ptr, pos, d, rotate, HEAD_DIM: tl.constexpr):
        """One head's two halves in float32; q and k heads (`rotate`) get x * cos + rotate_half(x) * sin
        at `pos`, v heads pass through."""
        HALF: tl.constexpr = HEAD_DIM // 2
        x1 = tl.load(src + d).to(tl.float32)
        x2 = tl.load(src + HALF + d).to(tl.float32)
        if rotate:
            c1 = tl.load(cos_ptr + pos * HEAD_DIM + d).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * HEAD_DIM + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * HEAD_DIM + d).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * HEAD_DIM + HALF + d).to(tl.float32)
            # Each product rounded to bf16 before the sum, as eager PyTorch and HF's
            # apply_rotary_pos_emb compute it in bf16: the same values, not merely close ones.
            o1 = _bf16(x1 * c1) - _bf16(x2 * s1)
            o2 = _bf16(x2 * c2) + _bf16(x1 * s2)
        else:
            o1 = x1
            o2 = x2
        return o1, o2

    @triton.jit
    def _rope_kv_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
        stride_qkv, stride_cb, stride_ch, stride_cs,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        # grid (rows, NUM_HEADS + 2 * NUM_KV): one program per (row, q/k/v head)
        row = tl.program_id(0)
        head = tl.program_id(1)
        HALF: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + row)
        o1, o2 = _rotated_head(qkv_ptr + row * stride_qkv + head * HEAD_DIM, cos_ptr, sin_ptr, pos, d,
                               head < NUM_HEADS + NUM_KV, HEAD_DIM)
        if head < NUM_HEADS:
            dst = q_ptr + row * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
        elif head < NUM_HEADS + NUM_KV:
            dst = k_cache_ptr + row * stride_cb + (head - NUM_HEADS) * stride_ch + pos * stride_cs
        else:
            dst = v_cache_ptr + row * stride_cb + (head - NUM_HEADS - NUM_KV) * stride_ch + pos * stride_cs
        tl.store(dst + d, o1.to(q_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, o2.to(q_ptr.dtype.element_ty))


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, config: GemmConfig) -> torch.Tensor:
    """x [M, K] @ w [N, K].T with float32 accumulation, for 1 <= M <= 16 (see module docstring)."""
    m, k = x.shape
    n = w.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n),)
    if m == 1:
        _gemv_kernel[grid](
            x, w, y, n, k, w.stride(0), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        _skinny_dot_kernel[grid](
            x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
            BLOCK_M=MAX_M, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return y


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Rotary on q/k of `qkv` [n, (H+2K)*D]; k, v stored in the caches' rows 0..n-1 at
    `positions`; returns rotated q [n, H*D]. Rotary in float32, rounded once to the dtype."""
    n = qkv.shape[0]
    _check_rotary_tables(cos, sin, head_dim)
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    q = torch.empty((n, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_kv_kernel[(n, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, positions, q, k_cache, v_cache,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, num_warps=1,
    )
    return q


def captured_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `fn`, run once eagerly first (compiles and algorithm choices outside the capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time_ms(fn: Callable[[], object], replays: int = 10) -> float:
    """Median time of one replay of a CUDA graph of `fn` (launch gaps excluded, as in decode; the tuners
    here and in `llm.serving.nf4_kernels`, and the kernel benches, time with it)."""
    graph = captured_graph(fn)
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]


def _run_all(
    x: torch.Tensor, mats: Sequence[torch.Tensor], reps: int, config: GemmConfig | None
) -> Callable[[], list[torch.Tensor]]:
    """x @ w.T for every w (a projection of every layer), by cuBLAS (None) or a Triton config."""
    if config is None:
        return lambda: [F.linear(x, w) for w in mats for _ in range(reps)]
    return lambda: [skinny_matmul(x, w, config) for w in mats for _ in range(reps)]


class GemmPlan:
    """Per (projection name, batch bucket): a Triton `GemmConfig`, or None for cuBLAS."""

    def __init__(self) -> None:
        self.choice: dict[tuple[str, int], GemmConfig | None] = {}
        self.timings: dict[str, dict[str, float]] = {}

    def get(self, name: str, m: int) -> GemmConfig | None:
        return self.choice.get((name, m))

    @torch.inference_mode()
    def tune(self, weights: dict[str, Sequence[torch.Tensor]], batch_sizes: Sequence[int]) -> None:
        """Time cuBLAS and each fitting Triton config on every weight of a projection (one graph
        of all layers), per batch size; keep the fastest. A config that fails is skipped."""
        started = time.monotonic()
        for name, mats in weights.items():
            n, k = mats[0].shape
            reps = max(1, 8 // len(mats))  # lm_head: one 262 MB matrix, a few times
            for m in batch_sizes:
                if m > MAX_M:
                    continue
                x = torch.randn(m, k, dtype=mats[0].dtype, device=mats[0].device)
                results: dict[str, float] = {"cublas": graph_time_ms(_run_all(x, mats, reps, None))}
                best: GemmConfig | None = None
                best_ms = results["cublas"]
                for config in GEMV_CONFIGS if m == 1 else DOT_CONFIGS:
                    if not config.fits(n, k):
                        continue
                    label = f"triton_{config.block_n}x{config.block_k}_w{config.num_warps}_s{config.num_stages}"
                    try:
                        ms = graph_time_ms(_run_all(x, mats, reps, config))
                    except Exception as error:  # noqa: BLE001 - a config the compiler rejects
                        logger.warning("triton config %s failed for %s: %r", label, name, error)
                        continue
                    results[label] = ms
                    if ms < best_ms * 0.98:  # a Triton kernel must win clearly to replace cuBLAS
                        best, best_ms = config, ms
                self.choice[(name, m)] = best
                self.timings[f"{name}_m{m}"] = {key: round(v / (len(mats) * reps) * 1000, 2)
                                                for key, v in results.items()}  # us per matmul
        self.tune_s = round(time.monotonic() - started, 2)

    def summary(self) -> dict:
        return {
            "tune_s": getattr(self, "tune_s", None),
            "choice": {f"{name}_m{m}": (None if c is None else c.__dict__) for (name, m), c in self.choice.items()},
            "us_per_matmul": self.timings,
        }


# --- paged KV cache: rotary + KV write into blocks, and decode attention over block tables -------
#
# Pool layout per layer: [num_blocks, kv_heads, block_size, head_dim] (one block of one head is a
# contiguous block_size x head_dim tile). `table` [n, max_blocks] int32 maps a row's logical block
# i (tokens i*block_size ...) to a pool block; block 0 is a scratch block that idle rows point at.

def _triton_launches_programmatically() -> bool:
    """This Triton can launch a kernel with the programmatic dependent launch attribute."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except Exception:  # noqa: BLE001 - an older or CPU-only Triton: plain launches
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_TRITON_PDL = _HAVE_TRITON and _triton_launches_programmatically()


def programmatic_options(device: torch.device) -> dict:
    """A decode-step Triton kernel's launch options: with `llm.serving.programmatic_launch` on here, it is
    scheduled while the kernel before it finishes and waits for it first thing (`GDC`)."""
    on = _TRITON_PDL and programmatic_launch.enabled(device)
    return {"GDC": True, "launch_pdl": True} if on else {"GDC": False}


if _HAVE_TRITON:

    @triton.jit
    def after_previous_kernels(GDC: tl.constexpr):  # noqa: ANN201 - a Triton function
        # First thing in a kernel launched programmatically: the kernels before it are done and
        # their writes visible; the next kernel may be scheduled (it waits for this one itself).
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _rope_kv_paged_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, q_ptr, k_pool_ptr, v_pool_ptr,
        stride_qkv, stride_tab, stride_pb, stride_ph, stride_pt,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        GDC: tl.constexpr,
    ):
        # As _rope_kv_kernel; only the K/V destination goes through the block table.
        after_previous_kernels(GDC)
        row = tl.program_id(0)
        head = tl.program_id(1)
        HALF: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + row)
        o1, o2 = _rotated_head(qkv_ptr + row * stride_qkv + head * HEAD_DIM, cos_ptr, sin_ptr, pos, d,
                               head < NUM_HEADS + NUM_KV, HEAD_DIM)
        block = tl.load(table_ptr + row * stride_tab + pos // BLOCK_SIZE).to(tl.int64)
        slot_off = block * stride_pb + (pos % BLOCK_SIZE) * stride_pt
        if head < NUM_HEADS:
            dst = q_ptr + row * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
        elif head < NUM_HEADS + NUM_KV:
            dst = k_pool_ptr + slot_off + (head - NUM_HEADS) * stride_ph
        else:
            dst = v_pool_ptr + slot_off + (head - NUM_HEADS - NUM_KV) * stride_ph
        tl.store(dst + d, o1.to(q_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, o2.to(q_ptr.dtype.element_ty))

    @triton.jit
    def _paged_attn_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, table_ptr, pos_ptr, acc_ptr, ml_ptr, scale,
        stride_tab, stride_pb, stride_ph, stride_pt,
        NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, GDC: tl.constexpr,
    ):
        # grid (rows, kv heads, splits). One program: the GROUP query heads of one KV head against
        # pages [split * PAGES_PER_SPLIT, ...) of the row, stopping at the row's real length
        # (position + 1). Online softmax in float32; partial (acc, max, sum) per split.
        after_previous_kernels(GDC)
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(pos_ptr + row).to(tl.int32) + 1
        n_pages = tl.cdiv(length, BLOCK_SIZE)
        first = split * PAGES_PER_SPLIT
        if first >= n_pages:
            return  # the reduce kernel only reads splits that hold tokens
        last = tl.minimum(first + PAGES_PER_SPLIT, n_pages)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK_SIZE)
        g_mask = g < GROUP
        q_rows = q_ptr + (row * NUM_KV * GROUP + kvh * GROUP + g[:, None]) * HEAD_DIM + d[None, :]
        q = tl.load(q_rows, mask=g_mask[:, None], other=0.0)  # [GROUP_PAD, D]: tl.dot needs >= 16 rows
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        s_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        tile = t[:, None] * stride_pt + d[None, :]
        for page in range(first, last):
            block = tl.load(table_ptr + row * stride_tab + page).to(tl.int64)
            base = block * stride_pb + kvh * stride_ph
            valid = (page * BLOCK_SIZE + t) < length
            # Positions past the row's length in its last block hold stale data: never load them
            # (0 * a stale NaN in P @ V would poison the row).
            k = tl.load(k_pool_ptr + base + tile, mask=valid[:, None], other=0.0)
            v = tl.load(v_pool_ptr + base + tile, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK_SIZE] float32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: every visited page holds >= 1 token
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        base_out = ((row * NUM_KV + kvh) * SPLITS + split) * GROUP
        tl.store(acc_ptr + (base_out + g[:, None]) * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        tl.store(ml_ptr + (base_out + g) * 2, m, mask=g_mask)
        tl.store(ml_ptr + (base_out + g) * 2 + 1, s_sum, mask=g_mask)

    @triton.jit
    def _paged_reduce_kernel(
        acc_ptr, ml_ptr, pos_ptr, out_ptr,
        NUM_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        PAGES_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, GDC: tl.constexpr,
    ):
        # grid (rows, kv heads * GROUP): combine the splits that hold tokens (log-sum-exp weights).
        after_previous_kernels(GDC)
        row = tl.program_id(0)
        head = tl.program_id(1)
        kvh = head // GROUP
        g = head % GROUP
        length = tl.load(pos_ptr + row).to(tl.int32) + 1
        active = tl.cdiv(tl.cdiv(length, BLOCK_SIZE), PAGES_PER_SPLIT)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        s_mask = s < active
        idx = ((row * NUM_KV + kvh) * SPLITS + s) * GROUP + g
        m = tl.load(ml_ptr + idx * 2, mask=s_mask, other=float("-inf"))
        total = tl.load(ml_ptr + idx * 2 + 1, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(s_mask, tl.exp(m - m_max), 0.0)
        acc = tl.load(acc_ptr + idx[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(total * w, 0)
        tl.store(out_ptr + (row * NUM_KV * GROUP + head) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def _check_rotary_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    """The rotary kernels read row `position` of cos and sin as head_dim values: a narrower table would
    be read past its end, silently (run 44: a test's half-width tables did, for positions past half)."""
    if cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape:
        raise ValueError(f"the rotary tables must be [positions, {head_dim}] each, got cos {tuple(cos.shape)} and "
                         f"sin {tuple(sin.shape)}")


def rope_kv_write_paged(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """`rope_kv_write` for a paged pool [blocks, K, block_size, D]: row i's k/v go to block
    table[i, pos // block_size], offset pos % block_size. Returns rotated q [n, H*D]."""
    n = qkv.shape[0]
    _check_rotary_tables(cos, sin, head_dim)
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert k_pool.stride() == v_pool.stride() and k_pool.stride(3) == 1 and table.stride(1) == 1
    q = torch.empty((n, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_kv_paged_kernel[(n, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, positions, table, q, k_pool, v_pool,
        qkv.stride(0), table.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_pool.shape[2],
        num_warps=1, **programmatic_options(qkv.device),
    )
    return q


# Flash-decoding split size: KV pages per program, at every batch size. Each program walks its pages
# one after another, so long splits leave the card waiting on loads. On an H200 (run 28,
# bench/paged_attention_splits.py), 16 rows x 8 KV heads took 9.4 us a layer at a 256-token KV with 2
# pages against 13.3 with 8 (the split used until then), 11.2 against 15.7 at 512; 8 rows 6.0 against
# 9.5 us with 4; one row was within 0.5 us of its best at 2.
PAGES_PER_SPLIT = 2


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    num_heads: int,
    split_pages: int | None = None,
) -> torch.Tensor:
    """One decode token per row against its paged KV: q [n, H*D] (GQA: H = K * group), pool
    [blocks, K, block_size, D], table [n, max_blocks] int32, positions [n] (the row attends to
    positions 0..pos). Reads only the row's own pages; float32 softmax. Returns [n, H*D]."""
    n = q.shape[0]
    _, num_kv, block_size, head_dim = k_pool.shape
    group = num_heads // num_kv
    max_blocks = table.shape[1]
    split_pages = split_pages or PAGES_PER_SPLIT
    splits = triton.cdiv(max_blocks, split_pages)
    acc = torch.empty((n, num_kv, splits, group, head_dim), dtype=torch.float32, device=q.device)
    ml = torch.empty((n, num_kv, splits, group, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((n, num_heads * head_dim), dtype=q.dtype, device=q.device)
    assert q.is_contiguous() and k_pool.stride() == v_pool.stride() and k_pool.stride(3) == 1
    _paged_attn_kernel[(n, num_kv, splits)](
        q, k_pool, v_pool, table, positions, acc, ml, scale,
        table.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        NUM_KV=num_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PAGES_PER_SPLIT=split_pages, SPLITS=splits, num_warps=4, num_stages=2,
        **programmatic_options(q.device),
    )
    _paged_reduce_kernel[(n, num_heads)](
        acc, ml, positions, out,
        NUM_KV=num_kv, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        PAGES_PER_SPLIT=split_pages, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1,
        **programmatic_options(q.device),
    )
    return out
