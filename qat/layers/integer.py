"""The integer mode of QLSTM and QDense: the forward pass is what an integer-only kernel computes
(qat.quant.integer; the numpy reference qat.export.integer and the C kernel of qat.export.c_source
compute the same integers), and gradients flow through the float fake-quant computation beside it
(straight through: each output is `int_value + (float_value - stop_gradient(float_value))`, which is
the integer value exactly in the forward pass).

LSTM, per time step (a = act_bits, s = state_bits; codes are integers, scales in brackets):

    x codes   X = q_x - z_x [s_x] (the layer's input quantizer, per tensor) or h codes of the layer below
    weights   symmetric codes per unit or per tensor [s_w], bias as int32 at [s_x s_w]
    z_x       sat16(requant(X Wx + b, s_x s_wx 2^12))          int16 Q3.12, for all steps at once
    z         sat16(z_x + sat16(requant(H Wh, 2^-(a-1) s_wh 2^12)))
    i, f, o   sigmoid table [2^-a];  g tanh table [2^-(a-1)]   (qat.quant.integer: 512 entries)
    C         sat_s(round(f C / 2^a) + round(i g 2^(1-2a) / 2^E))        [2^E], E from the calibrated cell range
    H         round(o tanh_table(C in Q3.12) / 2^a), on [-(2^(a-1)-1), 2^(a-1)-1]   [2^-(a-1)]

GRU (Keras' reset_after=True; bias rows b for the input, b' for the recurrent part):

    z_x, z_h  sat16(requant(X W + b, ...)), sat16(requant(H R + b', ...)), each 3U wide, Q3.12
    z, r      sigmoid table of sat16(z_x + z_h) for the first 2U   [2^-a]
    n         tanh table of sat16(z_x,n + round(r z_h,n / 2^a))    [2^-(a-1)]
    H         N + round(Z (H - N) / 2^a), on [-(2^(a-1)-1), 2^(a-1)-1]   (= z h + (1 - z) n)

Dense: int32 accumulator X W + b, requantized per unit to one scale s_x max(s_w) (int32 logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from qat.errors import ConfigError
from qat.layers.loop import time_loop
from qat.quant import integer as iq
from qat.quant.integer import hidden_scale

def input_grid(layer, x_hat):
    """(codes X = q - z as int32, scale s_x float32 scalar) of a quantized layer's input in integer
    mode; `x_hat` is the input after the layer's input quantizer (on its grid)."""
    mode = layer.integer
    if mode.input_bits is not None:
        scale = tf.constant(hidden_scale(mode.input_bits), tf.float32)
    else:
        q = layer.activation_quantizers.get("input")
        if q is None:
            raise ConfigError(f"layer '{layer.name}' in integer mode needs an input quantizer or input_bits")
        _, scale, _ = q.params()
        scale = tf.reshape(scale, [])
    return tf.cast(tf.round(x_hat / scale), tf.int32), scale


def weight_codes(layer, name: str, w_hat):
    """(int32 codes, scale with the weight's group shape) of a symmetric fake-quantized weight."""
    q = layer.weight_quantizers.get(name)
    if q is None or q.spec.scheme != "symmetric":
        raise ConfigError(f"layer '{layer.name}' in integer mode needs a symmetric quantizer on its {name}")
    scale, _ = q.scale_zero_point(getattr(layer, name))
    return tf.cast(tf.round(w_hat / scale), tf.int32), scale


def integer_bias(bias, acc_scale):
    """The bias as int32 codes at the accumulator's scale (zeros without a bias)."""
    if bias is None:
        return tf.zeros(tf.shape(acc_scale)[-1:], tf.int64)
    q = tf.round(tf.reshape(bias, [-1]) / tf.reshape(acc_scale, [-1]))
    return tf.cast(tf.clip_by_value(q, *iq.INT32), tf.int64)


def straight_through(int_value, float_value):
    """The integer path's value with the float path's gradient."""
    return tf.stop_gradient(int_value) + (float_value - tf.stop_gradient(float_value))


