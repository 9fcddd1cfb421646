"""The quantization math, in one place: ranges, scale/zero-point, a numpy reference and the
TensorFlow fake-quant ops (straight-through and learned-step-size), plus the two small
quantizer objects that layers hold (one per weight tensor, one per activation).

Affine quantization with b bits (the study's formula, generalised):

    scale = (hi - lo) / (qmax - qmin)        zero_point = qmin + round(-lo / scale)
    q     = clip(round(x / scale + zero_point), qmin, qmax)
    x_hat = scale * (q - zero_point)

asymmetric: [qmin, qmax] = [0, 2^b - 1]; symmetric: zero_point = 0, scale = max(|lo|, |hi|) / qmax,
[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1], or [-(2^(b-1) - 1), 2^(b-1) - 1] with narrow_range.
Every range is first widened to contain 0 (lo <= 0 <= hi), so zero is always exactly representable
and the zero point always lies in [qmin, qmax]. Rounding is half-to-even (numpy and TF agree).
All arithmetic is float32, in the same order in numpy and TF, so the two agree bit for bit.
Exception, for speed inside the LSTM time loop: fixed-range activation quantizers run TensorFlow's
fused fake-quant kernel (`fused_fake_quant`), same grid, ties rounded up; weights, whose codes are
exported, always use `fake_quant`.
"""
from __future__ import annotations

from qat import ConfigError

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import tensorflow as tf

SCHEMES = ("asymmetric", "symmetric")
GRANULARITIES = ("per_tensor", "per_channel")
ESTIMATORS = ("minmax", "percentile", "mse")

