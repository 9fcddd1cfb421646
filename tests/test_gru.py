"""QGRU: exactly the Keras GRU (both reset_after modes) when quantization is off, and exactly "a GRU
with fake-quantized weights / activations" when it is on (checked against Keras with pre-quantized
weights and against a numpy GRU with the quantizers written out); learned step sizes train; the
twin of a GRU model saves, loads, packs and calibrates."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from qat.algorithms.bias_correction import bias_correct
from qat.algorithms.calibration import calibrate
from qat.errors import ConfigError
from qat.export.packed import load_packed_model, write_packed_model
from qat.layers.gru import GATES, QGRU
from qat.layers.model import QuantConfig, freeze_ranges, quantize_model, quantized_weights, weight_tensor_names
from qat.quant.quantizers import LSQ
from qat.quant.reference import fake_quant_np, qparams
from qat.quant.spec import QuantSpec
from tests.sequences import B, F, T, U, random_ranges, sequences

_x = sequences


def _float_gru(x, return_sequences=True, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    gru = keras.layers.GRU(U, return_sequences=return_sequences, **kwargs)
    gru(x)
    if gru.cell.use_bias:
        gru.cell.bias.assign(np.random.default_rng(seed).normal(size=gru.cell.bias.shape).astype(np.float32) * 0.5)
    return gru


def _twin(gru, x, strategy="range", **specs):
    q = QGRU.from_float(gru, specs, strategy)
    q(x)
    q.copy_float_weights(gru)
    return q


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _numpy_gru(x, kernel, rec, bias, reset_after, fq=lambda name, v: v):
    """Reference GRU in numpy (Keras' equations) with a fake-quant function `fq(name, value)` at every
    quantization point."""
    x = fq("input", x)
    in_b, rec_b = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
    h = np.zeros((x.shape[0], U), np.float32)
    out = []
    for t in range(x.shape[1]):
        xz = x[:, t] @ kernel + in_b
        if reset_after:
            hz = h @ rec + rec_b
            z = fq("gate_z", _sigmoid(xz[:, :U] + hz[:, :U]))
            r = fq("gate_r", _sigmoid(xz[:, U:2 * U] + hz[:, U:2 * U]))
            n = fq("gate_h", np.tanh(xz[:, 2 * U:] + r * hz[:, 2 * U:]))
        else:
            z = fq("gate_z", _sigmoid(xz[:, :U] + h @ rec[:, :U]))
            r = fq("gate_r", _sigmoid(xz[:, U:2 * U] + h @ rec[:, U:2 * U]))
            n = fq("gate_h", np.tanh(xz[:, 2 * U:] + (r * h) @ rec[:, 2 * U:]))
        h = fq("state_h", z * h + (1 - z) * n)
        out.append(h)
    return np.stack(out, 1)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"recurrent_activation": "hard_sigmoid", "activation": "relu"},
                                    {"use_bias": False}])
def test_quantization_off_equals_keras_gru(reset_after, return_sequences, kwargs):
    x = _x(1) if kwargs.get("activation") != "relu" else _x(1) * 0.3
    gru = _float_gru(x, return_sequences, seed=2, reset_after=reset_after, **kwargs)
    q = _twin(gru, x)
    np.testing.assert_allclose(q(x).numpy(), gru(x).numpy(), atol=1e-6, rtol=0)
    with tf.GradientTape(persistent=True) as tape:
        loss_k, loss_q = tf.reduce_sum(gru(x) ** 2), tf.reduce_sum(q(x) ** 2)
    for mine, theirs in [(q.kernel, gru.cell.kernel), (q.recurrent_kernel, gru.cell.recurrent_kernel)]:
        np.testing.assert_allclose(tape.gradient(loss_q, mine).numpy(), tape.gradient(loss_k, theirs).numpy(),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reset_after", [True, False])
def test_numpy_oracle_is_keras_gru(reset_after):
    """The oracle itself: with no quantizer it is Keras' GRU."""
    x = _x(7)
    gru = _float_gru(x, seed=7, reset_after=reset_after)
    ref = _numpy_gru(x, gru.cell.kernel.numpy(), gru.cell.recurrent_kernel.numpy(), gru.cell.bias.numpy(), reset_after)
    np.testing.assert_allclose(ref, gru(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, scheme="symmetric", granularity="per_channel"),
                                  QuantSpec(2, estimator="mse")])
