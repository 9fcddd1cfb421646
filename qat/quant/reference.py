"""The numpy reference of the quantization math (see qat.quant.spec for the formulas): range
estimation, scale / zero point, quantize, dequantize, and error figures.

Every range is first widened to contain 0 (lo <= 0 <= hi), so zero is always exactly representable
and the zero point always lies in [qmin, qmax]. Rounding is half-to-even. All arithmetic is float32,
in the same order as the TensorFlow ops of qat.quant.ops, so the two agree bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from qat.errors import ConfigError, DataError
from qat.quant.spec import QuantSpec

MSE_GRID = 100                                  # clipping ratios tried by the "mse" estimator
TINY = float(np.finfo(np.float32).tiny)         # a scale below this is a zero range

def reduce_axes(ndim: int, spec: QuantSpec) -> tuple:
    """Axes reduced to get one range per quantization group (all axes but `spec.axis` per channel)."""
    if spec.granularity == "per_tensor":
        return tuple(range(ndim))
    if not -ndim <= spec.axis < ndim:
        raise ConfigError(f"axis={spec.axis} is not allowed for a {ndim}-D tensor: expected {-ndim}..{ndim - 1}"
                          if ndim else "granularity='per_channel' is not allowed for a scalar: use per_tensor")
    return tuple(a for a in range(ndim) if a != spec.axis % ndim)


def check_finite(x: np.ndarray, what: str = "tensor") -> None:
    """A DataError for NaN / Inf values (a diverged model's weights, a broken input)."""
    if not np.all(np.isfinite(x)):
        raise DataError(f"cannot quantize a {what} with {int(np.isnan(x).sum())} NaN and "
                        f"{int(np.isinf(x).sum())} Inf values (of {x.size}): expected finite values only")


def estimate_range(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Range [lo, hi] (float32, keepdims shape: scalars-as-arrays per tensor, one per group per channel).

    minmax: the extremes; percentile: the [100-p, p] percentiles (|x| percentile p for symmetric);
    mse: the minmax range shrunk by the ratio in (0, 1] that minimises the quantization MSE
    (grid of MSE_GRID ratios, per group). The result always contains 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise DataError("cannot estimate a quantization range of an empty tensor: expected at least one value")
    check_finite(x)
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
    group) gets scale 1 and zero point 0, so it is reproduced exactly instead of dividing by zero; a
    range whose width overflows float32 gets the scale hi / levels - lo / levels."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    check_finite(lo, "range"), check_finite(hi, "range")
    bad = np.flatnonzero(np.broadcast_to(lo > hi, np.broadcast_shapes(lo.shape, hi.shape)))
    if bad.size:
        lo_b, hi_b = np.broadcast_arrays(lo, hi)
        raise ConfigError(f"range lo={lo_b.flat[bad[0]]} > hi={hi_b.flat[bad[0]]} is not allowed: expected lo <= hi")
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    if spec.scheme == "symmetric":
        scale = np.maximum(-lo, hi) / np.float32(spec.qmax)
        scale = np.where(scale > TINY, scale, np.float32(1)).astype(np.float32)
        return scale, np.zeros_like(scale)
    levels = np.float32(spec.qmax - spec.qmin)
    with np.errstate(over="ignore"):
        scale = (hi - lo) / levels
    # a range near the float32 limits: hi - lo overflows, the scale does not
    scale = np.where(np.isfinite(scale), scale, hi / levels - lo / levels)
    scale = np.where(scale > TINY, scale, np.float32(1)).astype(np.float32)
    return scale, zero_point_at(lo, scale, spec)


def zero_point_at(lo, scale, spec: QuantSpec) -> np.ndarray:
    """The zero point `qparams` gives the range starting at lo for a given scale (0 when symmetric)."""
    scale = np.asarray(scale, np.float32)
    if spec.scheme == "symmetric":
        return np.zeros_like(scale)
    lo = np.minimum(np.asarray(lo, np.float32), np.float32(0))
    return np.clip(np.round(-lo / scale), spec.qmin, spec.qmax).astype(np.float32)


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
