"""The quantization math against independent oracles (the study's formula transcribed, TF's own
fake-quant op) and its defining properties."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError, DataError
from qat.quant.ops import fake_quant, fused_fake_quant, lsq_fake_quant
from qat.quant.reference import dequantize_np, error_stats, estimate_range, fake_quant_np, qparams, quantize_np
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs

BITS = list(range(2, 17))
SCHEMES = [("asymmetric", False), ("symmetric", False), ("symmetric", True)]


def _rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _study_fake_quant(w, b):
    """The study notebook's per-tensor asymmetric min-max formula, transcribed literally."""
    w = np.asarray(w, np.float32)
    scale = (w.max() - w.min()) / np.float32(2 ** b - 1)
    zero_point = np.round(-w.min() / scale)
    q = np.clip(np.round(w / scale + zero_point), 0, 2 ** b - 1)
    return scale * (q - zero_point)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), r"^bits=1 is not allowed: expected an integer 2\.\.16$"),
    (dict(bits=17), "bits=17 is not allowed"),
    (dict(bits=4.0), "bits=4.0 is not allowed"),
    (dict(bits=True), "bits=True is not allowed"),
    (dict(bits=4, scheme="signed"), "scheme='signed' is not allowed: expected one of asymmetric, symmetric"),
    (dict(bits=4, granularity="per_row"), "granularity='per_row' is not allowed: expected one of per_tensor"),
    (dict(bits=4, estimator="kl"), "estimator='kl' is not allowed: expected one of minmax, percentile, mse"),
    (dict(bits=4, percentile=40), r"percentile=40 is not allowed: expected a number in \(50, 100\]"),
    (dict(bits=4, axis="last"), "axis='last' is not allowed"),
    (dict(bits=4, narrow_range=True), "narrow_range=True is not allowed with scheme='asymmetric'"),
])
def test_bad_spec_gives_one_line_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        QuantSpec(**kwargs)
    assert "\n" not in str(err.value)


def test_spec_round_trips_through_config_and_rejects_unknown_keys():
    spec = QuantSpec(3, scheme="symmetric", granularity="per_channel", axis=0, estimator="mse", narrow_range=True)
    assert QuantSpec.from_config(spec.to_config()) == spec
    with pytest.raises(ConfigError, match=r"key\(s\) \['bitz'\] are not allowed"):
        QuantSpec.from_config({"bitz": 4})


