"""The next token of every row in two Triton launches: temperature, top-k, top-p and the draw.

Why: `batching.sample_tokens` in PyTorch is ~25 small kernels a step (a multi-block top-k over the
32,000 logits, softmax, two cumulative sums, a search, an argmax over the whole row for greedy rows,
casts). They run outside the decode graph, one after another, after every token: ~0.1 ms of GPU time
on an H200 in run 39's profile, ~4 % of a one-row `nf4` token.

Same function as `sample_tokens` (HF's warpers in their order; the uniform `u` drawn by the caller
as before), computed on the few candidates that can matter:
1. `_chunk_candidates_kernel`, a program per (row, 1,024 logits): its chunk's `CANDIDATES` largest
   logits, as keys that sort by value and then by the lower token id (so rank 0 is `argmax`'s
   pick, the first of equal maxima).
2. `_draw_kernel`, a program per row: the best `CANDIDATES` of the row's candidates, sorted (the
   row's top `CANDIDATES` are among them, since each chunk kept its own), keeps the row's top_k,
   divides by the temperature, softmax, keeps the smallest prefix whose mass reaches top_p (at
   least one), and takes the first rank whose cumulative mass exceeds `u` times the kept mass.
   Greedy rows take rank 0.
Rows whose top_k is 0 (off) or above `CANDIDATES` are not for this path: the caller keeps
PyTorch's. Float rounding differs from PyTorch's kernels (another summation order, `exp`), so a
token whose cumulative mass sits within a rounding step of the top_p edge or of `u` may go the other
way: the distribution is the same.
"""

# Triton kernel arguments are pointers / ints typed by Triton itself, not Python annotations.
# ruff: noqa: ANN001

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

try:  # Triton ships with CUDA builds of PyTorch only.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton path"
    _HAVE_TRITON = False

logger = logging.getLogger(__name__)

CHUNK = 1024
# The most top_k this path serves (the seed's card samples with 50).
CANDIDATES = 64
# Rows' candidates sorted in one program at most: a vocabulary up to 256 chunks (262,144 tokens).
MAX_CHUNKS = 256
# Triton's bitonic top-k (`tl.topk`, Triton >= 3.4) sorts only what the best CANDIDATES need: the
# later merge steps work on halves, quarters... of the keys, and everything after the selection on
# CANDIDATES keys instead of all of them (machine instructions a thread at 4 warps, sm_90,
# `bench/triton_compile_check.py`: 3,712 -> 2,712 a chunk's program, 10,448 -> 5,344 a row's). The
# same keys in the same order as the full sort's first CANDIDATES, since no two keys are equal.
# Older Triton: the full sort.
HAS_TOPK = _HAVE_TRITON and hasattr(tl, "topk")
# Warps a program: each launch has one program per SM or fewer, so its time is the per-thread chain of
# compare-exchanges, which shrinks with more warps (instructions a thread at 4 / 8 / 16 warps: a
# chunk's 1,024 keys 2,712 / 1,552 / 1,000, a row's 2,048 keys 5,344 / 3,264 / 2,032). The chunks
# take 8, so that 16 rows' 512 programs leave room on the SMs; a row's draw, 16 programs at most, 16.
CHUNK_WARPS = 8
DRAW_WARPS = 16


# Why this path is off in this process (a failed start-up check or launch), or None.
_switched_off: str | None = None


def switch_off(reason: str | None) -> None:
    """PyTorch's sampler from now on, for `reason` (one WARNING line); None serves this path again."""
    global _switched_off
    if reason is not None and _switched_off is None:
        logger.warning("Triton sampling switched off, PyTorch's sampler from now on: %s", reason)
    _switched_off = reason


def sort_fully(reason: str) -> None:
    """The full sort from now on instead of Triton's bitonic top-k, for `reason` (one WARNING line)."""
    global HAS_TOPK
    logger.warning("Triton sampling: its bitonic top-k failed (%s); the full sort instead", reason)
    HAS_TOPK = False


@contextlib.contextmanager
def pytorch_sampling(reason: str) -> Iterator[None]:
    """PyTorch's sampler inside the block (a before/after in one process); after it, this path's state
    as it was before (a start-up check that switched it off stays in force)."""
    global _switched_off
    before = _switched_off
    _switched_off = before or reason
    try:
        yield
    finally:
        _switched_off = before


def serves(device: torch.device, vocab: int, top_k: int) -> bool:
    """Whether this path draws on `device` for a vocabulary of `vocab` with `top_k` (the largest
    of the sampled rows; 0 when every row is greedy)."""
    return (
        _HAVE_TRITON and _switched_off is None and torch.device(device).type == "cuda"
        and 0 <= top_k <= CANDIDATES and _chunks(vocab) <= MAX_CHUNKS
    )


