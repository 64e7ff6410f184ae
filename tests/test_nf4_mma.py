"""`llm.serving.nf4_mma` on the CPU: the generated CUDA source and the kernel's sizing rules (the kernel itself
runs in tests/gpu/test_nf4_kernels.py, against the reference path, for 1..16 rows)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from llm.serving import nf4_mma
from llm.serving.nf4 import NF4_CODE


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def test_the_source_carries_the_code_table_exactly():
    # The weights are bf16(code[i] * absmax): a code value off by one float32 ulp changes weights.
    source = nf4_mma.source(NF4_CODE, warps=8, rows=8, rank=32)
    table = re.search(r"CODE_TABLE\[16\] = \{([^}]*)\}", source).group(1)
    values = [float.fromhex(v.strip().rstrip("f")) for v in table.split(",")]
    assert values == [_float32(v) for v in NF4_CODE]
    assert "#define WARPS 8" in source and "#define ROWS 8" in source and "#define RANK 32" in source
    assert "#define TILES 1" in source


@pytest.mark.parametrize(("warps", "rows", "rank", "tiles", "code"), [
    (3, 8, 32, 1, NF4_CODE), (8, 12, 32, 1, NF4_CODE), (8, 8, 0, 1, NF4_CODE), (8, 8, 32, 3, NF4_CODE),
    (8, 8, 32, 1, NF4_CODE[:8]),
])
def test_no_source_for_a_shape_the_kernel_does_not_handle(warps, rows, rank, tiles, code):
    with pytest.raises(ValueError):
        nf4_mma.source(code, warps, rows, rank, tiles)


def test_the_x_prefetch_is_a_switch_of_the_source():
    assert "#define PREFETCH_X 1" in nf4_mma.source(NF4_CODE, 4, 16, 32, 1, prefetch_x=True)
    assert "#define PREFETCH_X 0" in nf4_mma.source(NF4_CODE, 4, 16, 32, 1)


def test_k_is_compiled_into_the_kernel():
    assert "#define KDIM 14336" in nf4_mma.source(NF4_CODE, 4, 8, 32, k=14336)
    with pytest.raises(ValueError):
        nf4_mma.source(NF4_CODE, 4, 8, 32, k=4000)  # not whole 256-input groups


@pytest.mark.parametrize("n", [4096, 6144, 28672])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_lora_splits_keep_the_partial_sum_traffic_bounded(n, rows):
    from llm.serving import nf4_kernels

    cap = nf4_kernels.lora_splits_cap(rows, n, rank=32)
    per_split = (n // nf4_mma.TILE_N) * rows * 32 * 4
    assert cap in (1, 2, 4, 8, 16)
    assert cap == 1 or cap * per_split <= nf4_kernels.T_SUM_BYTES
    assert cap == 16 or 2 * cap * per_split > nf4_kernels.T_SUM_BYTES  # as many as the bound allows


def test_not_available_without_cuda():
    assert not nf4_mma.available("cpu")
    if not torch.cuda.is_available():
        assert not nf4_mma.available("cuda")


SHAPES = [(6144, 4096, [4096, 5120]), (4096, 4096, []), (28672, 4096, [14336]), (4096, 14336, [])]


@pytest.mark.parametrize(("n", "k", "boundaries"), SHAPES)
def test_batches_take_the_tensor_core_kernel_alone_and_one_row_keeps_the_lut_gemv(n, k, boundaries):
    from llm.serving import nf4_kernels

    for rows in (2, 3, 4, 7, 16):
        assert {c.kind for c in nf4_kernels._candidates(rows, n, k, boundaries, mma=True)} == {"mma"}
    one_row = {c.kind for c in nf4_kernels._candidates(1, n, k, boundaries, mma=True)}
    assert "mma" in one_row and "lut" in one_row  # run 12: the LUT GEMV still won `o` at one row


@pytest.mark.parametrize(("n", "k", "boundaries"), SHAPES)
def test_fallbacks_and_defaults_are_triton_kernels(n, k, boundaries):
    # where NVRTC or sm_80 is missing, or the tuner did not see a weight: never the unchecked CUDA kernel
    from llm.serving import nf4_kernels

    for rows in (1, 2, 4, 16):
        assert all(c.kind != "mma" for c in nf4_kernels._candidates(rows, n, k, boundaries, mma=False))
        assert nf4_kernels.default_config(rows, n, k, boundaries).kind != "mma"


def test_a_failed_compile_turns_the_kernel_off_with_one_warning(monkeypatch, caplog):
    # NVRTC missing or refusing the source (it cannot run here; its PyTorch entry point is replaced)
    calls = []

    def refuse(source_text: str, name: str) -> None:
        calls.append(name)
        raise RuntimeError("nvrtc: error: failed to open libnvrtc-builtins.so.13.0\nmore detail")

    monkeypatch.setattr(nf4_mma, "_DISABLED", None)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", refuse, raising=False)
    source = nf4_mma.source(NF4_CODE, 4, 8, 32)
    with caplog.at_level("WARNING", logger="llm.serving.nf4_mma"):
        for _ in range(3):
            with pytest.raises(nf4_mma.MmaUnavailable):
                nf4_mma._compile(source)
    assert calls == ["nf4_mma_kernel"]  # not retried for every candidate and layer
    assert nf4_mma.disabled_reason() == "nvrtc: error: failed to open libnvrtc-builtins.so.13.0"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Triton kernels serve instead" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_part_starts_tell_the_kernels_where_each_lora_part_begins():
    from llm.serving.nf4 import LoraParts

    def lora(*sizes: int) -> LoraParts:
        return LoraParts.stacked(torch.zeros(1), torch.zeros(1), sizes, 32, 0.25)

    assert lora(4096, 1024, 1024).part_starts(6144) == (4096, 5120)  # q/k/v
    assert lora(14336, 14336).part_starts(28672) == (14336, 28672)  # gate/up
    assert lora(4096).part_starts(4096) == (4096, 4096)  # one part: every row is in it
    assert lora(4096, 1024, 1024).boundaries == [4096, 5120]


def test_the_one_row_kernel_exists_only_with_the_lora_a_product_fused():
    # One row reads x as it is, which only the fused launch passes; the separate LoRA A kernel
    # writes x in operand order for the 8-row kernel instead.
    assert "#define FUSE_A 1" in nf4_mma.source(NF4_CODE, 8, 1, 32, fuse_a=True)
    with pytest.raises(ValueError):
        nf4_mma.source(NF4_CODE, 8, 1, 32)
    assert nf4_mma.fused_kernel_rows(1) == 1 and nf4_mma.fused_kernel_rows(5) == 8


def test_shared_lookups_are_checked_and_named():
    from llm.serving.nf4_kernels import NF4Config

    assert "#define SHARED_LOOKUPS 0" in nf4_mma.source(NF4_CODE, 4, 1, 32, 2, fuse_a=True)
    assert "#define SHARED_LOOKUPS 3" in nf4_mma.source(NF4_CODE, 4, 1, 32, 2, fuse_a=True, shared_lookups=3)
    with pytest.raises(ValueError):  # two tiles: four absmax blocks per lane and group
        nf4_mma.source(NF4_CODE, 4, 1, 32, 2, fuse_a=True, shared_lookups=5)
    labels = [NF4Config(32, 256, 4, 1, kind="mma", fuse_a=True, shared_lookups=lookups).label for lookups in (0, 3)]
    assert labels == ["mma_32x256w4s1f", "mma_32x256w4s1ft3"]


def test_the_shared_code_pairs_only_where_the_shared_memory_fits():
    # 32 KB of code pairs beside the partial sums: 16 warps of 16 rows would need 55 KB of the 48
    assert nf4_mma.fits(1, 32, 4, 2, True, 4) and nf4_mma.fits(16, 32, 4, 2, True, 4)
    assert nf4_mma.fits(16, 32, 16, 1, True, 0) and not nf4_mma.fits(16, 32, 16, 1, True, 1)
    with pytest.raises(ValueError):
        nf4_mma.source(NF4_CODE, 16, 16, 32, 1, fuse_a=True, shared_lookups=1)


def test_the_tuner_and_the_variants_skip_layouts_whose_shared_memory_does_not_fit():
    from llm.serving.nf4_kernels import NF4Config, variants

    sixteen_warps = NF4Config(16, 256, 16, 1, kind="mma", fuse_a=True)
    assert [v.label for v in variants(sixteen_warps, 1, 32)] == ["mma_16x256w16s1ft1", "mma_16x256w16s1ft2"]
    assert variants(sixteen_warps, 16, 32) == [] and sixteen_warps.fits_kernel(16, 32)
    assert NF4Config(16, 64, 4, 1, kind="gather_dot").fits_kernel(16, 4096)  # no shared table there


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) to count registers")
def test_the_shared_lookups_compile_for_sm90_without_spills_in_fewer_registers(tmp_path):
    # ptxas checks what the emulation cannot: the shared table's size and its loads' registers
    # (the served one-row layout takes 166 registers with register tables only)
    cu = tmp_path / "kernel.cu"
    cu.write_text(nf4_mma.source(NF4_CODE, 4, 1, 32, 2, fuse_a=True, shared_lookups=3))
    built = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), "-Xptxas", "-v",
                            str(cu)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "0 bytes spill stores" in built.stderr, built.stderr
    registers = int(re.search(r"Used (\d+) registers", built.stderr).group(1))
    assert registers <= 128, built.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) to count registers")
def test_the_one_row_two_tile_kernel_keeps_ptxass_own_register_count(tmp_path):
    # 166 with nvcc 13: 3 blocks of 4 warps per SM. Any minimum of blocks per SM in its launch bounds,
    # even 1, let ptxas take 253 (2 blocks per SM: 20 % slower in run 21).
    cu = tmp_path / "kernel.cu"
    cu.write_text(nf4_mma.source(NF4_CODE, 4, 1, 32, 2, fuse_a=True))
    built = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), "-Xptxas", "-v",
                            str(cu)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert 128 < int(re.search(r"Used (\d+) registers", built.stderr).group(1)) <= 168, built.stderr
    assert "0 bytes spill stores" in built.stderr


def _cuobjdump() -> str | None:
    """cuobjdump on PATH, or the one Triton ships with its NVIDIA backend."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