def matmul_int(a, b):
    """Exact int32 matrix product as int64 (operand bounds keep sums far below 2^31)."""
    return tf.cast(tf.matmul(a, b), tf.int64)


@dataclass(frozen=True)
class IntegerLstmCell:
    """The static part of an integer-mode LSTM loop (it keys the loop's trace)."""

    integer = True

    units: int
    features: int
    act_bits: int
    state_bits: int


@dataclass(frozen=True)
class IntegerGruCell:
    """The static part of an integer-mode GRU loop (it keys the loop's trace)."""

    integer = True

    units: int
    features: int
    act_bits: int


def input_projection(X, s_x, kernel_codes, k_scale, bias):
    """z_x for every step: int64 [..., G], saturated to int16 (the LSTM's 4U, the GRU's 3U)."""
    acc_scale = s_x * tf.reshape(k_scale, [-1])
    m, n = iq.multiplier_tf(acc_scale * float(2 ** iq.GATE_FRAC))
    acc = tf.cast(tf.tensordot(X, kernel_codes, axes=1), tf.int64) + integer_bias(bias, acc_scale)
    return tf.clip_by_value(iq.requantize_tf(acc, m, n), *iq.INT16)


def lstm_recurrence(x_hat, zx, kernel, rec_kernel, bias, rec_codes, r_scale, c_max, cell: IntegerLstmCell):
    """The integer LSTM over time-major x_hat [T, B, F] with its input projection zx [T, B, 4U] (int64):
    the hidden states [T, B, U] (their values are the integer codes times 2^-(a-1))."""
    a, u, f_in = cell.act_bits, cell.units, cell.features
    sig = tf.constant(iq.sigmoid_table(a), tf.int64)
    tanh = tf.constant(iq.tanh_table(a), tf.int64)
    h_scale = hidden_scale(a)
    m_h, n_h = iq.multiplier_tf(float(h_scale) * tf.reshape(r_scale, [-1]) * float(2 ** iq.GATE_FRAC))
    e = iq.cell_exponent_tf(c_max, cell.state_bits)
    c_scale = iq.power_of_two_tf(e)
    c_lo, c_hi = iq.signed_range(cell.state_bits)
    h_lo, h_hi = iq.symmetric_range(a)

    def step(inputs, states):
        h, c = states
        x_t, zx_t = inputs[:, :f_in], tf.cast(inputs[:, f_in:], tf.int64)
        z = tf.matmul(x_t, kernel) + tf.matmul(h, rec_kernel)
        if bias is not None:
            z = tf.nn.bias_add(z, bias)
        zi, zf, zc, zo = tf.split(z, 4, axis=1)
        c_float = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zc)
        h_float = tf.sigmoid(zo) * tf.tanh(c_float)

        H = tf.cast(tf.round(h / h_scale), tf.int32)
        zh = tf.clip_by_value(iq.requantize_tf(matmul_int(H, rec_codes), m_h, n_h), *iq.INT16)
        zz = tf.clip_by_value(zx_t + zh, *iq.INT16)
        ii, ff, gg, oo = tf.split(iq.table_index_tf(zz), 4, axis=1)
        gi, gf, gc, go = tf.gather(sig, ii), tf.gather(sig, ff), tf.gather(tanh, gg), tf.gather(sig, oo)
        C = tf.cast(tf.round(c / c_scale), tf.int64)
        C_new = tf.clip_by_value(iq.shift_round_tf(gf * C, a) + iq.shift_round_dynamic_tf(gi * gc, e + 2 * a - 1),
                                 c_lo, c_hi)
        C12 = tf.clip_by_value(iq.shift_round_dynamic_tf(C_new, -(e + iq.GATE_FRAC)), *iq.INT16)
        t = tf.gather(tanh, iq.table_index_tf(C12))
        H_new = tf.clip_by_value(iq.shift_round_tf(go * t, a), h_lo, h_hi)
        c_new = straight_through(tf.cast(C_new, tf.float32) * c_scale, c_float)
        h_new = straight_through(tf.cast(H_new, tf.float32) * h_scale, h_float)
        return (h_new, c_new), (h_new,)

    zeros = tf.zeros((tf.shape(x_hat)[1], u), x_hat.dtype)
    inputs = tf.concat([x_hat, tf.cast(zx, x_hat.dtype)], axis=-1)
    return time_loop(inputs, (zeros, zeros), step, 1)


