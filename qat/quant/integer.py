"""The integer arithmetic of integer-only inference, written once in numpy and once in TensorFlow with
the same integer operations (the C kernel of qat.export.c_source spells them a third time):

- requantization of an int32 accumulator by a real factor r = m * 2^-n, m a 24-bit integer and n a
  shift, both read exactly from the float32 bits of r (`multiplier`): out = round(acc * m / 2^n),
  rounded half away from zero (as TFLite's RoundingDivideByPOT; portable C needs no right shift of a
  negative number). TFLite and CMSIS-NN use a 31-bit multiplier derived from a double; a float32
  factor has 24 significant bits, so this multiplier is that factor exactly.
- saturation to a signed range; shifts by powers of two with the same rounding (`shift_round`).
- sigmoid and tanh of an int16 pre-activation in Q3.12 (real = q / 2^12, range [-8, 8)) by tables of
  2^TABLE_BITS entries indexed by its top TABLE_BITS bits, each entry the function at the middle of
  its bin quantized to the gate grid: sigmoid on [0, 2^a - 1] / 2^a, tanh on
  [-(2^(a-1) - 1), 2^(a-1) - 1] / 2^(a-1) (a = act_bits). With 512 entries a bin is 1/32 wide:
  the table error (at most 1/256 for sigmoid, 1/64 for tanh) is at most one code at 8 bits.
- the power-of-two scale of the LSTM cell state (`cell_exponent`): 2^E with
  E = ceil(log2(c_max)) - (state_bits - 1), as TFLite's int16 cell state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import tensorflow as tf

from qat.checks import Checked, Integer, Nullable, setting
from qat.errors import ConfigError

GATE_FRAC = 12            # fractional bits of the int16 gate pre-activations (Q3.12)
TABLE_BITS = 9            # sigmoid / tanh tables of 2^9 entries
TABLE_SHIFT = 16 - TABLE_BITS
INT16 = (-(2 ** 15), 2 ** 15 - 1)
INT32 = (-(2 ** 31), 2 ** 31 - 1)
MAX_SHIFT = 62

ACT_BITS = Integer(2, 8)       # gates and hidden state: 8-bit tables and int8 storage at most
STATE_BITS = Integer(8, 16)    # the cell state: int16 at most


@dataclass(frozen=True)
class IntegerMode(Checked):
    """How a layer runs in integer mode: gate / hidden-state bits (`act_bits`), cell-state bits and the
    grid of its input: `input_bits=None` for the layer's own input quantizer, else the hidden-state
    grid 2^-(input_bits-1) of the integer recurrent layer that feeds it."""

    act_bits: int = setting(ACT_BITS)
    state_bits: int = setting(STATE_BITS, default=16)
    input_bits: Optional[int] = setting(Nullable(ACT_BITS), default=None)

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, config) -> Optional["IntegerMode"]:
        """From an IntegerMode, a dict of its fields (a saved layer config) or None (not integer)."""
        if config is None or isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"integer mode {config!r} is not allowed: expected an IntegerMode, a dict or None")
        return cls(**config)


def hidden_scale(bits: int) -> float:
    """The scale of hidden-state codes (and of tanh outputs): 2^-(bits-1)."""
    return 2.0 ** -(bits - 1)


def signed_range(bits: int):
    """[-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_range(bits: int):
    """[-(2^(b-1) - 1), 2^(b-1) - 1]: the grid of tanh outputs and hidden states."""
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


# --------------------------------------------------------------------------------------- numpy

def multiplier(r) -> tuple:
    """(m, n) int64 with r = m * 2^-n exactly for float32 r > 0 (m < 2^24); 0 -> (0, 1). n is kept in
    [1, MAX_SHIFT] (factors below 2^-39 give 0 either way)."""
    bits = np.asarray(r, np.float32).view(np.int32).astype(np.int64)
    exponent = (bits >> 23) & 0xFF
    m = np.where(exponent > 0, (bits & 0x7FFFFF) | 0x800000, 0)
    n = np.clip(150 - exponent, 1, MAX_SHIFT)
    return m.astype(np.int64), n.astype(np.int64)


def requantize(acc, m, n) -> np.ndarray:
    """round(acc * m / 2^n), half away from zero; acc saturated to int32 first."""
    acc = np.clip(np.asarray(acc, np.int64), *INT32)
    p = np.abs(acc) * m
    return np.sign(acc) * ((p + (np.int64(1) << (n - 1))) >> n)


def shift_round(v, n) -> np.ndarray:
    """v / 2^n rounded half away from zero for n > 0, v * 2^-n for n <= 0 (int64)."""
    v, n = np.asarray(v, np.int64), np.asarray(n, np.int64)
    right = np.maximum(n, 1)
    down = np.sign(v) * ((np.abs(v) + (np.int64(1) << (right - 1))) >> right)
    return np.where(n > 0, down, v << np.maximum(-n, 0))


def saturate(v, lo: int, hi: int) -> np.ndarray:
    return np.clip(v, lo, hi)


def table_centres() -> np.ndarray:
    """The real pre-activation at the middle of each table bin."""
    k = np.arange(2 ** TABLE_BITS, dtype=np.float64)
    return ((k + 0.5) * 2 ** TABLE_SHIFT + INT16[0]) / 2 ** GATE_FRAC


def sigmoid_table(act_bits: int) -> np.ndarray:
    """int32 codes of sigmoid at the bin centres, on [0, 2^a - 1] at scale 2^-a."""
    y = 1.0 / (1.0 + np.exp(-table_centres()))
    return np.clip(np.round(y * 2 ** act_bits), 0, 2 ** act_bits - 1).astype(np.int32)


def tanh_table(act_bits: int) -> np.ndarray:
    """int32 codes of tanh at the bin centres, on the symmetric grid at scale 2^-(a-1)."""
    return np.clip(np.round(np.tanh(table_centres()) * 2 ** (act_bits - 1)),
                   *symmetric_range(act_bits)).astype(np.int32)


def table_index(z) -> np.ndarray:
    """Table entry of an int16 pre-activation."""
    return (np.asarray(z, np.int64) - INT16[0]) >> TABLE_SHIFT


def cell_exponent(c_max, state_bits: int) -> int:
    """E of the cell-state scale 2^E: ceil(log2(c_max)) - (state_bits - 1) from the float32 bits of
    c_max (c_max <= 0 counts as 1)."""
    c = np.float32(c_max) if np.float32(c_max) > 0 else np.float32(1.0)
    bits = int(np.asarray(c, np.float32).view(np.int32))
    exponent, fraction = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    return int(exponent - 127 + (1 if fraction else 0) - (state_bits - 1))


def power_of_two(e) -> np.ndarray:
    """2^e as float32, exactly."""
    return np.ldexp(np.float32(1.0), np.asarray(e, np.int32)).astype(np.float32)


# ------------------------------------------------------------------------------------ TensorFlow

def multiplier_tf(r):
    """`multiplier` in-graph (from a float32 tensor): (m, n) int64."""
    bits = tf.cast(tf.bitcast(tf.convert_to_tensor(r, tf.float32), tf.int32), tf.int64)
    exponent = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF)
    m = tf.where(exponent > 0, tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(bits, 0x7FFFFF), 0x800000),
                 tf.zeros_like(bits))
    return m, tf.clip_by_value(150 - exponent, 1, MAX_SHIFT)