# (warps, rows, tiles, ahead, k, fused, shared lookups): the layouts the H200's tuner served at 16 rows in
# run 43 (q/k/v, o, gate/up, down), o's at one row, and one without the fused LoRA A blocks
SERVED_SHAPES = [(4, 16, 1, 2, 4096, True, 0), (8, 16, 1, 2, 4096, True, 0), (4, 16, 2, 1, 4096, True, 2),
                 (8, 16, 1, 1, 14336, True, 0), (16, 1, 1, 1, 4096, True, 0), (8, 16, 1, 1, 4096, False, 0)]


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize(("warps", "rows", "tiles", "ahead", "k", "fuse_a", "shared_lookups"), SERVED_SHAPES)
def test_the_first_weights_are_asked_for_before_the_wait_for_the_kernel_before(
        tmp_path, warps, rows, tiles, ahead, k, fuse_a, shared_lookups):
    # Programmatic launch lets a launch start while the kernel before it finishes; its weights are its
    # own, so their loads should be on their way by then. Before run 45, ptxas placed them after that
    # wait (griddepcontrol.wait, ACQBULK in SASS) and after the LoRA B rows' round trip in these layouts.
    cu, cubin = tmp_path / "kernel.cu", tmp_path / "k.cubin"
    cu.write_text(nf4_mma.source(NF4_CODE, warps, rows, 32, tiles, False, ahead, k, fuse_a,
                                 shared_lookups=shared_lookups))
    built = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(cubin), str(cu)], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, timeout=120,
                          check=True).stdout.splitlines()
    first_weights = next(i for i, line in enumerate(sass) if "LDG.E.NA.128" in line)
    wait = next(i for i, line in enumerate(sass) if "ACQBULK" in line)
    assert first_weights < wait


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize(("rows", "fuse_a"), [(16, True), (1, True), (8, False)])
def test_the_timeline_build_compiles_and_stamps_every_point(tmp_path, rows, fuse_a):
    # bench/mma_timeline.py's build (no GPU here to run it): it compiles for sm_90, takes the stamps'
    # buffer as one more argument, and stamps points 0-7; the served build has none of it
    text = nf4_mma.source(NF4_CODE, 4, rows, 32, 1, False, 1, 4096, fuse_a, timeline=True)
    assert "#define NF4_TIMELINE 1" in text and "NF4_TIMELINE 1" not in nf4_mma.source(NF4_CODE, 4, rows, 32, 1,
                                                                                           False, 1, 4096, fuse_a)
    stamped = {int(p) for p in re.findall(r"STAMP(?:_AFTER)?\((\d+)", text.split("nf4_mma_kernel(")[-1])}
    assert stamped == set(range(nf4_mma.TIMELINE_POINTS))
    cu = tmp_path / "kernel.cu"
    cu.write_text(text)
    built = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(cu)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("timeline", [False, True])