def gru_recurrence(x_hat, zx, kernel, rec_kernel, bias, rec_codes, r_scale, cell: IntegerGruCell):
    """The integer GRU (reset_after=True) over time-major x_hat [T, B, F] with its input projection
    zx [T, B, 3U] (int64, input bias included): the hidden states [T, B, U]."""
    a, u, f_in = cell.act_bits, cell.units, cell.features
    sig = tf.constant(iq.sigmoid_table(a), tf.int64)
    tanh = tf.constant(iq.tanh_table(a), tf.int64)
    h_scale = hidden_scale(a)
    rec_acc_scale = float(h_scale) * tf.reshape(r_scale, [-1])
    m_h, n_h = iq.multiplier_tf(rec_acc_scale * float(2 ** iq.GATE_FRAC))
    in_bias, rec_bias = (None, None) if bias is None else (bias[0], bias[1])
    rec_bias_codes = integer_bias(rec_bias, rec_acc_scale)
    h_lo, h_hi = iq.symmetric_range(a)

    def step(inputs, states):
        (h,) = states
        x_t, zx_t = inputs[:, :f_in], tf.cast(inputs[:, f_in:], tf.int64)
        xz, hz = tf.matmul(x_t, kernel), tf.matmul(h, rec_kernel)
        if bias is not None:
            xz, hz = tf.nn.bias_add(xz, in_bias), tf.nn.bias_add(hz, rec_bias)
        x_zr, x_n = tf.split(xz, [2 * u, u], axis=1)
        h_zr, h_n = tf.split(hz, [2 * u, u], axis=1)
        z_f, r_f = tf.split(tf.sigmoid(x_zr + h_zr), 2, axis=1)
        n_f = tf.tanh(x_n + r_f * h_n)
        h_float = n_f + z_f * (h - n_f)

        H = tf.cast(tf.round(h / h_scale), tf.int64)
        zh = tf.clip_by_value(iq.requantize_tf(matmul_int(tf.cast(H, tf.int32), rec_codes) + rec_bias_codes, m_h, n_h),
                              *iq.INT16)
        zx_zr, zx_n = tf.split(zx_t, [2 * u, u], axis=1)
        zh_zr, zh_n = tf.split(zh, [2 * u, u], axis=1)
        Z, R = tf.split(tf.gather(sig, iq.table_index_tf(tf.clip_by_value(zx_zr + zh_zr, *iq.INT16))), 2, axis=1)
        N = tf.gather(tanh, iq.table_index_tf(tf.clip_by_value(zx_n + iq.shift_round_tf(R * zh_n, a), *iq.INT16)))
        H_new = tf.clip_by_value(N + iq.shift_round_tf(Z * (H - N), a), h_lo, h_hi)
        h_new = straight_through(tf.cast(H_new, tf.float32) * h_scale, h_float)
        return (h_new,), (h_new,)

    zeros = tf.zeros((tf.shape(x_hat)[1], u), x_hat.dtype)
    inputs = tf.concat([x_hat, tf.cast(zx, x_hat.dtype)], axis=-1)
    return time_loop(inputs, (zeros,), step, 1)


def dense_logits(X, s_x, kernel_codes, k_scale, bias):
    """(int64 logits [B, units], their float32 scale) of an integer-mode Dense."""
    k_scale = tf.reshape(k_scale, [-1])
    acc_scale = s_x * k_scale
    top = tf.reduce_max(k_scale)
    m, n = iq.multiplier_tf(k_scale / top)
    acc = matmul_int(X, kernel_codes) + integer_bias(bias, acc_scale)
    return iq.requantize_tf(acc, m, n), s_x * top
