"""`nf4` mode on the GPU: bit-exact dequantization and the fused kernels against the reference path
(device tool; skipped without CUDA). Its tiny-model fidelity is in test_fidelity.py with the other modes."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def _quantized(rows: int, cols: int, seed: int):  # noqa: ANN202
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    weight = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02
    return bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda:0")


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_dequantization_is_bitsandbytes_bit_for_bit(shape):
    import bitsandbytes.functional as bnbf

    from llm.serving.nf4 import NF4Matrix

    param = _quantized(*shape, seed=shape[0])
    theirs = bnbf.dequantize_4bit(param.data, param.quant_state)
    ours = NF4Matrix.from_bnb(param).dequantize(torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    mismatches = (ours.view(torch.int16) != theirs.view(torch.int16)).sum().item()
    print("NF4_DEQUANT " + json.dumps({"shape": shape, "mismatches": mismatches}))
    assert mismatches == 0


# Mistral-7B's fused projections: (rows of each part, 0), in_features
SHAPES = {"qkv": ([(4096, 0), (1024, 0), (1024, 0)], 4096), "gate_up": ([(14336, 0), (14336, 0)], 4096),
          "down": ([(4096, 0)], 14336)}


def _projection(parts: list[tuple[int, int]], cols: int, rank: int = 32, round_first: bool = True,
                seed: int = 0):  # noqa: ANN202
    from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection

    matrices = [NF4Matrix.from_bnb(_quantized(rows, cols, seed=seed + i)) for i, (rows, _) in enumerate(parts)]
    g = torch.Generator(device="cuda:0").manual_seed(7 + seed)
    a = torch.randn(rank * len(parts), cols, device="cuda:0", generator=g) * 0.02
    b = torch.randn(sum(r for r, _ in parts), rank, device="cuda:0", generator=g) * 0.02
    lora = LoraParts.stacked(a, b, [rows for rows, _ in parts], rank, 0.25)
    return NF4Projection(NF4Matrix.concat(matrices), lora, round_lora_first=round_first)


def projection_and_input(name: str, rows: int):  # noqa: ANN201
    """One of SHAPES' projections (random weights, a random LoRA) and `rows` rows of x for it."""
    parts, cols = SHAPES[name]
    return _projection(parts, cols), torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")


def layouts(projection, rows: int) -> list:  # noqa: ANN001
    """Every configuration that runs this projection at `rows` rows (`nf4_kernels.all_configs`)."""
    from llm.serving import nf4_kernels

    n, k = projection.weight.shape
    return nf4_kernels.all_configs(rows, n, k, projection.lora.boundaries, projection.lora.rank)


def assert_replays_follow_new_inputs(step, x: torch.Tensor, label: str, replays: int = 6) -> None:  # noqa: ANN001
    """`step(x)` captured in a CUDA graph, replayed with new values in x each time: every replay equals the
    same launches run one after the other (`serial_launches`) on those values. A launch that the one
    before it lets start early must still read this replay's values, never the replay before's (run 32:
    a load hoisted above the wait did, and the decode step's logits turned to NaN)."""
    from llm.serving import programmatic_launch

    static_x = x.clone()
    step(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static_x)
    for replay in range(replays):
        new_x = torch.randn_like(x)
        with programmatic_launch.serial_launches():
            expected = step(new_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), (label, replay)