def test_the_shared_code_pairs_are_declared_as_wide_as_they_are_stored(tmp_path, timeline):
    # fill_code_pairs stores 16 bytes at a time; with only float2's 8 declared, the timeline build's one
    # more shared variable moved the table off 16 and gate/up's launch failed with a misaligned address
    cu, ptx = tmp_path / "kernel.cu", tmp_path / "kernel.ptx"
    cu.write_text(nf4_mma.source(NF4_CODE, 4, 16, 32, 2, False, 1, 4096, True, shared_lookups=2, timeline=timeline))
    built = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-o", str(ptx), str(cu)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    text = ptx.read_text()
    assert "st.shared.v4.f32" in text
    assert re.search(r"\.shared \.align (16|32|64|128) \.b8 code_pairs\[", text), [
        line for line in text.splitlines() if "code_pairs[" in line]


def test_k_splits_are_checked_named_and_varied():
    from llm.serving.nf4_kernels import NF4Config, k_split_variants

    assert "#define KSPLIT 7" in nf4_mma.source(NF4_CODE, 8, 1, 32, 1, fuse_a=True, k=14336, k_splits=7)
    with pytest.raises(ValueError):  # 16 groups of 256 inputs do not split in 7
        nf4_mma.source(NF4_CODE, 8, 1, 32, 1, fuse_a=True, k=4096, k_splits=7)
    served = NF4Config(16, 256, 16, 1, kind="mma", fuse_a=True)
    assert served.label == "mma_16x256w16s1f"
    # o (16 groups): every warp of every split has a group of its own
    assert [v.label for v in k_split_variants(served, 4096, 4096, [], 1, 32)] == [
        "mma_16x256w4s1fk2", "mma_16x256w8s1fk2", "mma_16x256w4s1fk4"]
    assert "mma_16x256w8s1fk7" in [v.label for v in k_split_variants(served, 4096, 14336, [], 1, 32)]
    assert k_split_variants(NF4Config(16, 64, 4, 1, kind="gather_dot"), 4096, 4096, [], 1, 32) == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas) to count shared memory")