MSE_GRID = 100                                  # clipping ratios tried by the "mse" estimator
_TINY = float(np.finfo(np.float32).tiny)        # a scale below this is a zero range


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit-width, scheme, granularity and range estimator."""

    bits: int
    scheme: str = "asymmetric"
    granularity: str = "per_tensor"
    axis: int = -1                  # channel axis for per_channel (LSTM/Dense kernels: -1 = output unit)
    estimator: str = "minmax"
    percentile: float = 99.99       # for estimator="percentile": keep [100-p, p] percentiles
    narrow_range: bool = False      # symmetric only: [-(2^(b-1)-1), 2^(b-1)-1]

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 16:
            raise ConfigError(f"bits={self.bits!r} is not allowed: expected an integer 2..16")
        for name, allowed in (("scheme", SCHEMES), ("granularity", GRANULARITIES), ("estimator", ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: expected one of {', '.join(allowed)}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise ConfigError(f"axis={self.axis!r} is not allowed: expected an integer")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} is not allowed: expected a number in (50, 100]")
        if not isinstance(self.narrow_range, bool):
            raise ConfigError(f"narrow_range={self.narrow_range!r} is not allowed: expected true or false")
        if self.narrow_range and self.scheme != "symmetric":
            raise ConfigError("narrow_range=True is not allowed with scheme='asymmetric': it needs scheme='symmetric'")

    @property
    def qmin(self) -> int:
        if self.scheme == "asymmetric":
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if self.scheme == "asymmetric" else 2 ** (self.bits - 1) - 1

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "QuantSpec":
        """Accept a QuantSpec, a dict of its fields, or None (no quantization)."""
        if config is None or isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"quantization spec {config!r} is not allowed: expected a QuantSpec, a dict or None")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"quantization spec key(s) {unknown} are not allowed: "
                              f"expected {', '.join(cls.__dataclass_fields__)}")
        return cls(**config)


# ----------------------------------------------------------------------------------- numpy reference

def reduce_axes(ndim: int, spec: QuantSpec) -> tuple:
    """Axes reduced to get one range per quantization group (all axes but `spec.axis` per channel)."""
    if spec.granularity == "per_tensor":
        return tuple(range(ndim))
    if not -ndim <= spec.axis < ndim:
        raise ConfigError(f"axis={spec.axis} is not allowed for a {ndim}-D tensor: expected {-ndim}..{ndim - 1}"
                          if ndim else "granularity='per_channel' is not allowed for a scalar: use per_tensor")
    return tuple(a for a in range(ndim) if a != spec.axis % ndim)


def _check_finite(x: np.ndarray, what: str = "tensor") -> None:
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"cannot quantize a {what} with {int(np.isnan(x).sum())} NaN and "
                          f"{int(np.isinf(x).sum())} Inf values (of {x.size}): expected finite values only")


def estimate_range(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Range [lo, hi] (float32, keepdims shape: scalars-as-arrays per tensor, one per group per channel).

    minmax: the extremes; percentile: the [100-p, p] percentiles (|x| percentile p for symmetric);
    mse: the minmax range shrunk by the ratio in (0, 1] that minimises the quantization MSE
    (grid of MSE_GRID ratios, per group). The result always contains 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise ConfigError("cannot estimate a quantization range of an empty tensor: expected at least one value")
    _check_finite(x)
    axes = reduce_axes(x.ndim, spec)
    lo = np.minimum(x.min(axis=axes, keepdims=True), 0)
    hi = np.maximum(x.max(axis=axes, keepdims=True), 0)
    if spec.estimator == "percentile":
        p = float(spec.percentile)
        if spec.scheme == "symmetric":
            hi = np.percentile(np.abs(x), p, axis=axes, keepdims=True).astype(np.float32)
            lo = -hi
        else:
            lo = np.minimum(np.percentile(x, 100.0 - p, axis=axes, keepdims=True), 0).astype(np.float32)
            hi = np.maximum(np.percentile(x, p, axis=axes, keepdims=True), 0).astype(np.float32)
    elif spec.estimator == "mse":
        best_err = np.full(lo.shape, np.inf)
        best = np.ones(lo.shape, np.float32)
        for ratio in np.linspace(1.0, 1.0 / MSE_GRID, MSE_GRID, dtype=np.float32):  # ties keep the wider range
            x_hat = fake_quant_np(x, spec, ratio * lo, ratio * hi)
            err = np.mean((x_hat.astype(np.float64) - x) ** 2, axis=axes, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, ratio, best)
        lo, hi = best * lo, best * hi
    return lo.astype(np.float32), hi.astype(np.float32)


def qparams(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) for the range [lo, hi], widened to contain 0. A zero range (constant-zero
    group) gets scale 1 and zero point 0, so it is reproduced exactly instead of dividing by zero."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    _check_finite(lo, "range"), _check_finite(hi, "range")
    bad = np.flatnonzero(np.broadcast_to(lo > hi, np.broadcast_shapes(lo.shape, hi.shape)))
    if bad.size:
        lo_b, hi_b = np.broadcast_arrays(lo, hi)
        raise ConfigError(f"range lo={lo_b.flat[bad[0]]} > hi={hi_b.flat[bad[0]]} is not allowed: expected lo <= hi")
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    if spec.scheme == "symmetric":
        scale = np.maximum(-lo, hi) / np.float32(spec.qmax)
        scale = np.where(scale > _TINY, scale, np.float32(1)).astype(np.float32)
        return scale, np.zeros_like(scale)
    scale = (hi - lo) / np.float32(spec.qmax - spec.qmin)
    scale = np.where(scale > _TINY, scale, np.float32(1)).astype(np.float32)
    zero_point = np.clip(np.round(-lo / scale), spec.qmin, spec.qmax).astype(np.float32)
    return scale, zero_point


def quantize_np(x, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Integer codes q = clip(round(x / scale + zero_point), qmin, qmax) (int32)."""
    x = np.asarray(x, np.float32)
    v = x / np.asarray(scale, np.float32) + np.asarray(zero_point, np.float32)
    return np.clip(np.round(v), spec.qmin, spec.qmax).astype(np.int32)


def dequantize_np(q, scale, zero_point) -> np.ndarray:
    """x_hat = scale * (q - zero_point) (float32)."""
    return (np.asarray(scale, np.float32) * (np.asarray(q, np.float32) - np.asarray(zero_point, np.float32)))


def fake_quant_np(x, spec: QuantSpec, lo=None, hi=None) -> np.ndarray:
    """Numpy reference: quantize then dequantize, estimating the range with spec.estimator if not given."""
    if lo is None or hi is None:
        lo, hi = estimate_range(x, spec)
    scale, zero_point = qparams(lo, hi, spec)
    return dequantize_np(quantize_np(x, scale, zero_point, spec), scale, zero_point)


def error_stats(x, x_hat) -> dict:
    """Quantization error of x_hat against x: MAE, MSE and SQNR in dB (inf for an exact copy)."""
    x = np.asarray(x, np.float64)
    err = np.asarray(x_hat, np.float64) - x
    mse = float(np.mean(err ** 2))
    signal = float(np.mean(x ** 2))
    sqnr = math.inf if mse == 0 else (10 * math.log10(signal / mse) if signal > 0 else -math.inf)
    return {"mae": float(np.mean(np.abs(err))), "mse": mse, "sqnr_db": sqnr}


