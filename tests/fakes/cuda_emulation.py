"""Building a decode kernel's CUDA text for the CPU (cuda_emulation.hpp beside this file): the NF4
code table the emulated tests quantize with, and the g++ build into a library to call through ctypes."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]
HEADER = Path(__file__).parent / "cuda_emulation.hpp"
# Registers a global buffer the kernel may read (every other read counts as out of bounds).
ADD_BUFFER = r"""
extern "C" void add_buffer(const void* begin, long bytes) {
    global_buffers.push_back({static_cast<const char*>(begin), static_cast<const char*>(begin) + bytes});
}
// The L2 prefetches since the last call, as (first byte, end) address pairs in `out` (room for `capacity`
// pairs); returns how many there were.
extern "C" long take_prefetches(unsigned long long* out, long capacity) {
    const std::lock_guard<std::mutex> hold(prefetches_lock);
    const long count = (long)prefetches.size();
    for (long i = 0; i < std::min(count, capacity); ++i) {
        out[2 * i] = reinterpret_cast<unsigned long long>(prefetches[i].begin);
        out[2 * i + 1] = reinterpret_cast<unsigned long long>(prefetches[i].end);
    }
    prefetches.clear();
    return count;
}
"""


def build_emulated(folder: Path, kernel_source: str, launcher: str) -> ctypes.CDLL:
    """`kernel_source` (a kernel module's `source(...)`) with the emulation header and `launcher`
    (extern "C" functions that run it), compiled with g++; `add_buffer` and `take_prefetches` are
    already declared (`taken_prefetches` reads the latter)."""
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
    library.take_prefetches.restype = ctypes.c_long
    library.take_prefetches.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_long]
    return library


def taken_prefetches(library: ctypes.CDLL, capacity: int = 1 << 16) -> list[tuple[int, int]]:
    """The L2 prefetches the emulated kernel asked for since the last call: (first byte, end) addresses."""
    pairs = (ctypes.c_ulonglong * (2 * capacity))()
    count = library.take_prefetches(pairs, capacity)
    assert count <= capacity, f"{count} prefetches, more than {capacity}"
    return [(pairs[2 * i], pairs[2 * i + 1]) for i in range(count)]
