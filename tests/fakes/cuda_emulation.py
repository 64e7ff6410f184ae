"""Building a decode kernel's CUDA text for the CPU (cuda_emulation.hpp beside this file): the NF4
code table the emulated tests quantize with, and the g++ build into a library to call through ctypes."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from llm.serving.nf4 import NF4_CODE  # noqa: F401 - the table the emulated tests quantize with

HEADER = Path(__file__).parent / "cuda_emulation.hpp"
# Registers a global buffer the kernel may read (every other read counts as out of bounds).
ADD_BUFFER = r"""
extern "C" void add_buffer(const void* begin, long bytes) {
    global_buffers.push_back({static_cast<const char*>(begin), static_cast<const char*>(begin) + bytes});
}
"""


def build_emulated(folder: Path, kernel_source: str, launcher: str) -> ctypes.CDLL:
    """`kernel_source` (a kernel module's `source(...)`) with the emulation header and `launcher`
    (extern "C" functions that run it), compiled with g++; `add_buffer` is already declared."""
    text = f'#define NF4_EMULATE\n#include "{HEADER}"\n' + kernel_source + ADD_BUFFER + launcher
    (folder / "kernel.cpp").write_text(text)
    built = subprocess.run(
        ["g++", "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-Wno-unknown-pragmas",
         "-o", str(folder / "kernel.so"), str(folder / "kernel.cpp")],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    library = ctypes.CDLL(str(folder / "kernel.so"))
    library.add_buffer.argtypes = [ctypes.c_void_p, ctypes.c_long]
    return library