# ----------------------------------------------------------------------------------- TensorFlow ops

def qparams_tf(lo, hi, spec: QuantSpec):
    """`qparams` in TensorFlow, same float32 operations in the same order (used in-graph)."""
    lo, hi = tf.minimum(lo, 0.0), tf.maximum(hi, 0.0)
    if spec.scheme == "symmetric":
        scale = tf.maximum(-lo, hi) / float(spec.qmax)
        scale = tf.where(scale > _TINY, scale, 1.0)
        return scale, tf.zeros_like(scale)
    scale = (hi - lo) / float(spec.qmax - spec.qmin)
    scale = tf.where(scale > _TINY, scale, 1.0)
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


# ----------------------------------------------------------------------------------- quantizer objects

_MIN_LEARNED_SCALE = 1e-8


class WeightQuantizer:
    """Fake-quantizes one weight tensor of a layer; its range variables live on that layer.

    Non-learned: the range follows the weights in-graph at every call: lo/hi = live min/max of the
    weight (per group) times clip ratios in (0, 1]. The ratios are 1 for minmax and are fitted once
    from the float weights for percentile/mse (`init_from`); recomputing those estimators every step
    would cost a sort or an MSE grid search per training step. Learned (LSQ): a trainable scale (and
    offset for asymmetric) per group, initialised from spec.estimator on the float weights.
    """

    def __init__(self, spec: QuantSpec, learned: bool = False):
        self.spec, self.learned = spec, learned

    def build(self, layer, name: str, shape) -> None:
        shape = tuple(int(d) for d in shape)
        self._axes = reduce_axes(len(shape), self.spec)
        group = tuple(1 if a in self._axes else d for a, d in enumerate(shape))
        self._group_shape = group
        n_groups = int(np.prod(group)) if group else 1
        self._grad_scale = 1.0 / math.sqrt(max(int(np.prod(shape)) // n_groups, 1) * self.spec.qmax)

        self.variables = []     # everything this quantizer adds to the layer

        def add(suffix, init, trainable, shape=group):
            var = layer.add_weight(f"{name}_{suffix}", shape=shape, initializer=init, trainable=trainable)
            self.variables.append(var)
            return var

        self.frozen = add("frozen", "zeros", False, shape=())
        if self.learned:
            self.scale = add("scale", "ones", True)
            self.offset = add("offset", "zeros", True) if self.spec.scheme == "asymmetric" else None
        else:
            self.ratio_lo, self.ratio_hi = add("ratio_lo", "ones", False), add("ratio_hi", "ones", False)
            self.frozen_scale = add("frozen_scale", "ones", False)
            self.frozen_zero_point = add("frozen_zero_point", "zeros", False)

    def freeze(self, w) -> None:
        """Fix the range from now on: a non-learned quantizer stores the scale / zero point it has for
        `w` now and stops following the weight (deployment semantics: re-quantizing the exported
        grid values gives them back exactly); a learned one stops training its scale and offset."""
        if not self.learned:
            scale, zp = qparams_tf(*self._live_range(tf.convert_to_tensor(w)), self.spec)
            self.frozen_scale.assign(tf.reshape(scale, self.frozen_scale.shape))
            self.frozen_zero_point.assign(tf.reshape(zp, self.frozen_zero_point.shape))
        self.frozen.assign(1.0)

    def load_frozen(self, scale, zero_point) -> None:
        """Freeze at a given scale / zero point (from an exported model)."""
        scale = np.reshape(np.asarray(scale, np.float32), self._group_shape)
        zero_point = np.reshape(np.asarray(zero_point, np.float32), self._group_shape)
        if self.learned:
            self.scale.assign(scale)
            if self.offset is not None:
                self.offset.assign(zero_point)
        else:
            self.frozen_scale.assign(scale)
            self.frozen_zero_point.assign(zero_point)
        self.frozen.assign(1.0)

    def _learned(self):
        """(scale, offset) with gradients stopped once frozen."""
        on = self.frozen > 0
        scale = tf.maximum(tf.convert_to_tensor(self.scale), _MIN_LEARNED_SCALE)
        scale = tf.where(on, tf.stop_gradient(scale), scale)
        if self.offset is None:
            return scale, 0.0
        offset = tf.convert_to_tensor(self.offset)
        return scale, tf.where(on, tf.stop_gradient(offset), offset)

    def _live_range(self, w):
        lo = tf.minimum(tf.reduce_min(w, axis=self._axes, keepdims=True), 0.0) * self.ratio_lo
        hi = tf.maximum(tf.reduce_max(w, axis=self._axes, keepdims=True), 0.0) * self.ratio_hi
        return lo, hi

    def scale_zero_point(self, w):
        """(scale, zero_point) tensors the forward pass uses for weight w."""
        if self.learned:
            scale, offset = self._learned()
            zp = tf.clip_by_value(tf.round(offset), self.spec.qmin, self.spec.qmax)
            return scale, tf.zeros_like(scale) + zp
        live_scale, live_zp = qparams_tf(*self._live_range(w), self.spec)
        on = self.frozen > 0
        return (tf.where(on, tf.convert_to_tensor(self.frozen_scale), live_scale),
                tf.where(on, tf.convert_to_tensor(self.frozen_zero_point), live_zp))

    def __call__(self, w):
        if self.learned:
            scale, offset = self._learned()
            return lsq_fake_quant(w, scale, offset, self.spec.qmin, self.spec.qmax, self._grad_scale)
        scale, zp = self.scale_zero_point(w)
        return fake_quant(w, scale, zp, self.spec.qmin, self.spec.qmax)

    def init_from(self, w: np.ndarray) -> None:
        """Set the range variables from float weights with spec.estimator."""
        w = np.asarray(w, np.float32)
        lo, hi = estimate_range(w, self.spec)
        if self.learned:
            scale, zp = qparams(lo, hi, self.spec)
            self.scale.assign(scale)
            if self.offset is not None:
                self.offset.assign(zp)
            return
        mm = QuantSpec(**{**self.spec.to_config(), "estimator": "minmax"})
        lo_mm, hi_mm = estimate_range(w, mm)
        if self.spec.scheme == "symmetric":   # only max(|lo|, |hi|) matters: one ratio for both ends
            a, a_mm = np.maximum(-lo, hi), np.maximum(-lo_mm, hi_mm)
            r = np.where(a_mm > 0, a / np.where(a_mm > 0, a_mm, 1), 1).astype(np.float32)
            self.ratio_lo.assign(r), self.ratio_hi.assign(r)
            return
        self.ratio_lo.assign(np.where(lo_mm < 0, lo / np.where(lo_mm < 0, lo_mm, 1), 1).astype(np.float32))
        self.ratio_hi.assign(np.where(hi_mm > 0, hi / np.where(hi_mm > 0, hi_mm, 1), 1).astype(np.float32))


class ActivationQuantizer:
    """Fake-quantizes an activation (layer input, gate, LSTM state) with a range from data.

    The range comes from `set_range` (calibration, with spec.estimator) and is then either fixed
    (non-learned) or the starting point of a trainable LSQ scale/offset (learned). Until a range is set
    the quantizer passes data through unchanged (a "calibrated" flag saved with the model), so an
    uncalibrated model is the float model rather than garbage. Per-channel means one range per entry of
    the last axis (feature or unit).
    """

    def __init__(self, spec: QuantSpec, learned: bool = False):
        if spec.granularity == "per_channel" and spec.axis != -1:
            raise ConfigError(f"axis={spec.axis} is not allowed for an activation quantizer: "
                              "per-channel activations use axis=-1 (features / units)")
        self.spec, self.learned = spec, learned

    def build(self, layer, name: str, channels: int) -> None:
        group = (int(channels),) if self.spec.granularity == "per_channel" else ()
        self._grad_scale = 1.0 / math.sqrt((1 if group else int(channels)) * self.spec.qmax)

        def add(suffix, init, trainable):
            return layer.add_weight(f"{name}_{suffix}", shape=group, initializer=init, trainable=trainable)

        self._group = group
        self.calibrated = layer.add_weight(f"{name}_calibrated", shape=(), initializer="zeros", trainable=False)
        self.frozen = layer.add_weight(f"{name}_frozen", shape=(), initializer="zeros", trainable=False)
        if self.learned:
            self.scale = add("scale", "ones", True)
            self.offset = add("offset", "zeros", True) if self.spec.scheme == "asymmetric" else None
        else:
            self.lo, self.hi = add("lo", "zeros", False), add("hi", "zeros", False)

    def params(self):
        """(on, scale, zero point or LSQ offset) as tensors, read once: `on` is False until calibrated."""
        on = self.calibrated > 0
        if self.learned:
            frozen = self.frozen > 0
            scale = tf.maximum(tf.convert_to_tensor(self.scale), _MIN_LEARNED_SCALE)
            scale = tf.where(frozen, tf.stop_gradient(scale), scale)
            offset = tf.zeros_like(scale) if self.offset is None else tf.convert_to_tensor(self.offset)
            if self.offset is not None:
                offset = tf.where(frozen, tf.stop_gradient(offset), offset)
            return on, scale, offset
        scale, zp = qparams_tf(tf.convert_to_tensor(self.lo), tf.convert_to_tensor(self.hi), self.spec)
        return on, scale, zp

    @property
    def kind(self) -> tuple:
        """(spec, learned, LSQ gradient scale): what `bound_quant` needs besides the range tensors."""
        return self.spec, self.learned, self._grad_scale

    def __call__(self, x):
        """Fake-quantize x outside a time loop: one branch on the calibrated flag (instead of a select
        over every value, forward and backward)."""
        on, scale, zp = self.params()
        quant = bound_quant(self.kind, on, scale, zp, gated=False)
        return tf.cond(on, lambda: quant(x), lambda: tf.identity(x))

    def freeze(self) -> None:
        """Stop training a learned range (a calibrated non-learned range is already fixed)."""
        self.frozen.assign(1.0)

    def reset(self) -> None:
        """Back to pass-through (before re-calibration)."""
        self.calibrated.assign(0.0)

    def set_range(self, lo, hi) -> None:
        """Use [lo, hi] (scalars, or one per channel) from now on."""
        lo = np.reshape(np.asarray(lo, np.float32), self._group)
        hi = np.reshape(np.asarray(hi, np.float32), self._group)
        if self.learned:
            scale, zp = qparams(lo, hi, self.spec)
            self.scale.assign(scale)
            if self.offset is not None:
                self.offset.assign(zp)
        else:
            qparams(lo, hi, self.spec)        # validates the range (finite, lo <= hi)
            self.lo.assign(lo), self.hi.assign(hi)
        self.calibrated.assign(1.0)


def bound_quant(kind: tuple, on, scale, zp, gated: bool = True):
    """x -> fake_quant(x) for a quantizer of this `kind` (`ActivationQuantizer.kind`: LSQ or fixed) with
    these parameters; x passes through unchanged where `on` is False (`gated=False`: the caller knows
    `on` is all True)."""
    spec, learned, grad_scale = kind
    if learned:
        quant = lambda x: lsq_fake_quant(x, scale, zp, spec.qmin, spec.qmax, grad_scale)
    else:
        quant = fused_fake_quant(scale, zp, spec)
    return (lambda x: tf.where(on, quant(x), x)) if gated else quant


def fused_fake_quant(scale, zero_point, spec: QuantSpec, pre: Optional[tuple] = None):
    """x -> fake_quant(x) on the grid scale * (q - zero_point), q in [qmin, qmax], through TensorFlow's
    fused fake-quant kernels (straight-through inside the range, zero outside, as `fake_quant`);
    used for activations inside the LSTM time loop. It rounds half up where `fake_quant` rounds half
    to even, which only differs at exact ties. Weights keep `fake_quant`: their codes are exported
    bit-exactly.

    One range: the FakeQuantWithMinMaxVars op. One range per channel: x is mapped to the integer grid
    per channel (x / scale + zero_point - qmin), fake-quantized on the unit grid [0, qmax - qmin] by
    the FakeQuantWithMinMaxArgs op and mapped back, with the straight-through gradient as one op; on
    CPU this is 2-3x faster, gradient included, than TensorFlow's per-channel kernel (BENCHMARKS.md
    section 3). `pre=(a, b)`: quantize x = v * a + b instead, the affine map folded into the one to the
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


def concat_params(quantizers, channels: int) -> tuple:
    """(on, scale, zero point) of the concatenation along the last axis of `channels`-wide pieces, the
    i-th piece quantized exactly as `quantizers[i]` would quantize it alone: one op per time step
    instead of one per piece (the LSTM's four gates). The quantizers must share one kind."""
    if any(q.kind != quantizers[0].kind for q in quantizers):
        raise ValueError("concat_params needs quantizers of one spec and kind")
    widen = lambda t: tf.broadcast_to(t, [channels])
    parts = [q.params() for q in quantizers]
    return tuple(tf.concat([widen(p[i]) for p in parts], 0) for i in range(3))

