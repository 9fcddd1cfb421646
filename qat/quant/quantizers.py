"""The quantizer objects that quantized layers hold: one per weight tensor, one per activation.

Two strategies, each a pair of classes behind one interface:

- `RANGE`: a weight's range follows the weight in-graph at every call (the live min / max of each
  quantization group times clip ratios fitted once from the float weights: 1 for minmax, the
  estimator's ratio for percentile / mse; refitting those estimators every step would cost a sort
  or an MSE grid search per step); an activation's range is set by calibration and then fixed.
- `LSQ`: learned step sizes (LSQ, Esser et al. 2020; offsets as in LSQ+) for weights and
  activations, initialised from the same estimators.

Weight quantizers can be frozen (their scale / zero point fixed where they are: deployment
semantics) and loaded from an exported model. Activation quantizers pass values through unchanged
until a range is set (a "calibrated" flag saved with the model), so an uncalibrated model is the
float model rather than garbage. Quantizer state lives in variables of the layer that owns it.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, NamedTuple, Sequence, Type

import numpy as np
import tensorflow as tf

from qat.checks import OneOf
from qat.errors import ConfigError
from qat.quant.ops import fake_quant, fused_fake_quant, lsq_fake_quant, qparams_tf
from qat.quant.reference import estimate_range, qparams, reduce_axes, zero_point_at
from qat.quant.scale_codes import snap_scales
from qat.quant.spec import QuantSpec

MIN_LEARNED_SCALE = 1e-8


def _lsq_grad_scale(elements_per_group: int, spec: QuantSpec) -> float:
    """LSQ's gradient scale 1 / sqrt(elements per group * qmax)."""
    return 1.0 / math.sqrt(max(elements_per_group, 1) * spec.qmax)


# ----------------------------------------------------------------------------------- weights

class WeightQuantizer:
    """Fake-quantizes one weight tensor of a layer (interface and the parts both strategies share)."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def build(self, layer, name: str, shape) -> None:
        """Create the quantizer's variables on `layer` for a weight `name` of `shape`."""
        shape = tuple(int(d) for d in shape)
        self._axes, self._group_shape = self._layout(shape)
        n_groups = int(np.prod(self._group_shape)) if self._group_shape else 1
        self._elements_per_group = int(np.prod(shape)) // n_groups
        self.variables = []     # everything this quantizer adds to the layer
        self._layer, self._name = layer, name
        self.frozen = self._add("frozen", "zeros", False, shape=())
        self._build_range()

    def _layout(self, shape: tuple):
        """(axes a range reduces over, shape of the range variables) for a weight of `shape`."""
        axes = reduce_axes(len(shape), self.spec)
        return axes, tuple(1 if a in axes else d for a, d in enumerate(shape))

    def _add(self, suffix: str, init, trainable: bool, shape=None):
        var = self._layer.add_weight(f"{self._name}_{suffix}", shape=self._group_shape if shape is None else shape,
                                     initializer=init, trainable=trainable)
        self.variables.append(var)
        return var

    def _build_range(self) -> None:
        raise NotImplementedError

    def init_from(self, w: np.ndarray) -> None:
        """Set the range variables from float weights with spec.estimator."""
        raise NotImplementedError

    def scale_zero_point(self, w):
        """(scale, zero_point) tensors the forward pass uses for weight w."""
        raise NotImplementedError

    def __call__(self, w):
        raise NotImplementedError

    def freeze(self, w) -> None:
        """Fix the range from now on."""
        raise NotImplementedError

    def load_frozen(self, scale, zero_point) -> None:
        """Freeze at a given scale / zero point (from an exported model)."""
        raise NotImplementedError

    def _grouped(self, values) -> np.ndarray:
        return np.reshape(np.asarray(values, np.float32), self._group_shape)