def assert_replays_repeat(run, first: torch.Tensor, lora, counters: str, label: str, replays: int = 3) -> None:  # noqa: ANN001
    """`run` captured in a CUDA graph, as serving runs it: every replay gives `first`'s bits and
    leaves the kernel's `counters` at zero (otherwise a launch reads too early or waits forever)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first), label
        left = lora.counters(counters, 0, out.device)
        assert int(left.abs().sum()) == 0, (label, left)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_fused_kernel_equals_the_reference_path(rows, name):
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, rows)
    reference = projection.reference(x)
    worst = 0.0
    # the served candidates and the Triton fallbacks (served where the tensor-core kernel cannot run)
    for config in layouts(projection, rows):
        fused = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        diff = (fused.float() - reference.float()).abs()
        # Only the float32 summation order differs: a bf16 rounding step at most, rarely. (The x-table
        # kernel multiplies the unrounded NF4 weights: tests/gpu/test_nf4_xtab.py bounds it otherwise.)
        assert diff.max().item() <= 2 * reference.float().abs().max().item() * 2**-8, (config, diff.max())
        assert config.kind == "xtab" or (diff > 0).float().mean().item() < 0.05, config
        worst = max(worst, diff.max().item())
    print("NF4_KERNEL " + json.dumps({"name": name, "rows": rows, "max_abs_diff": worst}))


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_kernel_variants_give_the_served_kernels_bits(rows, name):
    # Absmax blocks decoded through the shared code pairs instead of register tables
    # (bench/nf4_kernels.py --variants times them): the same products and roundings reach the same
    # MMAs, so every output equals the register tables' own.
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, rows)
    # layouts that serve (run 22): fused two-tile, two groups ahead, plain, x prefetched (not all 18:
    # each variant is one compile per layout, row tile and K)
    served = {"mma_32x256w4s1f", "mma_16x256w8s2f", "mma_16x256w8s1", "mma_32x256w4s1pf"}
    configs = [c for c in layouts(projection, rows) if c.label in served]
    assert configs
    for config in configs:
        served = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        for variant in nf4_kernels.variants(config, rows, projection.lora.rank):
            other = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, variant)
            assert torch.equal(other, served), variant.label


@pytest.mark.parametrize("rows", [17, 300])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("round_first", [True, False])
def test_the_prompt_path_equals_the_reference_path(rows, name, round_first, monkeypatch):
    # Prompts with the tensor cores' LoRA products: chunked dequantize + cuBLAS, the LoRA B product
    # and PEFT's roundings in one kernel writing the output (gate/up: 7 chunks of 4,096 weight rows,
    # two LoRA parts).
    parts, cols = SHAPES[name]
    projection = _projection(parts, cols, round_first=round_first)
    projection.use_kernels = True
    monkeypatch.setattr("llm.serving.nf4.EXACT_PROMPT_ROWS", 0)
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")
    reference = projection.reference(x)
    out = projection(x)
    diff = (out.float() - reference.float()).abs()
    assert diff.max().item() <= 2 * reference.float().abs().max().item() * 2**-8, diff.max()
    assert (diff > 0).float().mean().item() < 0.01


@pytest.mark.parametrize("rows", [17, 64, 367, 384, 1500, 2048])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("round_first", [True, False])
def test_prompts_with_pefts_products_are_the_reference_path_bit_for_bit(rows, name, round_first, monkeypatch):
    # As served up to EXACT_PROMPT_ROWS: PEFT's own float32 LoRA products (the B product 4,096
    # columns at a time), the scaling and roundings in one kernel per chunk; the reference path is
    # the seed's prompt function (2,048 rows: the same path forced, where serving takes TF32x3).
    parts, cols = SHAPES[name]
    projection = _projection(parts, cols, round_first=round_first)
    projection.use_kernels = True
    monkeypatch.setattr("llm.serving.nf4.EXACT_PROMPT_ROWS", 2048)
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")
    out, reference = projection(x), projection.reference(x)
    differing = (out.view(torch.int16) != reference.view(torch.int16)).sum().item()
    print("NF4_EXACT_PROMPT " + json.dumps({"name": name, "rows": rows, "round_first": round_first,
                                            "differing": differing}))
    assert differing == 0


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_the_exact_prompt_path_follows_new_inputs_in_graph_replays(name):
    # As the prefill graphs run it: every replay the same bits as the same call made eagerly on its new input.
    projection, x = projection_and_input(name, 288)
    projection.use_kernels = True
    assert_replays_follow_new_inputs(projection, x, name, replays=4)


@pytest.mark.parametrize("rows", [17, 1500])
@pytest.mark.parametrize("k", [4096, 14336])
def test_the_prompt_paths_lora_a_kernel_is_pefts_float32_product(rows, k):
    # bf16 x read as it is, float32 A as three TF32 products: float32's accuracy, no cast of x
    from llm.serving import nf4_kernels

    projection = _projection([(4096, 0), (1024, 0), (1024, 0)] if k == 4096 else [(4096, 0)], k)
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda:0")
    t = nf4_kernels.lora_a_prompt(x, projection.lora)
    exact = x.double() @ projection.lora.a.double().T
    peft = torch.nn.functional.linear(x.float(), projection.lora.a)
    ours_error = (t.double() - exact).abs().max().item()
    peft_error = (peft.double() - exact).abs().max().item()
    print("NF4_LORA_A_PROMPT " + json.dumps({"rows": rows, "k": k, "error": ours_error, "peft_error": peft_error}))
    assert ours_error <= 4 * peft_error + 1e-6


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 9, 16])
@pytest.mark.parametrize("k", [4096, 14336])
def test_the_tensor_core_paths_lora_a_kernel(rows, k):
    # One kernel gives the CUDA kernel its inputs: x in llm.serving.nf4_mma.operand_order (the layout the
    # CUDA kernel was checked against on the CPU, tests/test_nf4_mma_emulated.py) and t = x @ A.T,
    # as split-K partial sums (1-4 rows) or whole, added up by whichever program finishes last
    # (5-16 rows): the same bits on every call, and its arrival counters back at zero after each.
    from llm.serving import nf4_kernels, nf4_mma

    projection = _projection([(1024, 0), (1024, 32), (1024, 64)], k)
    lora = projection.lora
    n = projection.weight.shape[0]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda:0")
    # the kernel reads only the values of real rows (lanes of absent rows read row 0's)
    row_of_value = nf4_mma.operand_order(torch.arange(16, device="cuda:0")[:, None].expand(16, k).float())
    real = row_of_value < rows
    expected_xq = nf4_mma.operand_order(x)[real]
    expected_t = x.double() @ lora.a.double().T
    first = None
    for _ in range(3):
        xq, t = nf4_kernels.mma_inputs(x, n, lora)
        assert torch.equal(xq[real], expected_xq)
        assert t.shape[1:] == (rows, lora.a.shape[0]) and (t.shape[0] == 1 or rows <= 4)
        assert (t.sum(0).double() - expected_t).abs().max().item() < 1e-5
        first = t.clone() if first is None else first
        assert torch.equal(t, first)
        assert int(lora.counters("arrivals", 0, x.device).abs().sum()) == 0


@pytest.mark.parametrize("rows", [1, 16])
def test_the_fused_launch_repeats_its_bits_in_graphs_and_leaves_its_counters_at_zero(rows):
    # The fused kernel's weight blocks wait on counters its LoRA A blocks raise; the last weight block
    # zeroes them. Replayed from a CUDA graph, as serving runs it, every launch must find them at
    # zero: otherwise a launch reads x or t too early (wrong bits) or waits forever (a trap).
    from llm.serving import nf4_kernels

    projection = _projection([(4096, 0), (1024, 32), (1024, 64)], 4096)
    lora = projection.lora
    x = torch.randn(rows, projection.weight.shape[1], dtype=torch.bfloat16, device="cuda:0")
    fused = [c for c in layouts(projection, rows) if c.fuse_a]
    assert fused
    for config in fused:
        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_kernels.nf4_lora_linear(x, projection.weight, lora, True, config)

        assert_replays_repeat(run, run(), lora, "fused", config.label, replays=5)


# Served 4096 x 4096 layouts (run 32's plan: o at 1 row, q/k/v and o at 2, o at 16) and a t-split one
_CHAINED_LAYOUTS = {1: {"mma_16x256w16s1f", "mma_16x256w8s2f"}, 2: {"mma_16x256w16s1", "mma_16x256w8s1ft2"},
                    16: {"mma_16x256w8s2f", "mma_16x256w8s1", "mma_32x256w4s1pft2"}}


@pytest.mark.parametrize("rows", sorted(_CHAINED_LAYOUTS))
def test_a_chained_launch_reads_this_steps_output_of_the_launch_before_it_in_graph_replays(rows):
    """Two tensor-core launches in a row, as in a decode step: the second starts early and must read the
    first's output of this replay (`assert_replays_follow_new_inputs`)."""
    from llm.serving import nf4_kernels

    first = _projection([(4096, 0)], 4096, seed=0)
    second = _projection([(4096, 0)], 4096, seed=1)
    configs = [c for c in layouts(second, rows) if c.label in _CHAINED_LAYOUTS[rows]]
    assert len(configs) == len(_CHAINED_LAYOUTS[rows]), [c.label for c in configs]
    x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda:0")
    for config in configs:
        def step(x: torch.Tensor, config=config) -> torch.Tensor:  # noqa: ANN001
            y = nf4_kernels.nf4_lora_linear(x, first.weight, first.lora, True, config)
            return nf4_kernels.nf4_lora_linear(y, second.weight, second.lora, True, config)

        assert_replays_follow_new_inputs(step, x, config.label)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("name", ["qkv", "down"])