def test_bad_axis_for_tensor_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="axis=2 is not allowed for a 2-D tensor"):
        estimate_range(_rand((4, 5)), QuantSpec(4, granularity="per_channel", axis=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_clearly(bad):
    x = _rand((10, 10))
    x[3, 4] = bad
    with pytest.raises(DataError, match=r"cannot quantize a tensor with \d NaN and \d Inf values"):
        fake_quant_np(x, QuantSpec(4))


# ---------------------------------------------------------------- oracles

@pytest.mark.parametrize("bits", BITS)
def test_numpy_reference_equals_the_study_formula(bits):
    x = _rand((64, 40), seed=bits)
    np.testing.assert_array_equal(fake_quant_np(x, QuantSpec(bits)), _study_fake_quant(x, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme, narrow", SCHEMES)
@pytest.mark.parametrize("granularity, axis", [("per_tensor", -1), ("per_channel", -1), ("per_channel", 0)])
def test_tf_op_equals_numpy_reference_bit_for_bit(bits, scheme, narrow, granularity, axis):
    spec = QuantSpec(bits, scheme=scheme, narrow_range=narrow, granularity=granularity, axis=axis)
    x = _rand((24, 16), seed=bits) * np.linspace(0.1, 3, 16, dtype=np.float32)
    scale, zp = qparams(*estimate_range(x, spec), spec)
    ours = fake_quant(tf.constant(x), scale, zp, spec.qmin, spec.qmax).numpy()
    np.testing.assert_array_equal(ours, fake_quant_np(x, spec))


def _oracle(x, lo, hi, spec, scale, zp, per_channel=False):
    """TF's own fake-quant. Asymmetric: given the raw [lo, hi] (TF nudges it so zero is exact, which is
    our zero-point rounding). Symmetric: given [scale*qmin, scale*qmax], on TF's code range (narrow or not)."""
    if spec.scheme == "asymmetric":
        mn, mx = lo.ravel(), hi.ravel()
    else:
        mn, mx = (scale * (spec.qmin - zp)).ravel(), (scale * (spec.qmax - zp)).ravel()
    if per_channel:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, mn, mx, num_bits=spec.bits, narrow_range=spec.narrow_range).numpy()
    return tf.quantization.fake_quant_with_min_max_vars(x, float(mn[0]), float(mx[0]), num_bits=spec.bits,
                                                        narrow_range=spec.narrow_range).numpy()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme, narrow", SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_tf_op_agrees_with_tf_fake_quant_with_min_max_vars(bits, scheme, narrow, per_channel):
    """The two definitions coincide when the range contains 0 (TF would otherwise shift a range such as
    [0.5, 2] to [0, 1.5], while we widen it to [0, 2]), for the asymmetric and the symmetric schemes.
    They differ only in float32 rounding: TF rebuilds the scale from min/max (an ulp apart, hence the
    relative tolerance) and computes (x - min) * (1/scale), so values at a rounding tie can land one
    step apart; TF also rounds ties up, we round them to even. Anything else is a bug."""
    spec = QuantSpec(bits, scheme=scheme, narrow_range=narrow,
                     granularity="per_channel" if per_channel else "per_tensor")
    x = _rand((256, 32), seed=100 + bits) * np.linspace(0.2, 2.0, 32, dtype=np.float32)
    lo, hi = estimate_range(x, spec)
    assert np.all(lo < 0) and np.all(hi > 0)
    scale, zp = qparams(lo, hi, spec)
    ours = fake_quant(tf.constant(x), scale, zp, spec.qmin, spec.qmax).numpy()
    oracle = _oracle(x, lo, hi, spec, scale, zp, per_channel)
    step = np.broadcast_to(scale, x.shape)
    diff = np.abs(ours - oracle)
    same = diff <= 1e-2 * step
    off = ~same
    assert np.all(np.abs(diff[off] - step[off]) <= 1e-2 * step[off]), "more than one step apart"
    v = x / scale + zp
    assert np.all(np.abs(v[off] - np.floor(v[off]) - 0.5) < 2e-2), "one step apart away from a rounding tie"
    assert off.mean() < 0.01


def test_ste_gradient_is_one_inside_zero_outside_and_matches_tf():
    spec = QuantSpec(4)
    x = np.linspace(-3, 3, 601).astype(np.float32)
    lo, hi = np.float32(-1.5), np.float32(1.0)
    scale, zp = qparams(lo, hi, spec)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        ours = fake_quant(xt, scale, zp, spec.qmin, spec.qmax)
        theirs = tf.quantization.fake_quant_with_min_max_vars(xt, float(lo), float(hi), num_bits=4)
    g = tape.gradient(ours, xt).numpy()
    g_tf = tape.gradient(theirs, xt).numpy()
    inside = (x >= scale * (spec.qmin - zp)) & (x <= scale * (spec.qmax - zp))
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    np.testing.assert_array_equal(g, g_tf)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme, narrow", SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quant_equals_tf_per_channel_kernel_and_passes_gradient_inside(bits, scheme, narrow, per_channel):
    """The time loop's activation fake-quant (per channel: mapped to the unit grid, FakeQuantWithMinMaxArgs,
    mapped back) against TensorFlow's own FakeQuantWithMinMaxVars(PerChannel) kernel and the numpy
    reference: the same values up to float32 ties (one step, rarely), gradient 1 inside the range, 0 outside."""
    spec = QuantSpec(bits, scheme=scheme, narrow_range=narrow,
                     granularity="per_channel" if per_channel else "per_tensor")
    x = _rand((256, 32), seed=200 + bits) * np.linspace(0.2, 2.0, 32, dtype=np.float32)
    lo, hi = estimate_range(x, spec)
    lo, hi = 0.7 * lo, 0.7 * hi                        # clip some values: the gradient's zero region
    scale, zp = qparams(lo, hi, spec)
    scale, zp = scale.reshape(-1), zp.reshape(-1)
    if not per_channel:
        scale, zp = scale[0], zp[0]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ours = fused_fake_quant(tf.constant(scale), tf.constant(zp), spec)(xt)
    grad = tape.gradient(ours, xt, output_gradients=tf.ones_like(xt)).numpy()
    ours = ours.numpy()
    t_lo, t_hi = scale * (spec.qmin - zp), scale * (spec.qmax - zp)
    kernel = (tf.quantization.fake_quant_with_min_max_vars_per_channel if per_channel
              else tf.quantization.fake_quant_with_min_max_vars)
    oracle = kernel(xt, t_lo, t_hi, num_bits=bits, narrow_range=narrow).numpy()
    step = np.broadcast_to(scale, x.shape)
    for other in (oracle, fake_quant_np(x, spec, lo, hi)):
        off = np.abs(ours - other) > 1e-3 * step
        assert np.all(np.abs(np.abs(ours - other)[off] - step[off]) <= 1e-2 * step[off]), "more than one step apart"
        assert off.mean() < 0.01
    inside = (x >= t_lo - 1e-6 * step) & (x <= t_hi + 1e-6 * step)
    assert inside.any() and (~inside).any()
    edge = np.minimum(np.abs(x - t_lo), np.abs(x - t_hi)) < 1e-4 * step    # float32 ties at the range ends
    np.testing.assert_array_equal(grad[~edge], inside[~edge].astype(np.float32))


def test_fused_fake_quant_folds_an_affine_map_before_it():
    """`pre=(a, b)` quantizes v * a + b (the LSTM gates from one sigmoid): the same values as mapping
    first, and the gradient a inside the range."""
    spec = QuantSpec(4, granularity="per_channel")
    rng = np.random.default_rng(3)
    v = tf.constant(rng.uniform(0, 1, size=(128, 8)).astype(np.float32))
    a = np.array([1, 1, 2, 2, 1, 1, 2, 2], np.float32)
    b = np.array([0, 0, -1, -1, 0, 0, -1, -1], np.float32)
    lo, hi = np.full(8, -0.8, np.float32), np.full(8, 0.9, np.float32)
    scale, zp = (tf.constant(t.reshape(-1)) for t in qparams(lo, hi, spec))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(v)
        folded = fused_fake_quant(scale, zp, spec, pre=(tf.constant(a), tf.constant(b)))(v)
        mapped = fused_fake_quant(scale, zp, spec)(v * a + b)
    step = scale.numpy()
    off = np.abs(folded.numpy() - mapped.numpy()) > 1e-3 * step
    assert off.mean() < 0.01
    x = v.numpy() * a + b
    inside = (x >= step * (spec.qmin - zp.numpy())) & (x <= step * (spec.qmax - zp.numpy()))
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(tape.gradient(folded, v).numpy(), a * inside, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(folded, v).numpy(), tape.gradient(mapped, v).numpy(), atol=1e-6)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme, narrow", SCHEMES)
def test_at_most_2_to_the_b_values_zero_exact_and_idempotent(bits, scheme, narrow):
    spec = QuantSpec(bits, scheme=scheme, narrow_range=narrow)
    x = np.concatenate([_rand(4000, seed=bits, scale=2.0), np.zeros(5, np.float32)])
    scale, zp = qparams(*estimate_range(x, spec), spec)
    x_hat = fake_quant_np(x, spec)
    assert len(np.unique(x_hat)) <= 2 ** bits - (1 if narrow else 0)
    assert np.all(x_hat[-5:] == 0.0)
    q = quantize_np(x, scale, zp, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax and q.dtype == np.int32
    np.testing.assert_array_equal(dequantize_np(q, scale, zp), x_hat)
    np.testing.assert_array_equal(dequantize_np(quantize_np(x_hat, scale, zp, spec), scale, zp), x_hat)
    again = fake_quant(tf.constant(x_hat), scale, zp, spec.qmin, spec.qmax).numpy()
    np.testing.assert_array_equal(again, x_hat)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_error_does_not_increase_with_bits(scheme, estimator):
    x = _rand((64, 50), seed=7)
    mse = [error_stats(x, fake_quant_np(x, QuantSpec(b, scheme=scheme, estimator=estimator)))["mse"]
           for b in BITS]
    assert all(a >= b for a, b in zip(mse, mse[1:])), mse


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [0, -1])
def test_per_channel_error_at_most_per_tensor(bits, axis):
    x = _rand((80, 320), seed=bits)
    x *= np.geomspace(0.05, 2.0, x.shape[axis], dtype=np.float32).reshape((-1, 1) if axis == 0 else (1, -1))
    per_tensor = error_stats(x, fake_quant_np(x, QuantSpec(bits)))["mse"]
    per_channel = error_stats(x, fake_quant_np(x, QuantSpec(bits, granularity="per_channel", axis=axis)))["mse"]
    assert per_channel <= per_tensor


def test_per_channel_ranges_are_per_output_column():
    x = _rand((7, 5))
    lo, hi = estimate_range(x, QuantSpec(4, granularity="per_channel", axis=-1))
    assert lo.shape == hi.shape == (1, 5)
    np.testing.assert_array_equal(lo.ravel(), np.minimum(x.min(0), 0))
    np.testing.assert_array_equal(hi.ravel(), np.maximum(x.max(0), 0))


def test_zero_range_and_constant_tensors_are_exact():
    for spec in (QuantSpec(4), QuantSpec(4, scheme="symmetric"), QuantSpec(3, granularity="per_channel")):
        zeros = np.zeros((6, 3), np.float32)
        np.testing.assert_array_equal(fake_quant_np(zeros, spec), zeros)
        const = np.full((6, 3), -0.7, np.float32)
        np.testing.assert_allclose(fake_quant_np(const, spec), const, rtol=1e-6)
    x = _rand((6, 3))
    x[:, 1] = 0.0                                       # one all-zero channel among live ones
    spec = QuantSpec(4, granularity="per_channel")
    scale, zp = qparams(*estimate_range(x, spec), spec)
    assert np.all(np.isfinite(scale)) and scale[0, 1] == 1.0
    out = fake_quant(tf.constant(x), scale, zp, spec.qmin, spec.qmax).numpy()
    assert np.all(out[:, 1] == 0) and np.all(np.isfinite(out))


def test_range_that_excludes_zero_is_widened_to_contain_it():
    spec = QuantSpec(4)
    x = np.linspace(0.5, 2.0, 50).astype(np.float32)
    lo, hi = estimate_range(x, spec)
    assert lo == 0 and hi == np.float32(2.0)
    with pytest.raises(ConfigError, match="range lo=3.0 > hi=1.0 is not allowed"):
        qparams(np.float32(3), np.float32(1), spec)


def test_percentile_clips_outliers_and_100_is_minmax():
    x = _rand(10000, seed=3)
    x[0] = 50.0
    lo_mm, hi_mm = estimate_range(x, QuantSpec(4))
    lo_p, hi_p = estimate_range(x, QuantSpec(4, estimator="percentile", percentile=99.9))
    assert hi_p < 5 < hi_mm == 50.0
    np.testing.assert_allclose(hi_p, np.percentile(x, 99.9), rtol=1e-6)
    np.testing.assert_allclose(lo_p, np.percentile(x, 0.1), rtol=1e-6)
    lo_100, hi_100 = estimate_range(x, QuantSpec(4, estimator="percentile", percentile=100))
    np.testing.assert_array_equal([lo_100, hi_100], [lo_mm, hi_mm])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_mse_estimator_beats_minmax_and_is_a_grid_optimum(bits, granularity):
    x = _rand((200, 4), seed=bits)
    x[0] = 8.0                                           # an outlier per channel: clipping pays
    mm, ms = (QuantSpec(bits, granularity=granularity, estimator=e) for e in ("minmax", "mse"))
    axes = 0 if granularity == "per_channel" else None
    err = lambda spec, lo=None, hi=None: np.mean((fake_quant_np(x, spec, lo, hi) - x) ** 2, axis=axes)
    assert np.all(err(ms) <= err(mm))
    lo, hi = estimate_range(x, ms)
    for shrink in (0.9, 1.1):                            # neighbours of the chosen range are not better
        lo_mm, hi_mm = estimate_range(x, mm)
        assert np.all(err(ms, lo, hi) <= err(ms, np.maximum(lo * shrink, lo_mm), np.minimum(hi * shrink, hi_mm)))


def test_error_stats_formulas():
    x = np.array([1.0, -2.0, 3.0, 0.0])
    x_hat = np.array([1.5, -2.0, 2.0, 0.0])
    s = error_stats(x, x_hat)
    assert s["mae"] == pytest.approx(1.5 / 4) and s["mse"] == pytest.approx(1.25 / 4)
    assert s["sqnr_db"] == pytest.approx(10 * np.log10(14 / 1.25))
    assert error_stats(x, x)["sqnr_db"] == np.inf


def test_study_4bit_example_per_tensor_mae_mse():
    """The study's PTQ figure: per-tensor 4-bit asymmetric min-max MAE/MSE of the seed model's five
    weight tensors, from the transcribed formula vs our pipeline (glorot/orthogonal seed weights)."""
    keras.utils.set_random_seed(0)
    model = build_model((49, 257), 3, specs.model())
    model.get_layer("lstm").cell.bias.assign(_rand(320, seed=5) * 0.1)   # a bias with both signs
    tensors = [model.get_layer("lstm").cell.kernel, model.get_layer("lstm").cell.recurrent_kernel,
               model.get_layer("lstm").cell.bias, model.get_layer("dense").kernel]
    for w in (t.numpy() for t in tensors):
        assert w.min() < 0 < w.max()
        study = _study_fake_quant(w, 4)
        expected = {"mae": np.mean(np.abs(study - w)), "mse": np.mean((study - w) ** 2)}
        ours = error_stats(w, fake_quant_np(w, QuantSpec(4)))
        assert ours["mae"] == pytest.approx(expected["mae"], rel=1e-6)
        assert ours["mse"] == pytest.approx(expected["mse"], rel=1e-6)
        assert 0 < ours["mse"] < (w.max() - w.min()) ** 2 / 15 ** 2 / 12 * 1.5   # ~ step^2/12


# ---------------------------------------------------------------- learned step size

def test_lsq_forward_equals_fake_quant_and_gradients_follow_lsq():
    spec = QuantSpec(3)
    x = _rand(500, seed=11)
    scale, offset, g = tf.constant(0.2), tf.constant(3.3), 0.05
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch([xt, scale, offset])
        y = lsq_fake_quant(xt, scale, offset, spec.qmin, spec.qmax, g)
        loss = tf.reduce_sum(y * np.linspace(-1, 1, 500).astype(np.float32))
    dx, ds, do = tape.gradient(loss, [xt, scale, offset])
    z = np.float32(3.0)                                   # round(3.3)
    np.testing.assert_array_equal(y.numpy(), fake_quant(xt, 0.2, z, spec.qmin, spec.qmax).numpy())
    dy = np.linspace(-1, 1, 500).astype(np.float32)
    v = x / np.float32(0.2) + z
    inside, below = (v >= spec.qmin) & (v <= spec.qmax), v < spec.qmin
    assert below.any() and (v > spec.qmax).any()
    ds_ref = np.where(inside, np.round(v) - v, np.where(below, spec.qmin - z, spec.qmax - z))
    np.testing.assert_allclose(ds.numpy(), g * np.sum(dy * ds_ref), rtol=1e-4)
    np.testing.assert_allclose(do.numpy(), g * np.sum(np.where(inside, 0, -0.2 * dy)), rtol=1e-4)
    np.testing.assert_array_equal(dx.numpy(), np.where(inside, dy, 0))


def test_lsq_scale_learns_to_reduce_quantization_error():
    x = tf.constant(_rand(2000, seed=12))
    scale = tf.Variable(2.0)                              # far too coarse a step for 3 bits
    offset = tf.Variable(3.0)
    errors = []
    for _ in range(60):
        with tf.GradientTape() as tape:
            err = tf.reduce_mean((lsq_fake_quant(x, scale, offset, 0, 7, 1.0) - x) ** 2)
        ds, do = tape.gradient(err, [scale, offset])
        scale.assign_sub(0.5 * ds)
        offset.assign_sub(0.5 * do)
        errors.append(float(err))
    assert errors[-1] < 0.3 * errors[0]
