"""Scales as k-bit codes (qat.quant.scale_codes): exact decoding, the rounding bound, the range rule,
and frozen quantizers that compute with exactly the scales a packed file stores."""
import math

import numpy as np
import pytest
import tensorflow as tf

from qat.checks import BITS_MAX
from qat.errors import ConfigError
from qat.quant.quantizers import LsqWeightQuantizer, RangeWeightQuantizer
from qat.quant.reference import qparams, quantize_np
from qat.quant.scale_codes import decode_scales, encode_scales, snap_scales
from qat.quant.spec import QuantSpec


def _scales(seed, octaves, n=500):
    rng = np.random.default_rng(seed)
    return np.exp2(rng.uniform(-10, -10 + octaves, n)).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 5, 6, 8, 12, 16])
@pytest.mark.parametrize("octaves", [0.3, 1.5, 3.7, 7.2])
def test_codes_fit_decode_exactly_and_round_to_the_nearest_value(bits, octaves):
    s = _scales(bits, octaves)
    coded = encode_scales(s, bits)
    assert coded.codes.max() < 2 ** bits
    d = coded.decode()
    assert d.dtype == np.float32 and np.all(d > 0)
    # exactly an integer times a power of two, so any reader gets the same float32 value
    mant, exp = np.frexp(d.astype(np.float64))
    assert np.array_equal(np.ldexp(mant, exp).astype(np.float32), d)
    # idempotent: snapped scales are on the format and encode to the same values
    assert np.array_equal(snap_scales(d, bits), d)
    # nearest value of the format: an exhaustive list of the format's values is the oracle
    values = decode_scales(np.arange(2 ** bits), bits, coded.top, coded.exp_bits)
    in_range = s >= values.min()
    nearest = values[np.argmin(np.abs(values[None, :].astype(np.float64) - s[in_range, None]), axis=1)]
    s64 = s[in_range].astype(np.float64)
    assert np.all(np.abs(d[in_range] - s64) <= np.abs(nearest - s64))    # as near as any value (ties either way)
    err = np.abs(d[in_range].astype(np.float64) / s[in_range] - 1)
    assert err.max() <= 2.0 ** -(coded.mant_bits + 1) * (1 + 1e-6)
    # below the format's range a scale is raised to the smallest value, never lowered
    assert np.all(d[~in_range] == values.min())


@pytest.mark.parametrize("start", [-7.0, -7.5])
@pytest.mark.parametrize("octaves", [0.3, 0.99, 1.4, 2.0, 3.7, 7.2])
def test_exponent_bits_are_the_fewest_that_span_the_scales(start, octaves):
    s = np.exp2(np.linspace(start, start + octaves, 50)).astype(np.float32)
    spanned = math.floor(math.log2(s.max())) - math.floor(math.log2(s.min())) + 1
    assert encode_scales(s, 8).exp_bits == math.ceil(math.log2(spanned))


def test_more_bits_never_round_worse():
    s = _scales(0, 3.0)
    errs = [np.abs(snap_scales(s, b).astype(np.float64) / s - 1).max() for b in range(5, BITS_MAX + 1)]
    assert all(b <= a for a, b in zip(errs, errs[1:]))
    assert snap_scales(s, None) is not None and np.array_equal(snap_scales(s, None), s)


def test_bad_scales_and_bits_are_refused():
    with pytest.raises(ValueError, match="positive and finite"):
        encode_scales(np.array([0.1, 0.0], np.float32), 8)
    with pytest.raises(ConfigError, match=r"scale_bits=3 is not allowed: expected null \(float32 scales\) or an "
                                          r"integer 4..16"):
        QuantSpec(4, scale_bits=3)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("strategy", [RangeWeightQuantizer, LsqWeightQuantizer])
def test_a_frozen_quantizer_computes_with_the_snapped_scale(scheme, strategy):
    """Freezing puts the scale on the k-bit format; the zero point is the one `qparams` gives for
    that scale, and the fake-quant output is the numpy grid of that scale and zero point."""
    spec = QuantSpec(4, scheme, "per_channel", scale_bits=6)
    w = np.random.default_rng(3).normal(size=(30, 12)).astype(np.float32) \
        * np.exp2(np.linspace(-3, 1, 12)).astype(np.float32)
    layer = tf.keras.layers.Layer()
    q = strategy(spec)
    q.build(layer, "kernel", w.shape)
    q.init_from(w)
    q.freeze(tf.constant(w))
    scale, zp = (t.numpy() for t in q.scale_zero_point(tf.constant(w)))
    assert np.array_equal(snap_scales(scale, 6), scale)
    if strategy is RangeWeightQuantizer:
        lo, hi = w.min(axis=0, keepdims=True), w.max(axis=0, keepdims=True)
        exact, _ = qparams(lo, hi, spec)
        assert np.array_equal(scale, snap_scales(exact, 6))
        if scheme == "asymmetric":
            np.testing.assert_array_equal(zp, np.clip(np.round(-np.minimum(lo, 0) / scale), 0, 15))
    codes = quantize_np(w, scale, zp, spec)
    np.testing.assert_array_equal(q(tf.constant(w)).numpy(), scale * (codes - zp))