@pytest.mark.parametrize("reset_after", [True, False])
def test_weight_quantization_equals_keras_gru_with_prequantized_weights(spec, reset_after):
    x = _x(3)
    gru = _float_gru(x, reset_after=reset_after)
    q = _twin(gru, x, kernel=spec, recurrent_kernel=spec, bias=QuantSpec(8, granularity="per_channel"))
    ref = keras.layers.GRU(U, return_sequences=True, reset_after=reset_after)
    ref(x)
    ref.set_weights([fake_quant_np(gru.cell.kernel.numpy(), spec),
                     fake_quant_np(gru.cell.recurrent_kernel.numpy(), spec),
                     fake_quant_np(gru.cell.bias.numpy(), QuantSpec(8, granularity="per_channel"))])
    np.testing.assert_allclose(q(x).numpy(), ref(x).numpy(), atol=2e-6, rtol=0)
    assert np.abs(q(x).numpy() - gru(x).numpy()).max() > 1e-4      # quantization did something


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_activation_and_state_quantization_equals_numpy_reference(granularity, reset_after):
    x = _x(4)
    gru = _float_gru(x, seed=4, reset_after=reset_after)
    spec = QuantSpec(8, granularity=granularity)
    q = _twin(gru, x, input=spec, gate=spec, state=spec)
    assert set(q.activation_quantizers) == {"input", *GATES, "state_h"}
    np.testing.assert_allclose(q(x).numpy(), gru(x).numpy(), atol=1e-6)   # uncalibrated: pass-through
    ranges = random_ranges(q, granularity)
    ref = _numpy_gru(x, gru.cell.kernel.numpy(), gru.cell.recurrent_kernel.numpy(), gru.cell.bias.numpy(),
                     reset_after, lambda name, v: fake_quant_np(v, spec, *ranges[name]))
    out = q(x).numpy()
    scale, zp = qparams(*ranges["state_h"], spec)
    # a float32 rounding-order difference may flip one rounding decision; allow one step, rarely
    assert np.abs(out - ref).max() <= 1.01 * float(np.max(scale))
    assert np.mean(np.abs(out - ref) > 1e-6) < 0.01
    codes = out / scale + zp                                  # h lies on its quantization grid
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)


def test_quantized_gates_have_at_most_2_to_the_b_levels():
    x = _x(8)
    gru = _float_gru(x, seed=8)
    q = _twin(gru, x, gate=QuantSpec(3), state=QuantSpec(3))
    values = q.calibration_values(x)
    for name, aq in q.activation_quantizers.items():
        aq.set_range(float(np.min(values[name])), float(np.max(values[name])))
    out = q(x).numpy()
    assert len(np.unique(np.round(out, 6))) <= 2 ** 3


def test_straight_through_and_learned_step_sizes_train():
    """STE: gradients reach the weights through quantized weights, gates and state; LSQ: the step
    sizes of weights and activations get gradients too, and a few steps of training lower the loss."""
    x = _x(9)
    y = np.random.default_rng(9).normal(size=(B, T, U)).astype(np.float32) * 0.3
    gru = _float_gru(x, seed=9)
    w = QuantSpec(3, granularity="per_channel")
    for strategy in ("range", LSQ):
        q = _twin(gru, x, strategy, kernel=w, recurrent_kernel=w, gate=QuantSpec(4), state=QuantSpec(4))
        calib = q.calibration_values(x)
        for name, aq in q.activation_quantizers.items():
            aq.set_range(float(np.min(calib[name])), float(np.max(calib[name])))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((q(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, q.trainable_variables)
        named = {v.name.split("/")[-1].split(":")[0]: g for v, g in zip(q.trainable_variables, grads)}
        assert all(g is not None for g in named.values()), [k for k, g in named.items() if g is None]
        # weights and step sizes always get a gradient; an offset only where values clip at its range
        assert all(np.any(g.numpy() != 0) for k, g in named.items() if not k.endswith("_offset")), named
        if strategy is LSQ:
            assert len(named) > 3                 # the learned step sizes are trainable variables
        opt = keras.optimizers.Adam(0.01)
        first = float(loss)
        for _ in range(20):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((q(x, training=True) - y) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, q.trainable_variables), q.trainable_variables))
        assert float(loss) < first


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_go_backwards_equals_keras_gru(reset_after, return_sequences):
    x = _x(14)
    gru = _float_gru(x, return_sequences, seed=14, go_backwards=True, reset_after=reset_after)
    np.testing.assert_allclose(_twin(gru, x)(x).numpy(), gru(x).numpy(), atol=1e-6)


