"""The `nf4` MMA decode kernel's main loop in SASS, offline (no GPU): instructions per MMA by opcode.

Compiles `llm.serving.nf4_mma.source` for sm_90 with nvcc, disassembles it with cuobjdump (the
`nvidia-cuda-cuobjdump` wheel has it: `pip download --no-deps nvidia-cuda-cuobjdump`, unzip, pass
its `bin/cuobjdump` with --cuobjdump), and counts the opcodes of the loop that holds the HMMAs, per 16 x 16 weight tile (one warp's
decode unit: one MMA per 8 rows of x).
The ALU pipe (PRMT, SHF, LOP3, LEA, the integer adds, at half the FP32 rate) was the kernel's busiest
(Nsight, run 17: 66 % at one row), but run 23's shared code pairs took it from 21.5 to 13.3
instructions per tile and the kernel only 3-4 % faster: all instructions per tile count (the issue
rate: 0.46 per cycle and scheduler with 2.6 warps each, run 22's Nsight).

    python3 bench/nf4_mma_sass.py --cuobjdump /tmp/cuobj/nvidia/cu13/bin/cuobjdump 4 8 2 1 1
    (warps, rows, tiles, prefetch_x, groups ahead: a configuration name like mma_32x256w4s1p;
    --fuse-a for the "f" ones, rows 1 for their one-row kernel; --shared-lookups N for "tN")
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.serving import nf4_mma  # noqa: E402

ALU_PIPE = {"PRMT", "SHF", "LOP3", "LEA", "IADD3", "VIADD", "ISETP", "SEL", "MOV", "F2FP"}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)[.\w]*\s*([^;]*);")


def loop_opcodes(sass: str) -> tuple[collections.Counter, int, str]:
    """Opcode counts of the loop around the HMMAs (the whole kernel where the compiler unrolled it
    completely: K is a constant), its HMMA count, and which of the two was counted."""
    lines = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(_LINE.search, sass.splitlines()) if m]
    hmma = [address for address, op, _ in lines if op == "HMMA"]
    if not hmma:
        raise SystemExit("no HMMA in the kernel")
    for address, op, operands in lines:
        target = re.match(r"\s*(0x[0-9a-f]+|`?\(?\.L_x_\d+\)?)", operands)
        if op == "BRA" and address > hmma[-1] and target and target.group(1).startswith("0x"):
            head = int(target.group(1), 16)
            if head <= hmma[0]:
                body = [op for a, op, _ in lines if head <= a <= address]
                return collections.Counter(body), sum(op == "HMMA" for op in body), "loop"
    return collections.Counter(op for _, op, _ in lines), len(hmma), "kernel (no loop)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("warps", type=int)
    parser.add_argument("rows", type=int)
    parser.add_argument("tiles", type=int)
    parser.add_argument("prefetch_x", type=int)
    parser.add_argument("ahead", type=int)
    parser.add_argument("--fuse-a", action="store_true", help="the fused-LoRA-A kernel ('f' configurations)")
    parser.add_argument("--cuobjdump", default="cuobjdump")
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--shared-lookups", type=int, default=0,
                        help="absmax blocks per lane and group decoded through the shared code pairs ('t1'..'t4')")
    args = parser.parse_args()
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu").tolist()
    try:
        text = nf4_mma.source(code, args.warps, args.rows, 32, args.tiles, bool(args.prefetch_x), args.ahead,
                              fuse_a=args.fuse_a, shared_lookups=args.shared_lookups)
    except ValueError as error:  # a layout the kernel does not have: one line, not a traceback
        parser.error(str(error))
    with tempfile.TemporaryDirectory() as folder:
        cu, cubin = Path(folder) / "k.cu", Path(folder) / "k.cubin"
        cu.write_text(text)
        try:
            subprocess.run([args.nvcc, "-cubin", "-arch=sm_90", "-O3", "-o", str(cubin), str(cu)], check=True)
            sass = subprocess.run([args.cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                                  text=True).stdout
        except FileNotFoundError as missing:
            raise SystemExit(f"{missing.filename} not found: pass --nvcc / --cuobjdump (see this file's docstring)") from None
        except subprocess.CalledProcessError as failed:
            raise SystemExit(f"{failed.cmd[0]} failed (exit {failed.returncode}): {(failed.stderr or '').strip()[:500]}") from None
    counts, mmas, scope = loop_opcodes(sass)
    tiles = mmas // max(1, args.rows // 8)  # 16 x 16 weight tiles decoded in the loop (one MMA per 8 rows each)
    print(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k not in ("cuobjdump", "nvcc")},
        "counted": scope,
        "hmma": mmas,
        "per_weight_tile_total": round(sum(counts.values()) / tiles, 2),
        "per_weight_tile_alu_pipe": round(sum(n for op, n in counts.items() if op in ALU_PIPE) / tiles, 2),
        "per_weight_tile": {op: round(n / tiles, 2) for op, n in counts.most_common()},
    }))


if __name__ == "__main__":
    main()