def test_blocks_splitting_k_match_the_reference_and_repeat_their_bits_in_graphs(rows, name):
    # K split across the blocks of a feature tile: the last block to arrive adds the others' float32
    # sums in a fixed order, so a replay repeats the bits, and it leaves the tile counters at zero.
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, rows)
    lora = projection.lora
    reference = projection.reference(x)
    n, k = projection.weight.shape
    bases = [nf4_kernels.NF4Config(16, 256, 8, 1, kind="mma", fuse_a=True),
             nf4_kernels.NF4Config(32, 256, 4, 1, kind="mma", prefetch_x=True, fuse_a=True, shared_lookups=2),
             nf4_kernels.NF4Config(16, 256, 8, 2, kind="mma")]
    variants = [v for base in bases for v in nf4_kernels.k_split_variants(base, n, k, lora.boundaries, rows, lora.rank)]
    assert len(variants) >= 6
    for config in variants:
        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_kernels.nf4_lora_linear(x, projection.weight, lora, True, config)

        first = run()
        assert nf4_kernels.matches_reference(first, reference), config.label
        assert_replays_repeat(run, first, lora, "tiles", config.label)


@pytest.mark.parametrize("rows", [367, 16])
def test_reference_lora_is_pefts_own_products_bit_for_bit(rows):
    # PEFT runs one float32 A and one B product per projection; a stacked A product for q/k/v
    # rounds differently on the GPU (bench/nf4_layer_diff.py: the prompt then parts from the seed's).
    from llm.serving.nf4 import LoraParts

    g = torch.Generator(device="cuda:0").manual_seed(rows)
    rank, cols, parts = 32, 4096, [4096, 1024, 1024]
    a = torch.randn(rank * len(parts), cols, device="cuda:0", generator=g) * 0.02
    b = torch.randn(sum(parts), rank, device="cuda:0", generator=g) * 0.02
    starts = [0, 4096, 5120, 6144]
    lora = LoraParts(a=a, b=b, segments=tuple((starts[i], starts[i + 1], i * rank) for i in range(3)), rank=rank,
                     scaling=0.25)
    x = (torch.randn(rows, cols, device="cuda:0", generator=g) * 0.5).to(torch.bfloat16)
    xf = x.float()
    pefts = torch.cat([
        torch.nn.functional.linear(torch.nn.functional.linear(xf, a[i * rank : (i + 1) * rank]),
                                   b[starts[i] : starts[i + 1]]) * 0.25
        for i in range(3)
    ], dim=-1)
    assert torch.equal(lora.delta(x), pefts)
