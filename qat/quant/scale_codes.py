"""Scales stored as k-bit codes: a small floating-point format shared by one tensor's groups.

A per-channel tensor has one scale per output unit; as float32 they cost 32 bits each, more than the
codes of a 40-input column at 4 bits cost together. Here the scales of one tensor become k-bit
mini-floats with a per-tensor top exponent T (every scale < 2^T) and a per-tensor split of the k
bits into e exponent bits and M = k - e mantissa bits:

    code = (x << M) | m,   scale = (2^M + m) * 2^(T - 1 - x - M),   x in [0, 2^e), m in [0, 2^M)

e is the fewest bits that span the tensor's scales (their octaves from the largest to the smallest),
so M, and the precision, is as large as the spread allows: a scale is rounded to the nearest value of
the format (relative error <= 2^-(M+1)); a scale below the format's range is raised to its smallest
value (a slightly coarser grid, never a clipped one). The quantizer snaps its scale onto this format
when it is frozen and recomputes the zero point from it, so the model evaluated, the packed file
and every integer kernel built from it compute with the same scales, bit for bit (the same idea as
QLoRA's quantized quantization constants, here exactly invertible: decoding is a power-of-two
scaling of an integer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qat.checks import Integer, Nullable

SCALE_BITS_MIN, SCALE_BITS_MAX = 4, 16
SCALE_BITS = Nullable(Integer(SCALE_BITS_MIN, SCALE_BITS_MAX),
                      expected=f"null (float32 scales) or an integer {SCALE_BITS_MIN}..{SCALE_BITS_MAX}")


@dataclass(frozen=True)
class ScaleCodes:
    """One tensor's scales as codes: `codes` (k bits each, the tensor's group shape), the top exponent
    and the exponent bits; `decode()` gives the float32 scales back exactly."""

    codes: np.ndarray
    bits: int
    top: int
    exp_bits: int

    @property
    def mant_bits(self) -> int:
        return self.bits - self.exp_bits

    def decode(self) -> np.ndarray:
        return decode_scales(self.codes, self.bits, self.top, self.exp_bits)


def _octave(s: np.ndarray) -> np.ndarray:
    """floor(log2 s) for positive float32 s, exactly."""
    return np.frexp(s)[1].astype(np.int64) - 1


def encode_scales(scale, bits: int) -> ScaleCodes:
    """The nearest `bits`-bit codes (see the module doc) of positive finite scales."""
    s = np.asarray(scale, np.float32)
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("scales must be positive and finite to be encoded")
    octave = _octave(s)
    top = int(octave.max()) + 1
    spread = top - int(octave.min())                               # octaves the scales span (>= 1)
    exp_bits = min(int(spread - 1).bit_length(), bits - 1)         # 2^e >= spread, M >= 1
    mant = bits - exp_bits
    x = top - 1 - octave
    low = x > 2 ** exp_bits - 1                                    # below the format: its smallest value
    x = np.minimum(x, 2 ** exp_bits - 1)
    full = np.rint(np.ldexp(s.astype(np.float64), (mant - (top - 1 - x)).astype(np.int64))).astype(np.int64)
    full = np.where(low, 2 ** mant, full)
    carry = full == 2 ** (mant + 1)                                # rounded up into the next octave
    at_top = carry & (x == 0)
    x = np.where(carry & ~at_top, x - 1, x)
    full = np.where(at_top, 2 ** (mant + 1) - 1, np.where(carry, 2 ** mant, full))
    codes = (x << mant) | (full - 2 ** mant)
    return ScaleCodes(codes.astype(np.uint32).reshape(s.shape), bits, top, exp_bits)


def decode_scales(codes, bits: int, top: int, exp_bits: int) -> np.ndarray:
    """float32 scales of `codes` (exact: an integer times a power of two)."""
    codes = np.asarray(codes, np.int64)
    mant = bits - exp_bits
    x, m = codes >> mant, codes & (2 ** mant - 1)
    return np.ldexp((2 ** mant + m).astype(np.float64), top - 1 - x - mant).astype(np.float32)


def snap_scales(scale, bits) -> np.ndarray:
    """The scales as the `bits`-bit format holds them (float32 unchanged where bits is None)."""
    s = np.asarray(scale, np.float32)
    return s if bits is None else encode_scales(s, bits).decode()