class RangeWeightQuantizer(WeightQuantizer):
    """The range is the live min / max of the weight times fitted clip ratios, or, once frozen, the
    scale / zero point stored at freezing time."""

    def _build_range(self) -> None:
        self.ratio_lo, self.ratio_hi = self._add("ratio_lo", "ones", False), self._add("ratio_hi", "ones", False)
        self.frozen_scale = self._add("frozen_scale", "ones", False)
        self.frozen_zero_point = self._add("frozen_zero_point", "zeros", False)

    def _live_range(self, w):
        lo = tf.minimum(tf.reduce_min(w, axis=self._axes, keepdims=True), 0.0) * self.ratio_lo
        hi = tf.maximum(tf.reduce_max(w, axis=self._axes, keepdims=True), 0.0) * self.ratio_hi
        return lo, hi

    def init_from(self, w: np.ndarray) -> None:
        w = np.asarray(w, np.float32)
        lo, hi = estimate_range(w, self.spec)
        mm = QuantSpec(**{**self.spec.to_config(), "estimator": "minmax"})
        lo_mm, hi_mm = estimate_range(w, mm)
        if self.spec.scheme == "symmetric":   # only max(|lo|, |hi|) matters: one ratio for both ends
            a, a_mm = np.maximum(-lo, hi), np.maximum(-lo_mm, hi_mm)
            r = np.where(a_mm > 0, a / np.where(a_mm > 0, a_mm, 1), 1).astype(np.float32)
            self.ratio_lo.assign(r), self.ratio_hi.assign(r)
            return
        self.ratio_lo.assign(np.where(lo_mm < 0, lo / np.where(lo_mm < 0, lo_mm, 1), 1).astype(np.float32))
        self.ratio_hi.assign(np.where(hi_mm > 0, hi / np.where(hi_mm > 0, hi_mm, 1), 1).astype(np.float32))

    def scale_zero_point(self, w):
        live_scale, live_zp = qparams_tf(*self._live_range(w), self.spec)
        on = self.frozen > 0
        return (tf.where(on, tf.convert_to_tensor(self.frozen_scale), live_scale),
                tf.where(on, tf.convert_to_tensor(self.frozen_zero_point), live_zp))

    def __call__(self, w):
        scale, zp = self.scale_zero_point(w)
        return fake_quant(w, scale, zp, self.spec.qmin, self.spec.qmax)

    def freeze(self, w) -> None:
        """Store the scale / zero point the weight has now and stop following it: re-quantizing the
        exported grid values then gives them back exactly. With `spec.scale_bits` the scale is first
        snapped onto its stored format (qat.quant.scale_codes) and the zero point follows it."""
        lo, hi = (t.numpy() for t in self._live_range(tf.convert_to_tensor(w)))
        scale = snap_scales(qparams(lo, hi, self.spec)[0], self.spec.scale_bits)
        self.frozen_scale.assign(self._grouped(scale))
        self.frozen_zero_point.assign(self._grouped(zero_point_at(lo, scale, self.spec)))
        self.frozen.assign(1.0)

    def load_frozen(self, scale, zero_point) -> None:
        self.frozen_scale.assign(self._grouped(scale))
        self.frozen_zero_point.assign(self._grouped(zero_point))
        self.frozen.assign(1.0)


class GateBlockWeightQuantizer(RangeWeightQuantizer):
    """RANGE weights with one symmetric range per gate: the last axis is cut into `blocks` equal
    blocks (an LSTM kernel [F, 4U] holds the i, f, c, o gate matrices side by side), each with the
    range of its largest magnitude times a clip ratio fitted once with the spec's estimator. This is
    TFLite's int8 LSTM layout: one symmetric scale per input-to-gate and recurrent-to-gate matrix.
    The range variables hold one value per column (each block's value repeated), so the scale
    broadcasts against the weight as every other quantizer's does."""

    def __init__(self, spec: QuantSpec, blocks: int = 4):
        if spec.scheme != "symmetric":
            raise ConfigError(f"scheme={spec.scheme!r} is not allowed for a per-gate weight quantizer: "
                              "expected 'symmetric'")
        super().__init__(spec)
        self.blocks = int(blocks)

    def _layout(self, shape: tuple):
        if shape[-1] % self.blocks:
            raise ConfigError(f"a weight of shape {list(shape)} cannot be cut into {self.blocks} gate blocks: "
                              f"expected a last axis divisible by {self.blocks}")
        return tuple(range(len(shape) - 1)), (1,) * (len(shape) - 1) + (shape[-1],)

    def _per_block(self, columns):
        """[..., C] column values -> the largest of each block, repeated over its columns."""
        width = self._group_shape[-1] // self.blocks
        top = tf.reduce_max(tf.reshape(columns, [self.blocks, width]), axis=1, keepdims=True)
        return tf.reshape(tf.broadcast_to(top, [self.blocks, width]), self._group_shape)

    def _live_range(self, w):
        a = self._per_block(tf.reduce_max(tf.abs(w), axis=self._axes, keepdims=True)) * self.ratio_hi
        return -a, a

    def init_from(self, w: np.ndarray) -> None:
        w = np.asarray(w, np.float32)
        ratios = []
        for block in np.split(w.reshape(-1, w.shape[-1]), self.blocks, axis=1):
            lo, hi = estimate_range(block, self.spec)
            top = float(np.max(np.abs(block)))
            ratio = float(max(-np.min(lo), np.max(hi))) / top if top > 0 else 1.0
            ratios.append(np.full(block.shape[1], ratio, np.float32))
        r = self._grouped(np.concatenate(ratios))
        self.ratio_lo.assign(r), self.ratio_hi.assign(r)


