"""The quantization math as TensorFlow ops, for use in graphs: scale / zero point, fake-quant with a
straight-through gradient, learned-step-size (LSQ) fake-quant, and the fused fake-quant kernels used
for activations inside recurrent time loops. Same float32 operations in the same order as the numpy
reference (qat.quant.reference), so the two agree bit for bit.
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from qat.quant.reference import TINY
from qat.quant.spec import QuantSpec

def qparams_tf(lo, hi, spec: QuantSpec):
    """`qparams` in TensorFlow, same float32 operations in the same order (used in-graph)."""
    lo, hi = tf.minimum(lo, 0.0), tf.maximum(hi, 0.0)
    if spec.scheme == "symmetric":
        scale = tf.maximum(-lo, hi) / float(spec.qmax)
        scale = tf.where(scale > TINY, scale, 1.0)
        return scale, tf.zeros_like(scale)
    levels = float(spec.qmax - spec.qmin)
    scale = (hi - lo) / levels
    scale = tf.where(tf.math.is_finite(scale), scale, hi / levels - lo / levels)   # hi - lo overflowed
    scale = tf.where(scale > TINY, scale, 1.0)
    return scale, tf.clip_by_value(tf.round(-lo / scale), float(spec.qmin), float(spec.qmax))


def fake_quant(x, scale, zero_point, qmin: int, qmax: int) -> tf.Tensor:
    """Fake-quantize x with a straight-through estimator: forward scale*(clip(round(x/scale+zp))-zp);
    gradient wrt x is 1 where qmin <= x/scale+zp <= qmax and 0 outside (the clipped region).
    scale and zero_point are treated as constants (no gradient); see `lsq_fake_quant` for learned ones."""
    scale = tf.convert_to_tensor(scale, tf.float32)
    zero_point = tf.convert_to_tensor(zero_point, tf.float32)
    qmin, qmax = float(qmin), float(qmax)

    @tf.custom_gradient
    def _fq(x):
        v = x / scale + zero_point
        y = scale * (tf.clip_by_value(tf.round(v), qmin, qmax) - zero_point)

        def grad(dy):
            return tf.where((v >= qmin) & (v <= qmax), dy, tf.zeros_like(dy))

        return y, grad

    return _fq(tf.convert_to_tensor(x, tf.float32))


def _sum_to(t, like):
    """Sum a broadcast gradient back to the shape of `like`."""
    axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(like), s1=tf.shape(t))
    return tf.reshape(tf.reduce_sum(t, axis=axes), tf.shape(like))


def lsq_fake_quant(x, scale, offset, qmin: int, qmax: int, grad_scale: float) -> tf.Tensor:
    """Learned-step-size fake-quant (LSQ, Esser et al. 2020; offset as in LSQ+).

    Forward: z = clip(round(offset)), y = scale * (clip(round(x/scale + z), qmin, qmax) - z), so zero stays
    exact. Gradients: x as the STE; scale: round(v)-v inside, qmin-z / qmax-z below / above; offset
    (STE through its rounding): 0 inside, -scale outside; both scaled by `grad_scale`
    (LSQ: 1/sqrt(elements per group * qmax))."""
    qmin, qmax = float(qmin), float(qmax)

    @tf.custom_gradient
    def _lsq(x, s, o):
        z = tf.clip_by_value(tf.round(o), qmin, qmax)
        v = x / s + z
        rv = tf.round(v)
        y = s * (tf.clip_by_value(rv, qmin, qmax) - z)

        def grad(dy):
            below, above = v < qmin, v > qmax
            inside = ~(below | above)
            zeros = tf.zeros_like(dy)
            ds = tf.where(inside, rv - v, tf.where(below, qmin - z, qmax - z)) * dy
            do = tf.where(inside, zeros, -s * dy)
            return (tf.where(inside, dy, zeros),
                    _sum_to(ds, s) * grad_scale,
                    _sum_to(do, o) * grad_scale)

        return y, grad

    return _lsq(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(scale, tf.float32),
                tf.convert_to_tensor(offset, tf.float32))


def fused_fake_quant(scale, zero_point, spec: QuantSpec, pre: Optional[tuple] = None):
    """x -> fake_quant(x) on the grid scale * (q - zero_point), q in [qmin, qmax], through TensorFlow's
    fused fake-quant kernels (straight-through inside the range, zero outside, as `fake_quant`);
    used for activations inside recurrent time loops. It rounds half up where `fake_quant` rounds
    half to even, which only differs at exact ties. Weights keep `fake_quant`: their codes are
    exported bit-exactly.

    One range: the FakeQuantWithMinMaxVars op. One range per channel: x is mapped to the integer grid
    per channel (x / scale + zero_point - qmin), fake-quantized on the unit grid [0, qmax - qmin] by
    the FakeQuantWithMinMaxArgs op and mapped back, with the straight-through gradient as one op (on
    CPU faster, gradient included, than TensorFlow's per-channel kernel). `pre=(a, b)`: quantize x = v * a + b instead, the affine map folded into the one to the
    grid (v -> fake_quant(v * a + b), gradient a inside the range; per channel only)."""
    levels = spec.qmax - spec.qmin
    narrow = levels == 2 ** spec.bits - 2
    # fixed ranges: no gradient to compute (in a time loop it would be summed over every step)
    scale, zero_point = tf.stop_gradient(scale), tf.stop_gradient(zero_point)
    if len(scale.shape) == 0 and pre is None:
        lo, hi = scale * (float(spec.qmin) - zero_point), scale * (float(spec.qmax) - zero_point)
        return lambda x: tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=spec.bits,
                                                                      narrow_range=narrow)
    offset = zero_point - float(spec.qmin)
    grid = dict(min=0.0, max=float(levels), num_bits=spec.bits, narrow_range=narrow)
    if pre is None:
        to_grid, slope = (lambda x: x / scale + offset), None
    else:
        a, b = pre
        a_grid, b_grid = a / scale, b / scale + offset
        to_grid, slope = (lambda v: v * a_grid + b_grid), a

    @tf.custom_gradient
    def on_grid(x):
        u = to_grid(x)
        y = (tf.raw_ops.FakeQuantWithMinMaxArgs(inputs=u, **grid) - offset) * scale

        def grad(dy):   # straight through inside the range: one op instead of the chain's gradient
            g = tf.raw_ops.FakeQuantWithMinMaxArgsGradient(gradients=dy, inputs=u, **grid)
            return g if slope is None else g * slope

        return y, grad

    return on_grid