def _chunks(vocab: int, chunk: int = CHUNK) -> int:
    # A power of two, so the second launch sorts all of them without padding; extra chunks hold
    # only -inf keys.
    return 1 << max(0, (-(-vocab // chunk) - 1).bit_length())


def draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    greedy: torch.Tensor,
    u: torch.Tensor,
    *,
    chunk: int = CHUNK,
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """One token id (int64) per row of `logits` [n, V] (float32). Per row: `temperature`, `top_p` and
    `top_k` (float32; top_k 1..`candidates` for sampled rows, anything for greedy ones), `greedy`
    (bool) and `u` (a uniform in [0, 1), float32). `chunk` and `candidates` (powers of two) are smaller only where
    Triton's interpreter runs this on the CPU."""
    n, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:  # as PyTorch's sampler: float32 arithmetic
        logits = logits.float().contiguous()
    chunks = _chunks(vocab, chunk)
    keys = torch.empty((n, chunks * candidates), dtype=torch.int64, device=logits.device)
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    _chunk_candidates_kernel[(n, chunks)](
        logits, keys, logits.stride(0), vocab, CHUNK=chunk, CANDIDATES=candidates, TOPK=HAS_TOPK,
        num_warps=CHUNK_WARPS,
    )
    _draw_kernel[(n,)](
        keys, temperature, top_p, top_k, greedy, u, tokens, vocab,
        TOTAL=chunks * candidates, CANDIDATES=candidates, TOPK=HAS_TOPK, num_warps=DRAW_WARPS,
    )
    return tokens


if _HAVE_TRITON:

    @triton.jit
    def _ordered(bits):
        # float32 bits -> an int32 that orders as the floats do (negatives' magnitude bits flipped);
        # the same map undoes itself.
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _best(keys, CANDIDATES: tl.constexpr, TOPK: tl.constexpr):
        """The CANDIDATES largest of `keys`, largest first, and their ranks; with the full sort, all
        keys sorted and their ranks (the caller uses the first CANDIDATES)."""
        if TOPK:
            return tl.topk(keys, CANDIDATES), tl.arange(0, CANDIDATES)
        else:
            return tl.sort(keys, descending=True), tl.arange(0, keys.shape[0])

    @triton.jit
    def _chunk_candidates_kernel(logits_ptr, keys_ptr, row_stride, vocab, CHUNK: tl.constexpr,
                                 CANDIDATES: tl.constexpr, TOPK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        token = chunk * CHUNK + tl.arange(0, CHUNK)
        real = token < vocab
        x = tl.load(logits_ptr + row * row_stride + token, mask=real, other=float("-inf"))
        high = _ordered(x.to(tl.int32, bitcast=True)).to(tl.int64) << 32
        # The lower token id sorts higher among equal logits: argmax's tie rule.
        low = tl.where(real, vocab - 1 - token, 0).to(tl.int64)
        ranked, rank = _best(high | low, CANDIDATES, TOPK)
        tl.store(keys_ptr + (row * tl.num_programs(1) + chunk) * CANDIDATES + rank, ranked, mask=rank < CANDIDATES)

    @triton.jit
    def _draw_kernel(keys_ptr, temperature_ptr, top_p_ptr, top_k_ptr, greedy_ptr, u_ptr, out_ptr, vocab,
                     TOTAL: tl.constexpr, CANDIDATES: tl.constexpr, TOPK: tl.constexpr):
        row = tl.program_id(0)
        ranked, rank = _best(tl.load(keys_ptr + row * TOTAL + tl.arange(0, TOTAL)), CANDIDATES, TOPK)
        logit = _ordered((ranked >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        token = vocab - 1 - (ranked & 0xFFFFFFFF).to(tl.int32)
        in_top_k = rank < tl.load(top_k_ptr + row).to(tl.int32)
        scaled = tl.where(in_top_k, logit / tl.load(temperature_ptr + row), float("-inf"))
        weight = tl.where(in_top_k, tl.exp(scaled - tl.max(scaled, 0)), 0.0)
        probs = weight / tl.sum(weight, 0)
        mass_before = tl.cumsum(probs, 0) - probs
        kept = in_top_k & ((mass_before < tl.load(top_p_ptr + row)) | (rank == 0))
        kept_probs = tl.where(kept, probs, 0.0)
        target = tl.load(u_ptr + row) * tl.sum(kept_probs, 0)
        below = kept & (tl.cumsum(kept_probs, 0) <= target)
        # The first rank whose cumulative mass exceeds the target; the last kept one if rounding
        # put the target at the very end.
        choice = tl.minimum(tl.sum(below.to(tl.int32), 0), tl.sum(kept.to(tl.int32), 0) - 1)
        choice = tl.where(tl.load(greedy_ptr + row) != 0, 0, choice)
        tl.store(out_ptr + row, tl.sum(tl.where(rank == choice, token, 0), 0).to(tl.int64))