class LsqWeightQuantizer(WeightQuantizer):
    """A trainable scale (and offset for asymmetric) per quantization group."""

    def _build_range(self) -> None:
        self._grad_scale = _lsq_grad_scale(self._elements_per_group, self.spec)
        self.scale = self._add("scale", "ones", True)
        self.offset = self._add("offset", "zeros", True) if self.spec.scheme == "asymmetric" else None

    def init_from(self, w: np.ndarray) -> None:
        scale, zp = qparams(*estimate_range(np.asarray(w, np.float32), self.spec), self.spec)
        self.scale.assign(scale)
        if self.offset is not None:
            self.offset.assign(zp)

    def _learned(self):
        """(scale, offset) with gradients stopped once frozen."""
        on = self.frozen > 0
        scale = tf.maximum(tf.convert_to_tensor(self.scale), MIN_LEARNED_SCALE)
        scale = tf.where(on, tf.stop_gradient(scale), scale)
        if self.offset is None:
            return scale, 0.0
        offset = tf.convert_to_tensor(self.offset)
        return scale, tf.where(on, tf.stop_gradient(offset), offset)

    def scale_zero_point(self, w):
        scale, offset = self._learned()
        zp = tf.clip_by_value(tf.round(offset), self.spec.qmin, self.spec.qmax)
        return scale, tf.zeros_like(scale) + zp

    def __call__(self, w):
        scale, offset = self._learned()
        return lsq_fake_quant(w, scale, offset, self.spec.qmin, self.spec.qmax, self._grad_scale)

    def freeze(self, w) -> None:
        """Stop training the scale and offset; the scale snapped onto its stored format."""
        if float(self.frozen.numpy()) == 0.0:
            learned = np.maximum(self.scale.numpy(), MIN_LEARNED_SCALE)
            self.scale.assign(snap_scales(learned, self.spec.scale_bits))
        self.frozen.assign(1.0)

    def load_frozen(self, scale, zero_point) -> None:
        self.scale.assign(self._grouped(scale))
        if self.offset is not None:
            self.offset.assign(self._grouped(zero_point))
        self.frozen.assign(1.0)


# ----------------------------------------------------------------------------------- activations

class ActivationQuantizer:
    """Fake-quantizes an activation (layer input, gate, recurrent state) with a range from data (see
    the module doc). Per-channel means one range per entry of the last axis (feature or unit).

    Inside a recurrent time loop the quantizer is used in two parts: `kind` (static: keys the traced
    loop) and `params()` (tensors: passed into it); `kind.bind(on, scale, zp)` rebuilds the function."""

    folds_affine: ClassVar[bool] = False   # whether `fused_fake_quant`'s folded affine map applies

    def __init__(self, spec: QuantSpec):
        if spec.granularity == "per_channel" and spec.axis != -1:
            raise ConfigError(f"axis={spec.axis} is not allowed for an activation quantizer: "
                              "per-channel activations use axis=-1 (features / units)")
        self.spec = spec

    def build(self, layer, name: str, channels: int) -> None:
        self._group = (int(channels),) if self.spec.granularity == "per_channel" else ()
        self._grad_scale = _lsq_grad_scale(1 if self._group else int(channels), self.spec)
        self._layer, self._name = layer, name
        self.calibrated = layer.add_weight(f"{name}_calibrated", shape=(), initializer="zeros", trainable=False)
        self.frozen = layer.add_weight(f"{name}_frozen", shape=(), initializer="zeros", trainable=False)
        self._build_range()

    def _add(self, suffix: str, init, trainable: bool):
        return self._layer.add_weight(f"{self._name}_{suffix}", shape=self._group, initializer=init,
                                      trainable=trainable)

    def _build_range(self) -> None:
        raise NotImplementedError

    def params(self):
        """(on, scale, zero point or LSQ offset) as tensors, read once: `on` is False until calibrated."""
        raise NotImplementedError

    def set_range(self, lo, hi) -> None:
        """Use [lo, hi] (scalars, or one per channel) from now on."""
        raise NotImplementedError

    @staticmethod
    def fake_quant_fn(spec: QuantSpec, grad_scale: float, scale, zp) -> Callable:
        raise NotImplementedError

    @property
    def kind(self) -> "QuantKind":
        return QuantKind(type(self), self.spec, self._grad_scale)

    def __call__(self, x):
        """Fake-quantize x outside a time loop: one branch on the calibrated flag (instead of a select
        over every value, forward and backward)."""
        on, scale, zp = self.params()
        quant = self.kind.bind(on, scale, zp, gated=False)
        return tf.cond(on, lambda: quant(x), lambda: tf.identity(x))

    def freeze(self) -> None:
        """Stop training a learned range (a calibrated fixed range is already fixed)."""
        self.frozen.assign(1.0)

    def reset(self) -> None:
        """Back to pass-through (before re-calibration)."""
        self.calibrated.assign(0.0)

    def _grouped(self, values) -> np.ndarray:
        return np.reshape(np.asarray(values, np.float32), self._group)