def test_unsupported_gru_options_are_refused():
    for kwargs in ({"return_state": True}, {"stateful": True, "batch_input_shape": (B, T, F)}):
        with pytest.raises(ConfigError, match="GRU layer"):
            QGRU.from_float(keras.layers.GRU(U, **kwargs), {})


def _gru_model(reset_after=True):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((T, F))
    h = keras.layers.GRU(U, return_sequences=True, reset_after=reset_after, name="gru")(inputs)
    h = keras.layers.GRU(U, return_sequences=True, name="gru_1")(h)
    out = keras.layers.Dense(3, activation="softmax", name="dense")(keras.layers.Flatten()(h))
    return keras.Model(inputs, out)


@pytest.mark.parametrize("reset_after", [True, False])
def test_quantize_model_of_a_gru_model_saves_packs_and_reloads(tmp_path, reset_after):
    x = _x(10, (32, T, F))
    model = _gru_model(reset_after)
    assert weight_tensor_names(model) == ["gru/kernel", "gru/recurrent_kernel", "gru/bias", "gru_1/kernel",
                                          "gru_1/recurrent_kernel", "gru_1/bias", "dense/kernel", "dense/bias"]
    np.testing.assert_allclose(quantize_model(model, QuantConfig())(x).numpy(), model(x).numpy(), atol=1e-6)
    w = QuantSpec(3, granularity="per_channel")
    cfg = QuantConfig(weights=w, bias=QuantSpec(8), inputs=QuantSpec(8), gates=QuantSpec(8), state=QuantSpec(8))
    qmodel = quantize_model(model, cfg)
    assert isinstance(qmodel.get_layer("gru"), QGRU) and qmodel.get_layer("gru").reset_after == reset_after
    calibrate(qmodel, [x])
    freeze_ranges(qmodel)
    codes = quantized_weights(qmodel)
    assert all(len(np.unique(t.codes[..., c])) <= 8 for n, t in codes.items() if "bias" not in n
               for c in range(t.codes.shape[-1]))
    expected = qmodel(x).numpy()
    saved = tmp_path / "twin.keras"
    qmodel.save(saved)
    loaded = keras.models.load_model(saved)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    size = write_packed_model(qmodel, str(tmp_path / "m.qlstm"))
    fresh = quantize_model(model, cfg)
    fresh(x)
    load_packed_model(fresh, str(tmp_path / "m.qlstm"))
    np.testing.assert_array_equal(fresh(x).numpy(), expected)
    assert size == (tmp_path / "m.qlstm").stat().st_size


@pytest.mark.parametrize("reset_after", [True, False])
def test_bias_correction_puts_each_shift_in_its_own_bias_row(reset_after):
    """GRU with reset_after: the input bias row takes -E[x] (W_q - W), the recurrent row -E[h] (R_q - R)
    (E[h]: the float layer's mean output); without it the one bias takes both."""
    x = _x(12, (64, T, F))
    model = _gru_model(reset_after)
    qmodel = quantize_model(model, QuantConfig(weights=QuantSpec(3, granularity="per_channel")))
    q = quantized_weights(qmodel)
    bias_correct(model, qmodel, x)
    w, r = model.get_layer("gru").cell.kernel.numpy(), model.get_layer("gru").cell.recurrent_kernel.numpy()
    h = keras.Model(model.inputs, model.get_layer("gru").output)(x).numpy()
    in_shift = x.reshape(-1, F).astype(np.float64).mean(0) @ (q["gru/kernel"].values - w)
    rec_shift = h.reshape(-1, U).astype(np.float64).mean(0) @ (q["gru/recurrent_kernel"].values - r)
    expected = np.stack([in_shift, rec_shift]) if reset_after else in_shift + rec_shift
    change = qmodel.get_layer("gru").bias.numpy() - model.get_layer("gru").cell.bias.numpy()
    np.testing.assert_allclose(change, -expected, atol=1e-5)
