"""Every one-row x-table kernel the `nf4` decode step launches, compiled for sm_90 offline (no GPU).

For Mistral-7B's shapes and the served variants (plain, silu x up, add+norm), in every layout the tuner
times (`nf4_xtab.SERVED_LAYOUTS`: 16x1, 8x1, 8x2): NVRTC (`compute_90` PTX) then `ptxas -arch=sm_90 -v`.
Prints one JSON line per kernel: registers, spill bytes, and whether every load of what an earlier kernel
wrote (`ld.global.cg`) comes after `griddepcontrol.wait` in the PTX (run 32's race was such a load moved
above it). Exits 1 on a failed compile, a spill or a load of x before the wait.

Needs NVRTC and ptxas from pip (no CUDA install):
    pip install --target /tmp/nv nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12
    python bench/xtab_compile_check.py --nvrtc /tmp/nv/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \
        --ptxas /tmp/nv/nvidia/cuda_nvcc/bin/ptxas
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.serving import nf4_xtab  # noqa: E402

# (name, K, row chunks on 132 SMs, preparation)
KERNELS = (
    ("qkv", 4096, 8, nf4_xtab.PLAIN),
    ("qkv_add_norm", 4096, 8, nf4_xtab.ADD_NORM),
    ("o", 4096, 8, nf4_xtab.PLAIN),
    ("gate_up_add_norm", 4096, 8, nf4_xtab.ADD_NORM),
    ("down_silu_mul", 14336, 2, nf4_xtab.SILU_MUL),
)



def ptx_of(nvrtc: ctypes.CDLL, source: str) -> tuple[str | None, str]:
    """(PTX, NVRTC's log): PTX None where the compile failed."""
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"xtab.cu", 0, None, None):
        return None, "nvrtcCreateProgram failed"
    # As `torch.cuda._compile_kernel` compiles it (no -default-device: run 36's generic lambda compiled
    # here with it and would have failed there, as host code)
    options = [b"--gpu-architecture=compute_90"]
    result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    if result:
        return None, log.value.decode(errors="replace")
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    return ptx.value.decode(), log.value.decode(errors="replace")


def loads_after_wait(ptx: str) -> bool:
    """Every `ld.global.cg` (x, the residual: what the kernel before wrote)
    comes after the first `griddepcontrol.wait`."""
    wait = ptx.find("griddepcontrol.wait")
    first_cg = ptx.find("ld.global.cg")
    return wait >= 0 and (first_cg < 0 or first_cg > wait)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", required=True, help="libnvrtc.so (from the nvidia-cuda-nvrtc wheel)")
    parser.add_argument("--ptxas", required=True, help="ptxas (from the nvidia-cuda-nvcc wheel)")
    args = parser.parse_args()
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu").tolist()
    try:
        nvrtc = ctypes.CDLL(args.nvrtc)
    except OSError as error:
        parser.error(f"--nvrtc {args.nvrtc}: cannot load it ({error})")
    if not Path(args.ptxas).is_file():
        parser.error(f"--ptxas {args.ptxas}: no such file")
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, k, chunks, prep in KERNELS:
            for layout in nf4_xtab.SERVED_LAYOUTS:
                label = f"{name}_{layout.label}"
                source = nf4_xtab.source(code, k, 32, chunks, prep, layout)
                ptx, log = ptx_of(nvrtc, source)
                result: dict = {"kernel": label}
                if ptx is None:
                    result["error"] = log[:2000]
                else:
                    path = Path(folder) / f"{label}.ptx"
                    path.write_text(ptx)
                    out = subprocess.run([args.ptxas, "-arch=sm_90", "-v", str(path), "-o", str(path) + ".cubin"],
                                         capture_output=True, text=True, check=False)
                    registers = re.search(r"Used (\d+) registers", out.stderr)
                    spills = [int(v) for v in re.findall(r"(\d+) bytes spill", out.stderr)]
                    result.update(registers=int(registers.group(1)) if registers else None,
                                  spill_bytes=sum(spills), loads_after_wait=loads_after_wait(ptx))
                    if out.returncode:
                        result["error"] = out.stderr[-2000:]
                failures += bool(result.get("error") or result.get("spill_bytes") or
                                 not result.get("loads_after_wait", True))
                print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