def requantize_tf(acc, m, n):
    """`requantize` in-graph: int64 in, int64 out."""
    acc = tf.clip_by_value(tf.cast(acc, tf.int64), *INT32)
    p = tf.abs(acc) * m
    one = tf.ones_like(p)
    return tf.sign(acc) * tf.bitwise.right_shift(p + tf.bitwise.left_shift(one, n - 1), n)


def shift_round_tf(v, n: int):
    """`shift_round` for a static shift n, int64."""
    v = tf.cast(v, tf.int64)
    if n <= 0:
        return v * (2 ** -n)
    return tf.sign(v) * tf.bitwise.right_shift(tf.abs(v) + 2 ** (n - 1), n)


def shift_round_dynamic_tf(v, n):
    """`shift_round` for a shift held in a scalar int64 tensor."""
    v = tf.cast(v, tf.int64)
    right = tf.maximum(n, 1)
    down = tf.sign(v) * tf.bitwise.right_shift(tf.abs(v) + tf.bitwise.left_shift(tf.constant(1, tf.int64), right - 1),
                                               right)
    up = tf.bitwise.left_shift(v, tf.maximum(-n, 0))
    return tf.where(n > 0, down, up)


def table_index_tf(z):
    return tf.cast(tf.bitwise.right_shift(tf.cast(z, tf.int64) - INT16[0], TABLE_SHIFT), tf.int32)


def cell_exponent_tf(c_max, state_bits: int):
    """`cell_exponent` in-graph from a float32 scalar tensor: int64 scalar."""
    c = tf.convert_to_tensor(c_max, tf.float32)
    c = tf.where(c > 0, c, 1.0)
    bits = tf.cast(tf.bitcast(c, tf.int32), tf.int64)
    exponent = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF)
    fraction = tf.bitwise.bitwise_and(bits, 0x7FFFFF)
    return exponent - 127 + tf.cast(fraction > 0, tf.int64) - (state_bits - 1)


def power_of_two_tf(e):
    """2^e as float32 from an int64 tensor (normal range), exactly, by its bits."""
    return tf.bitcast(tf.cast(tf.bitwise.left_shift(tf.cast(e, tf.int64) + 127, 23), tf.int32), tf.float32)
