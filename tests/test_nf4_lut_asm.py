"""The PTX that `nf4`'s LUT kernels decode weights with, run by a small interpreter of the eight
instructions it uses (CPU CI has no GPU): it must give bitsandbytes' dequantized values bit for bit,
for every nibble and absmax. tests/gpu/test_nf4_kernels.py runs the same program on the H200."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llm.serving.nf4 import NF4_CODE as NF4
from llm.serving.nf4_kernels import LUT_CONSTRAINTS, LUT_WORDS, lut_asm, lut_constraints


def _bits(value: np.float32) -> int:
    return struct.unpack("<I", struct.pack("<f", float(value)))[0]


def _float(bits: int) -> np.float32:
    return np.float32(struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0])


def _bf16_rne(value: np.float32) -> int:
    bits = _bits(value)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFFFFFF) >> 16


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte k of the result is byte (nibble k & 7) of {b, a}; bit 3 of
    the nibble replicates that byte's sign instead."""
    pool = a | (b << 32)
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 0xF
        byte = (pool >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def run_ptx(program: str, inputs: dict[str, int]) -> dict[str, int]:
    registers = dict(inputs)

    def value(token: str) -> int:
        if token.startswith("0f"):
            return int(token[2:], 16)
        if token.startswith("0x"):
            return int(token, 16)
        if token.isdigit():
            return int(token)
        return registers[token]

    for line in program.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *sources = [part.strip() for part in rest.split(",")]
        args = [value(s) for s in sources]
        if op == "mov.b32":
            result = args[0]
        elif op == "mul.rn.f32":
            result = _bits(_float(args[0]) * _float(args[1]))
        elif op == "cvt.rn.bf16x2.f32":  # first source to the high half
            result = (_bf16_rne(_float(args[0])) << 16) | _bf16_rne(_float(args[1]))
        elif op == "prmt.b32":
            result = _prmt(*args)
        elif op == "and.b32":
            result = args[0] & args[1]
        elif op == "or.b32":
            result = args[0] | args[1]
        elif op == "shr.b32":
            result = args[0] >> args[1]
        elif op == "shl.b32":
            result = args[0] << args[1]
        else:
            raise AssertionError(f"the interpreter does not know {op}")
        registers[dest] = result & 0xFFFFFFFF
    return registers


def bitsandbytes_values(packed: np.ndarray, absmax: np.float32) -> list[int]:
    """dequantize_4bit's arithmetic: value 2j in the high nibble of byte j; float32 code x absmax,
    rounded once to bf16 (here as float32 bit patterns, as the kernel hands them to its FMAs)."""
    nibbles = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
    return [_bf16_rne(np.float32(NF4[n]) * absmax) << 16 for n in nibbles]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count, constraints", [(LUT_WORDS, LUT_CONSTRAINTS), (2, lut_constraints(2)),
                                               (1, lut_constraints(1))])
def test_decoded_values_are_bitsandbytes_bit_for_bit(seed, count, constraints):
    """The decode kernels' 32-value slices, and the fused prompt base's 16- and 8-value ones (8, 16 warps)."""
    rng = np.random.default_rng(seed)
    program = lut_asm(NF4, count)
    outputs, inputs = 8 * count, count + 1
    assert constraints.count("=r") == outputs and constraints.count(",") + 1 == outputs + inputs
    for _ in range(50):
        # Every nibble value appears; the absmax spans tiny (subnormal products) to large blocks.
        packed = rng.integers(0, 256, 4 * count, dtype=np.uint8)
        absmax = np.float32(10.0 ** rng.uniform(-40, 2))
        words = packed.view("<u4")
        registers = run_ptx(program, {f"${outputs + j}": int(w) for j, w in enumerate(words)}
                            | {f"${outputs + count}": _bits(absmax)})
        ours = [registers[f"${v}"] for v in range(outputs)]
        assert ours == bitsandbytes_values(packed, absmax)


def test_every_code_entry_is_reachable():
    # One word per entry pair: entries 0..15 in both nibble positions.
    program = lut_asm(NF4)
    packed = np.array([(e << 4) | (15 - e) for e in range(16)], dtype=np.uint8)
    absmax = np.float32(0.0371)
    words = {f"${32 + j}": int(w) for j, w in enumerate(packed.view("<u4"))}
    registers = run_ptx(program, words | {"$36": _bits(absmax)})
    assert [registers[f"${v}"] for v in range(32)] == bitsandbytes_values(packed, absmax)