class CalibratedActivationQuantizer(ActivationQuantizer):
    """A fixed range [lo, hi] set by calibration; inside time loops TensorFlow's fused kernels."""

    folds_affine = True

    def _build_range(self) -> None:
        self.lo, self.hi = self._add("lo", "zeros", False), self._add("hi", "zeros", False)

    def params(self):
        scale, zp = qparams_tf(tf.convert_to_tensor(self.lo), tf.convert_to_tensor(self.hi), self.spec)
        return self.calibrated > 0, scale, zp

    def set_range(self, lo, hi) -> None:
        lo, hi = self._grouped(lo), self._grouped(hi)
        qparams(lo, hi, self.spec)        # validates the range (finite, lo <= hi)
        self.lo.assign(lo), self.hi.assign(hi)
        self.calibrated.assign(1.0)

    @staticmethod
    def fake_quant_fn(spec, grad_scale, scale, zp):
        return fused_fake_quant(scale, zp, spec)


class LsqActivationQuantizer(ActivationQuantizer):
    """A trainable scale (and offset for asymmetric), initialised from the calibrated range."""

    def _build_range(self) -> None:
        self.scale = self._add("scale", "ones", True)
        self.offset = self._add("offset", "zeros", True) if self.spec.scheme == "asymmetric" else None

    def params(self):
        frozen = self.frozen > 0
        scale = tf.maximum(tf.convert_to_tensor(self.scale), MIN_LEARNED_SCALE)
        scale = tf.where(frozen, tf.stop_gradient(scale), scale)
        offset = tf.zeros_like(scale) if self.offset is None else tf.convert_to_tensor(self.offset)
        if self.offset is not None:
            offset = tf.where(frozen, tf.stop_gradient(offset), offset)
        return self.calibrated > 0, scale, offset

    def set_range(self, lo, hi) -> None:
        scale, zp = qparams(self._grouped(lo), self._grouped(hi), self.spec)
        self.scale.assign(scale)
        if self.offset is not None:
            self.offset.assign(zp)
        self.calibrated.assign(1.0)

    @staticmethod
    def fake_quant_fn(spec, grad_scale, scale, zp):
        return lambda x: lsq_fake_quant(x, scale, zp, spec.qmin, spec.qmax, grad_scale)


class QuantKind(NamedTuple):
    """The static part of an activation quantizer: hashable, so it can key a traced time loop; the
    range tensors are passed separately."""

    quantizer: Type[ActivationQuantizer]
    spec: QuantSpec
    grad_scale: float

    def bind(self, on, scale, zp, gated: bool = True) -> Callable:
        """x -> fake_quant(x) with these parameters; x passes through unchanged where `on` is False
        (`gated=False`: the caller knows `on` is all True)."""
        quant = self.quantizer.fake_quant_fn(self.spec, self.grad_scale, scale, zp)
        return (lambda x: tf.where(on, quant(x), x)) if gated else quant


def concat_params(quantizers: Sequence[ActivationQuantizer], channels: int) -> tuple:
    """(on, scale, zero point) of the concatenation along the last axis of `channels`-wide pieces, the
    i-th piece quantized exactly as `quantizers[i]` would quantize it alone: one op per time step
    instead of one per piece (the LSTM's four gates). The quantizers must share one kind."""
    if any(q.kind != quantizers[0].kind for q in quantizers):
        raise ValueError("concat_params needs quantizers of one spec and kind")
    widen = lambda t: tf.broadcast_to(t, [channels])
    parts = [q.params() for q in quantizers]
    return tuple(tf.concat([widen(p[i]) for p in parts], 0) for i in range(3))


# ----------------------------------------------------------------------------------- strategies

class Strategy:
    """Which quantizer classes a quantized layer uses for its weights and its activations."""

    def __init__(self, name: str, weight: Type[WeightQuantizer], activation: Type[ActivationQuantizer]):
        self.name, self.weight, self.activation = name, weight, activation

    def __repr__(self) -> str:
        return f"Strategy({self.name!r})"


RANGE = Strategy("range", RangeWeightQuantizer, CalibratedActivationQuantizer)
LSQ = Strategy("lsq", LsqWeightQuantizer, LsqActivationQuantizer)
STRATEGIES: Dict[str, Strategy] = {s.name: s for s in (RANGE, LSQ)}


def strategy_named(name: str) -> Strategy:
    return STRATEGIES[OneOf(tuple(STRATEGIES))("quantizer", name)]