def test_the_counted_shared_memory_is_ptxass_for_a_k_split_kernel(tmp_path):
    # The fit check (`fits`, the tuner's filter) must count all of it: here with the code pairs
    # and the K split's last-block flag, 4 warps x 2 tiles x 8 rows
    cu = tmp_path / "kernel.cu"
    cu.write_text(nf4_mma.source(NF4_CODE, 4, 8, 32, 2, k=4096, shared_lookups=2, k_splits=4))
    built = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), "-Xptxas", "-v",
                            str(cu)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    smem = int(re.search(r"(\d+) bytes smem", built.stderr).group(1))
    assert smem == nf4_mma.static_shared_bytes(4, 8, 32, 2, 2), built.stderr


def _projection_on_cpu(n: int, k: int, boundaries: list[int]):  # noqa: ANN202
    from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection

    starts = [0, *boundaries]
    segments = tuple((start, end, 32 * i) for i, (start, end) in enumerate(zip(starts, [*boundaries, n], strict=True)))
    weight = NF4Matrix(packed=torch.zeros((n, k // 2), dtype=torch.uint8), absmax=torch.ones((n, k // 64)),
                       code=torch.tensor(NF4_CODE))
    lora = LoraParts(a=torch.zeros((32 * len(segments), k)), b=torch.zeros((n, 32)), segments=segments, rank=32,
                     scaling=0.25)
    return NF4Projection(weight, lora)


@pytest.fixture
def fake_nvrtc(monkeypatch):  # noqa: ANN201
    """NVRTC, the driver and the launch cannot run here: stand-ins that record what they were asked.
    The ahead-of-time compile takes a while and records its thread."""
    import contextlib
    import threading
    import time

    from llm.serving import nf4_kernels, programmatic_launch

    calls: dict[str, list] = {"ahead": [], "at_launch": [], "launched": []}

    def compile_ahead(source_text: str, name: str, compute_capability: str) -> tuple[bytes, str]:
        time.sleep(0.02)
        calls["ahead"].append((threading.current_thread().name, source_text, compute_capability))
        return source_text.encode(), name

    def compile_at_launch(source_text: str, name: str) -> object:
        calls["at_launch"].append(source_text)
        return object()

    monkeypatch.setattr(nf4_mma, "_DISABLED", None)
    monkeypatch.setattr(nf4_mma, "_KERNELS", {})
    monkeypatch.setattr(nf4_mma, "_nvrtc_steps", lambda: (compile_ahead, lambda binary, names: {names[0]: object()}))
    monkeypatch.setattr(torch.cuda, "_compile_kernel", compile_at_launch, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(nf4_kernels, "_mma_available", lambda: True)
    monkeypatch.setattr(programmatic_launch, "launch", lambda kernel, *args: calls["launched"].append(kernel))
    monkeypatch.setattr(nf4_kernels, "mma_inputs", lambda x, n, lora: (
        torch.zeros(16 * x.shape[1], dtype=torch.bfloat16), torch.zeros(1, x.shape[0], lora.a.shape[0])))
    return calls


@pytest.mark.parametrize(("n", "k", "boundaries"), [(6144, 4096, [4096, 5120]), (4096, 14336, [])])
def test_the_tuner_compiles_every_kernel_ahead_on_several_threads_and_launches_reuse_them(fake_nvrtc, n, k,
                                                                                          boundaries):
    from llm.serving import nf4_kernels

    projection = _projection_on_cpu(n, k, boundaries)
    buckets = [1, 2, 4, 8, 16]

    compiled = nf4_kernels.precompile_candidates({"p": [projection]}, buckets, threads=4)

    ahead = fake_nvrtc["ahead"]
    assert compiled == len(ahead) > 4
    assert len({source for _, source, _ in ahead}) == compiled  # each kernel once
    assert {capability for _, _, capability in ahead} == {"90"}
    assert len({thread for thread, _, _ in ahead}) > 1 and all(t.startswith("nf4-nvrtc") for t, _, _ in ahead)
    for rows in buckets:
        x = torch.zeros((rows, k), dtype=torch.bfloat16)
        for config in nf4_kernels._candidates(rows, n, k, boundaries):
            if config.kind == "mma" and config.fits_kernel(rows, 32):
                nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
    assert fake_nvrtc["launched"] and set(map(id, fake_nvrtc["launched"])) <= set(map(id, nf4_mma._KERNELS.values()))
    assert fake_nvrtc["at_launch"] == []  # no launch compiled anything again


def test_a_kernel_that_fails_ahead_is_compiled_at_its_launch_and_the_kernel_stays_on(fake_nvrtc, monkeypatch, caplog):
    # On the H200 a first version's threads could not load their modules, and that turned the
    # tensor-core kernel off for the whole process: Triton served instead.
    from llm.serving import nf4_kernels

    def refuse(source_text: str, name: str, compute_capability: str) -> tuple[bytes, str]:
        raise RuntimeError("CUDA error: invalid device context\nmore")

    monkeypatch.setattr(nf4_mma, "_nvrtc_steps", lambda: (refuse, None))
    projection = _projection_on_cpu(4096, 4096, [])
    with caplog.at_level("INFO", logger="llm.serving.nf4_mma"):
        assert nf4_kernels.precompile_candidates({"o": [projection]}, [1, 16], threads=4) == 0
    assert nf4_mma.disabled_reason() is None  # still on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "compiles at its first launch instead" in lines[0] and "invalid device context" in lines[0]
    config = next(c for c in nf4_kernels._candidates(16, 4096, 4096, []) if c.kind == "mma")
    nf4_kernels.nf4_lora_linear(torch.zeros((16, 4096), dtype=torch.bfloat16), projection.weight, projection.lora,
                                True, config)
    assert len(fake_nvrtc["at_launch"]) == 1 and len(fake_nvrtc["launched"]) == 1
