"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, with the installed
Triton's own compiler and ptxas: a kernel that cannot compile (an unsupported op, a shape or layout
Triton rejects) shows here before a device call is spent on it. The pointers and the integers that are
multiples of 16 in the 7B shape carry Triton's divisibility hint, as its launcher adds at run time, so the
PTX's global loads are as wide as on the GPU (a hint-less compile loads bf16 tiles 2 bytes at a time).
Prints JSON, one line per kernel with its machine instructions and its global load, store and async copy
instructions counted, and exits 1 if any failed.

    python bench/triton_compile_check.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llm.serving import nf4_kernels, triton_kernels, triton_sampling  # noqa: E402
from llm.serving.nf4 import NF4_CODE  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# Integer arguments that are multiples of 16 when the 7B is served (pool strides, head dims, the vocabulary);
# the block table's row stride depends on the longest sequence, so it gets no hint.
_MULTIPLES_OF_16 = {"stride_pb", "stride_ph", "stride_pt", "row_stride", "vocab", "N", "K", "stride_x", "stride_out",
                    "k_per_split"}

_ATTENTION = {"k_pool_ptr": "*bf16", "v_pool_ptr": "*bf16", "table_ptr": "*i32", "pos_ptr": "*i64",
              "acc_ptr": "*fp32", "ml_ptr": "*fp32", "scale": "fp32", "stride_tab": "i32", "stride_pb": "i32",
              "stride_ph": "i32", "stride_pt": "i32"}
_ATTENTION_SHAPE = {"NUM_KV": 8, "GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 32,
                    "PAGES_PER_SPLIT": 2, "SPLITS": 32, "GDC": True}

_PROMPT_BASE = {"x_ptr": "*bf16", "words_ptr": "*i32", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "M": "i32",
                "N": "i32", "K": "i32", "stride_x": "i32", "stride_out": "i32", "k_per_split": "i32"}
# (kernel, argument types, constexpr values, launch options): the served 7B shapes
KERNELS = [
    (triton_sampling._chunk_candidates_kernel,
     {"logits_ptr": "*fp32", "keys_ptr": "*i64", "row_stride": "i32", "vocab": "i32"},
     {"CHUNK": triton_sampling.CHUNK, "CANDIDATES": triton_sampling.CANDIDATES, "TOPK": triton_sampling.HAS_TOPK},
     {"num_warps": triton_sampling.CHUNK_WARPS}),
    (triton_sampling._draw_kernel,
     {"keys_ptr": "*i64", "temperature_ptr": "*fp32", "top_p_ptr": "*fp32", "top_k_ptr": "*fp32", "greedy_ptr": "*i1",
      "u_ptr": "*fp32", "out_ptr": "*i64", "vocab": "i32"},
     {"TOTAL": triton_sampling._chunks(32000) * triton_sampling.CANDIDATES, "CANDIDATES": triton_sampling.CANDIDATES,
      "TOPK": triton_sampling.HAS_TOPK}, {"num_warps": triton_sampling.DRAW_WARPS}),
    (triton_kernels._paged_attn_kernel, {"q_ptr": "*bf16", **_ATTENTION}, _ATTENTION_SHAPE,
     {"num_warps": 4, "num_stages": 2}),
    # the fused prompt base (not served yet): a 32-row prompt, its bf16 product and split partials, with 4
    # warps (32-value slices), 8 (16-value slices) and 16 (8-value slices)
    *((nf4_kernels._nf4_prompt_base_kernel, _PROMPT_BASE | {"out_ptr": "*fp32" if split else "*bf16"},
       {"BLOCK_M": 32, "BLOCK_N": nf4_kernels.PROMPT_BASE_N, "BLOCK_K": nf4_kernels.PROMPT_BASE_K,
        "SLICE": 8 * words, "SPLIT_OUT": split, "ASM": nf4_kernels.lut_asm(NF4_CODE, words),
        "CONSTRAINTS": nf4_kernels.lut_constraints(words), "INTERPRETED": False}, {"num_warps": warps, "num_stages": 3})
      for warps in nf4_kernels.PROMPT_BASE_WARPS for words in (16 // warps,) for split in (False, True)),
]


def sass_instructions(cubin: bytes) -> int | None:
    """The kernel's machine instructions (`nvdisasm`, shipped with Triton); for straight-line code such as
    the sorts, what each thread issues. None where nvdisasm is missing."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(nvdisasm), "-c", file.name], capture_output=True, text=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s", listing, flags=re.MULTILINE))


def main() -> int:
    failed = 0
    for kernel, arguments, constants, options in KERNELS:
        name = kernel.fn.__name__
        signature = {name: arguments.get(name, "constexpr") for name in kernel.arg_names}
        hinted = {(index,): [["tt.divisibility", 16]] for index, argument in enumerate(kernel.arg_names)
                  if signature[argument].startswith("*") or argument in _MULTIPLES_OF_16}
        started = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=hinted),
                                      target=TARGET, options=options)
            accesses = Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*|cp\.async\.\w+\.shared\.global[\w.]*)",
                                          compiled.asm["ptx"]))
            report = {"kernel": name, "ok": True, "num_warps": options["num_warps"], "shared_bytes": compiled.metadata.shared,
                      "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
                      "sass_instructions": sass_instructions(compiled.asm["cubin"]),
                      "global_accesses": dict(sorted(accesses.items()))}
        except Exception as error:  # noqa: BLE001 - reported, the exit status says it
            failed += 1
            report = {"kernel": name, "ok": False, "error": str(error).splitlines()[0][:300]}
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
