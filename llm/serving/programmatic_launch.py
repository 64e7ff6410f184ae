"""Programmatic dependent launch (Hopper and newer) for the decode step's kernels.

A decode step is ~200 kernels in a row, each waiting for the one before it to finish and its
results to be flushed before it may start. With this attribute a kernel is scheduled while the one
before it finishes: it runs what does not depend on it (the `nf4` kernel's first weight loads, its
shared tables) and then waits for it in the kernel (`griddepcontrol.wait`). Every kernel launched
this way must wait so before it reads what an earlier kernel wrote and before it exits, which keeps
the order of results that of the stream. CUDA graphs keep the edges as "programmatic" ones.

One process-wide switch (on by default where the GPU has it): the bench measures the decode step
with and without it in one process (`serial_launches`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)

_enabled = True
_broken: str | None = None  # why cuLaunchKernelEx failed here once, if it did


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
        ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attributes", ctypes.POINTER(_LaunchAttribute)), ("attribute_count", ctypes.c_uint),
    ]


def supported(device: torch.device | str) -> bool:
    """The GPU can start a kernel before the one before it has finished (compute capability 9.0+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (9, 0)


def enabled(device: torch.device | str) -> bool:
    return _enabled and _broken is None and supported(device)


@contextmanager
def serial_launches() -> Iterator[None]:
    """Kernels launched (or graphs captured) inside wait for the kernel before them to finish, as
    without this module: the bench's same-process baseline."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _kernel_arguments(args: Sequence[Any]) -> tuple[ctypes.Array, list]:
    """The kernel's parameters as cuLaunchKernel takes them (as `torch.cuda._compile_kernel`'s
    launcher converts them: tensors as pointers, ints as int, floats as double)."""
    values: list = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, bool | int):
            values.append(ctypes.c_int(int(arg)))
        elif isinstance(arg, float):
            values.append(ctypes.c_double(arg))
        else:
            raise TypeError(f"unsupported kernel argument type: {type(arg).__name__}")
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    return pointers, values


@functools.cache
def _driver() -> ctypes.CDLL:
    """The CUDA driver library, as PyTorch's own NVRTC kernel launcher loads it (once: PyTorch's
    loader opens it anew on every call)."""
    loader = getattr(torch.cuda._utils, "_get_gpu_runtime_library", None)
    return loader() if loader is not None else ctypes.CDLL("libcuda.so.1")


_CU_FUNC_ATTRIBUTE_NUM_REGS = 4  # CUfunction_attribute (cuda.h)


def occupancy(kernel: Any, threads: int, shared_bytes: int = 0) -> tuple[int, int]:
    """(registers per thread, blocks per SM) of a kernel compiled by `torch.cuda._compile_kernel`, at
    `threads` per block and `shared_bytes` of dynamic shared memory: how many of a launch's blocks the
    card holds at once (bench/mma_timeline.py)."""
    registers, blocks = ctypes.c_int(0), ctypes.c_int(0)
    driver = _driver()
    for result in (driver.cuFuncGetAttribute(ctypes.byref(registers), _CU_FUNC_ATTRIBUTE_NUM_REGS, kernel.func),
                   driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), kernel.func, threads,
                                                                      ctypes.c_size_t(shared_bytes))):
        if result != 0:
            raise RuntimeError(f"the CUDA driver could not say a kernel's occupancy (error {result})")
    return registers.value, blocks.value


def _plain_launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[Any],
                  shared_bytes: int) -> None:
    extra = {"shared_mem": shared_bytes} if shared_bytes else {}
    kernel(grid=grid, block=block, args=list(args), **extra)


def launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[Any],
           device: torch.device, shared_bytes: int = 0) -> None:
    """Launch a kernel compiled by `torch.cuda._compile_kernel` on the current stream, with the
    programmatic attribute where `enabled`. The kernel must call `griddepcontrol.wait` before it
    reads an earlier kernel's results. If the driver refuses the attribute, one WARNING line and
    plain launches from then on. `shared_bytes`: dynamic shared memory per block (past 48 KB, the
    kernel's `set_shared_memory_config` first)."""
    global _broken
    if not enabled(device) or not hasattr(kernel, "func"):
        _plain_launch(kernel, grid, block, args, shared_bytes)
        return
    pointers, keep_alive = _kernel_arguments(args)
    attribute = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
    ctypes.memmove(ctypes.addressof(attribute) + _LaunchAttribute.value.offset, ctypes.byref(ctypes.c_int(1)), 4)
    config = _LaunchConfig(*grid, *block, shared_bytes, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
                           ctypes.pointer(attribute), 1)
    result = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    del keep_alive
    if result != 0:
        _broken = f"cuLaunchKernelEx returned CUDA error {result}"
        logger.warning("decode kernels: programmatic dependent launch refused here (%s); plain launches serve",
                       _broken)
        _plain_launch(kernel, grid, block, args, shared_bytes)
