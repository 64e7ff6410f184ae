"""llm/serving/programmatic_launch.py on the CPU: the switch and the launch arguments (the launches
themselves run in tests/gpu/test_programmatic_launch.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from llm.serving import programmatic_launch


def test_off_where_the_gpu_cannot_do_it():
    assert not programmatic_launch.enabled("cpu")


def test_serial_launches_turns_it_off_inside_and_back_on_after():
    assert programmatic_launch._enabled
    with programmatic_launch.serial_launches():
        assert not programmatic_launch._enabled
    assert programmatic_launch._enabled
    with pytest.raises(RuntimeError), programmatic_launch.serial_launches():
        raise RuntimeError("a failed capture")
    assert programmatic_launch._enabled


def test_arguments_are_passed_as_the_kernel_declares_them():
    tensor = torch.zeros(4)
    pointers, values = programmatic_launch._kernel_arguments([tensor, 7, 0.25, True])
    assert len(pointers) == 4
    assert ctypes.c_void_p.from_address(pointers[0]).value == tensor.data_ptr()
    assert ctypes.c_int.from_address(pointers[1]).value == 7  # int parameters are 32-bit
    assert ctypes.c_double.from_address(pointers[2]).value == 0.25  # `double scaling`
    assert ctypes.c_int.from_address(pointers[3]).value == 1
    with pytest.raises(TypeError):
        programmatic_launch._kernel_arguments(["a string"])


def test_the_launch_structures_have_cudas_layout():
    assert ctypes.sizeof(programmatic_launch._LaunchAttribute) == 72
    assert programmatic_launch._LaunchAttribute.value.offset == 8
    assert programmatic_launch._LaunchConfig.stream.offset == 32
    assert programmatic_launch._LaunchConfig.attributes.offset == 40
    assert ctypes.sizeof(programmatic_launch._LaunchConfig) == 56


def test_a_refused_attribute_falls_back_to_plain_launches_with_one_warning(monkeypatch, caplog):
    # A driver that refuses cuLaunchKernelEx's attribute: the kernel still runs (plainly), the
    # operator reads one WARNING line, and later launches do not try again.
    class Kernel:
        func = ctypes.c_void_p(1)
        launches: list = []

        def __call__(self, grid, block, args):  # noqa: ANN001
            self.launches.append((grid, block, args))

    class Driver:
        calls = 0

        def cuLaunchKernelEx(self, *_):  # noqa: N802, ANN002 - the CUDA driver's name
            Driver.calls += 1
            return 1  # CUDA_ERROR_INVALID_VALUE

    class Stream:
        cuda_stream = 0

    monkeypatch.setattr(programmatic_launch, "supported", lambda device: True)
    monkeypatch.setattr(programmatic_launch, "_driver", Driver)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(programmatic_launch, "_broken", None)
    kernel = Kernel()
    with caplog.at_level("WARNING"):
        for _ in range(3):
            programmatic_launch.launch(kernel, (2, 1, 1), (128, 1, 1), [torch.zeros(1), 3], torch.device("cuda"))
    assert len(kernel.launches) == 3 and kernel.launches[0][0] == (2, 1, 1)
    assert Driver.calls == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "plain launches" in warnings[0].getMessage()
    assert not programmatic_launch.enabled("cuda")


def test_occupancy_asks_the_driver_for_registers_and_blocks_and_says_when_it_cannot(monkeypatch):
    # The driver cannot run here: a stand-in that answers as cuda.h declares the two calls (an int
    # written through the first pointer), then one that fails the second
    class Kernel:
        func = ctypes.c_void_p(1)

    class Driver:
        asked: list = []
        occupancy_result = 0

        def cuFuncGetAttribute(self, value, attribute, func):  # noqa: N802, ANN001 - the CUDA driver's name
            Driver.asked.append(("attribute", attribute))
            ctypes.cast(value, ctypes.POINTER(ctypes.c_int)).contents.value = 134
            return 0

        def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, blocks, func, threads, shared):  # noqa: N802, ANN001
            Driver.asked.append(("occupancy", threads, shared.value))
            ctypes.cast(blocks, ctypes.POINTER(ctypes.c_int)).contents.value = 3
            return Driver.occupancy_result

    monkeypatch.setattr(programmatic_launch, "_driver", Driver)
    assert programmatic_launch.occupancy(Kernel(), 128, 4096) == (134, 3)
    assert Driver.asked == [("attribute", 4), ("occupancy", 128, 4096)]  # 4: CU_FUNC_ATTRIBUTE_NUM_REGS
    Driver.occupancy_result = 1
    with pytest.raises(RuntimeError, match="occupancy"):
        programmatic_launch.occupancy(Kernel(), 128)
