"""QLSTM: exactly the Keras LSTM when quantization is off, and exactly "an LSTM with fake-quantized
weights / activations" when it is on (checked against Keras with pre-quantized weights and against a
numpy LSTM with the quantizers written out)."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.lstm import GATES, QLSTM
from qat.quant.quantizers import LSQ, concat_params
from qat.quant.reference import fake_quant_np, qparams
from qat.quant.spec import QuantSpec
from tests.sequences import B, F, T, U, random_ranges, sequences

_x = sequences


def _float_lstm(x, return_sequences=True, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    lstm = keras.layers.LSTM(U, return_sequences=return_sequences, **kwargs)
    lstm(x)
    lstm.cell.bias.assign(np.random.default_rng(seed).normal(size=4 * U).astype(np.float32) * 0.5)
    return lstm


def _twin(lstm, x, **specs):
    q = QLSTM.from_float(lstm, specs)
    q(x)
    q.copy_float_weights(lstm)
    return q


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"recurrent_activation": "hard_sigmoid", "activation": "relu"},
                                    {"use_bias": False}])
def test_quantization_off_equals_keras_lstm(return_sequences, kwargs):
    x = _x(1) if kwargs.get("activation") != "relu" else _x(1) * 0.3
    lstm = keras.layers.LSTM(U, return_sequences=return_sequences, **kwargs)
    lstm(x)
    if lstm.cell.use_bias:
        lstm.cell.bias.assign(np.random.default_rng(2).normal(size=4 * U).astype(np.float32) * 0.5)
    q = _twin(lstm, x)
    np.testing.assert_allclose(q(x).numpy(), lstm(x).numpy(), atol=1e-6, rtol=0)
    with tf.GradientTape(persistent=True) as tape:
        loss_k, loss_q = tf.reduce_sum(lstm(x) ** 2), tf.reduce_sum(q(x) ** 2)
    np.testing.assert_allclose(tape.gradient(loss_q, q.kernel).numpy(),
                               tape.gradient(loss_k, lstm.cell.kernel).numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, scheme="symmetric", granularity="per_channel"),
                                  QuantSpec(2, estimator="mse"), QuantSpec(8, estimator="percentile", percentile=99)])
def test_weight_quantization_equals_keras_lstm_with_prequantized_weights(spec):
    x = _x(3)
    lstm = _float_lstm(x)
    q = _twin(lstm, x, kernel=spec, recurrent_kernel=spec, bias=QuantSpec(8))
    ref = keras.layers.LSTM(U, return_sequences=True)
    ref(x)
    ref.set_weights([fake_quant_np(lstm.cell.kernel.numpy(), spec),
                     fake_quant_np(lstm.cell.recurrent_kernel.numpy(), spec),
                     fake_quant_np(lstm.cell.bias.numpy(), QuantSpec(8))])
    np.testing.assert_allclose(q(x).numpy(), ref(x).numpy(), atol=2e-6, rtol=0)
    assert np.abs(q(x).numpy() - lstm(x).numpy()).max() > 1e-4      # quantization did something


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _numpy_quant_lstm(x, kernel, rec, bias, fq):
    """Reference LSTM in numpy with a fake-quant function `fq(name, value)` at every point."""
    x = fq("input", x)
    h = np.zeros((x.shape[0], U), np.float32)
    c = np.zeros_like(h)
    out = []
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + bias + h @ rec
        i, f, g, o = (fq(n, v) for n, v in zip(GATES, (_sigmoid(z[:, :U]), _sigmoid(z[:, U:2 * U]),
                                                        np.tanh(z[:, 2 * U:3 * U]), _sigmoid(z[:, 3 * U:]))))
        c = fq("state_c", f * c + i * g)
        h = fq("state_h", o * np.tanh(c))
        out.append(h)
    return np.stack(out, 1)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_activation_and_state_quantization_equals_numpy_reference(granularity):
    x = _x(4)
    lstm = _float_lstm(x, seed=4)
    spec = QuantSpec(8, granularity=granularity)
    q = _twin(lstm, x, input=spec, gate=spec, state=spec)
    np.testing.assert_allclose(q(x).numpy(), lstm(x).numpy(), atol=1e-6)   # uncalibrated: pass-through
    ranges = random_ranges(q, granularity)

    def fq(name, v):
        return fake_quant_np(v, spec, *ranges[name])

    ref = _numpy_quant_lstm(x, lstm.cell.kernel.numpy(), lstm.cell.recurrent_kernel.numpy(),
                            lstm.cell.bias.numpy(), fq)
    out = q(x).numpy()
    step = float(np.max(qparams(*ranges["state_h"], spec)[0]))
    # a float32 rounding-order difference may flip one rounding decision; allow one step, rarely
    assert np.abs(out - ref).max() <= 1.01 * step
    assert np.mean(np.abs(out - ref) > 1e-6) < 0.01
    for name in GATES + ("state_c", "state_h"):        # values lie on the quantization grid
        assert name in q.activation_quantizers
    scale, zp = qparams(*ranges["state_h"], spec)
    codes = out / scale + zp
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    # one quantizer back to pass-through (the layer then runs its loop with per-quantizer selects)
    q.activation_quantizers["state_h"].reset()
    ref = _numpy_quant_lstm(x, lstm.cell.kernel.numpy(), lstm.cell.recurrent_kernel.numpy(),
                            lstm.cell.bias.numpy(), lambda name, v: v if name == "state_h" else fq(name, v))
    out = q(x).numpy()
    assert np.mean(np.abs(out - ref) > 1e-5) < 0.01
    assert np.mean(np.abs(out / scale + zp - np.round(out / scale + zp)) > 1e-3) > 0.5   # h is off the grid


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_gates_from_one_sigmoid_equal_the_four_activations_with_gradients(granularity):
    """Calibrated fixed-range gates with tanh / sigmoid take the one-sigmoid path (tanh as a scaled
    sigmoid, folded into the fake-quant); any other activation function object takes the general
    path. Same outputs (up to a rare float32 tie) and the same weight gradients."""
    x = _x(11)
    lstm = _float_lstm(x, seed=11)
    spec, w = QuantSpec(4, granularity=granularity), QuantSpec(3, granularity="per_channel")
    specs = dict(kernel=w, recurrent_kernel=w, bias=QuantSpec(8), input=spec, gate=spec, state=spec)
    fast = _twin(lstm, x, **specs)
    general = QLSTM.from_float(lstm, specs)
    general.activation = lambda t: tf.math.tanh(t)          # not keras.activations.tanh: general path
    general(x)
    general.copy_float_weights(lstm)
    rng = np.random.default_rng(11)
    for name, aq in fast.activation_quantizers.items():
        lo = -rng.uniform(0.5, 1.5, size=(F if name == "input" else U) if granularity == "per_channel" else ())
        hi = rng.uniform(0.5, 1.5, size=lo.shape)
        aq.set_range(lo, hi)
        general.activation_quantizers[name].set_range(lo, hi)
    probe = tf.constant(rng.normal(size=(B, T, U)).astype(np.float32))
    outs, grads = [], []
    for layer in (fast, general):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * probe)
        outs.append(y.numpy())
        grads.append([g.numpy() for g in tape.gradient(loss, [layer.kernel, layer.recurrent_kernel, layer.bias])])
    step = float(np.max(qparams(*[general.activation_quantizers["state_h"].lo.numpy(),
                                   general.activation_quantizers["state_h"].hi.numpy()], spec)[0]))
    assert np.mean(np.abs(outs[0] - outs[1]) > 1e-6) < 0.01
    assert np.abs(outs[0] - outs[1]).max() <= 1.01 * step
    for a, b in zip(*grads):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_one_fake_quant_for_the_four_gates_equals_four(granularity):
    """The time loop quantizes the concatenated gates in one op (`concat_params`): same values and, for
    learned step sizes, the same gradients for every gate's scale and offset as four separate ops."""
    x = _x(9)
    spec = QuantSpec(4, granularity=granularity)
    q = QLSTM.from_float(_float_lstm(x), {"gate": spec}, LSQ)
    q(x)
    rng = np.random.default_rng(9)
    gates = [q.activation_quantizers[g] for g in GATES]
    for aq in gates:
        lo = -rng.uniform(0.1, 0.5, size=U if granularity == "per_channel" else ()).astype(np.float32)
        aq.set_range(lo, rng.uniform(0.5, 1.0, size=lo.shape).astype(np.float32))
    v = tf.constant(rng.uniform(-0.6, 1.1, size=(B, 4 * U)).astype(np.float32))
    weights = [w for aq in gates for w in (aq.scale, aq.offset)]
    with tf.GradientTape(persistent=True) as tape:
        joint = gates[0].kind.bind(*concat_params(gates, U))(v)
        apart = tf.concat([aq.kind.bind(*aq.params())(p) for aq, p in zip(gates, tf.split(v, 4, axis=1))], axis=1)
        probe = tf.constant(rng.normal(size=(B, 4 * U)).astype(np.float32))
        loss_joint, loss_apart = tf.reduce_sum(joint * probe), tf.reduce_sum(apart * probe)
    np.testing.assert_array_equal(joint.numpy(), apart.numpy())
    for a, b in zip(tape.gradient(loss_joint, weights), tape.gradient(loss_apart, weights)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(g.numpy()).max()) for g in tape.gradient(loss_joint, weights)) > 0


def test_calibration_values_cover_every_quantization_point_and_bypass_activation_quantizers():
    x = _x(6)
    q = _twin(_float_lstm(x), x, input=QuantSpec(8), gate=QuantSpec(8), state=QuantSpec(8))
    for aq in q.activation_quantizers.values():      # calibrated ranges must not change what calibration sees
        aq.set_range(-0.1, 0.1)
    vals = {k: v.numpy() for k, v in q.calibration_values(x).items()}
    assert set(vals) == set(q.activation_quantizers)
    assert vals["input"].shape == (B, T, F) and vals["state_h"].shape == (T, B, U)
    for g in ("gate_i", "gate_f", "gate_o"):
        assert 0 <= vals[g].min() and vals[g].max() <= 1
    np.testing.assert_array_equal(vals["input"], x)
    for aq in q.activation_quantizers.values():
        aq.reset()
    np.testing.assert_allclose(np.transpose(vals["state_h"], (1, 0, 2)), q(x).numpy(), atol=1e-6)


def test_learned_scales_are_trainable_and_get_gradients():
    x = _x(7)
    spec = QuantSpec(4, granularity="per_channel")
    q = QLSTM.from_float(_float_lstm(x), {"kernel": spec, "recurrent_kernel": spec, "state": QuantSpec(8)}, LSQ)
    q(x)
    q.copy_float_weights(_float_lstm(x))
    q.activation_quantizers["state_h"].set_range(-1.0, 1.0)
    q.activation_quantizers["state_c"].set_range(-2.0, 2.0)
    names = [w.name.split("/")[-1].split(":")[0] for w in q.trainable_weights]
    assert {"kernel_scale", "kernel_offset", "recurrent_kernel_scale", "state_h_scale", "state_c_offset"} <= set(names)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x) ** 2)
    grads = dict(zip(names, tape.gradient(loss, q.trainable_weights)))
    for n in ("kernel", "kernel_scale", "recurrent_kernel_scale", "state_h_scale", "state_c_scale"):
        assert grads[n] is not None and np.any(grads[n].numpy() != 0), n


def test_dropout_is_active_only_in_training():
    x = _x(8)
    lstm = _float_lstm(x, dropout=0.5, recurrent_dropout=0.3)
    q = _twin(lstm, x, kernel=QuantSpec(4))
    infer = q(x, training=False).numpy()
    np.testing.assert_array_equal(infer, q(x).numpy())
    assert np.abs(q(x, training=True).numpy() - infer).max() > 1e-3


def test_config_round_trip():
    q = QLSTM(U, return_sequences=True, kernel_quant=QuantSpec(3, granularity="per_channel"),
              gate_quant=QuantSpec(8, scheme="symmetric"), quantizer="lsq", name="lstm")
    clone = QLSTM.from_config(q.get_config())
    assert clone.get_config() == q.get_config()
    assert clone.specs["kernel"] == QuantSpec(3, granularity="per_channel") and clone.strategy is LSQ


@pytest.mark.parametrize("kwargs, match", [({"stateful": True, "batch_input_shape": (B, T, F)}, "uses stateful"),
                                           ({"kernel_regularizer": "l2"}, "uses kernel_regularizer"),
                                           ({"return_state": True}, "uses return_state")])
def test_unsupported_lstm_features_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QLSTM.from_float(keras.layers.LSTM(U, **kwargs), {})


@pytest.mark.parametrize("return_sequences", [True, False])
def test_go_backwards_equals_keras_lstm(return_sequences):
    """go_backwards as Keras: the clip read last frame first, the sequence returned in that order."""
    x = _x(13)
    lstm = _float_lstm(x, return_sequences, seed=13, go_backwards=True)
    q = _twin(lstm, x)
    assert q.go_backwards
    np.testing.assert_allclose(q(x).numpy(), lstm(x).numpy(), atol=1e-6)
    spec = QuantSpec(8)
    calibrated = _twin(lstm, x, gate=spec, state=spec)
    values = calibrated.calibration_values(x)
    forward = _twin(_float_lstm(x, return_sequences, seed=13), x).calibration_values(x[:, ::-1])
    np.testing.assert_allclose(values["state_c"], forward["state_c"], atol=1e-6)   # reads the reversed clip


def test_bad_spec_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match="bits=1 is not allowed"):
        QLSTM(U, kernel_quant={"bits": 1})
    with pytest.raises(ConfigError, match="axis=0 is not allowed for an activation quantizer"):
        QLSTM(U, gate_quant=QuantSpec(8, granularity="per_channel", axis=0))(_x())


def test_fresh_layer_initialises_like_keras_lstm():
    q, k = QLSTM(U), keras.layers.LSTM(U)
    q(_x()), k(_x())
    np.testing.assert_array_equal(q.bias.numpy(), k.cell.bias.numpy())      # forget-gate bias 1
    assert q.kernel.shape == k.cell.kernel.shape and q.recurrent_kernel.shape == k.cell.recurrent_kernel.shape


def test_input_dropout_matches_keras_statistics():
    """Training-mode input dropout must be the Keras LSTM's (a new mask at every time step): a model
    trained with Keras dropout is fine-tuned through QLSTM in QAT. One mask per sequence instead
    drops a feature for the whole utterance and gives a much larger output variance across calls."""
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(0).normal(size=(256, 30, 12)).astype(np.float32)
    lstm = keras.layers.LSTM(16, return_sequences=True, dropout=0.5)
    lstm(x)
    q = QLSTM.from_float(lstm, {})
    q(x)
    q.copy_float_weights(lstm)
    mean_k = np.mean([lstm(x, training=True).numpy() for _ in range(20)], axis=(0, 1))   # per (time, unit)
    mean_q = np.mean([q(x, training=True).numpy() for _ in range(20)], axis=(0, 1))
    spread_k = np.std([lstm(x, training=True).numpy() for _ in range(20)], axis=0).mean()
    spread_q = np.std([q(x, training=True).numpy() for _ in range(20)], axis=0).mean()
    assert abs(spread_q / spread_k - 1) < 0.1
    assert np.abs(mean_q - mean_k).max() < 0.1 * np.abs(mean_k).mean() + 5e-3


@pytest.mark.parametrize("go_backwards", [False, True])
def test_fused_keras_kernel_equals_the_own_loop_with_gradients(go_backwards):
    """Weights-only quantization through Keras' fused LSTM kernel (what a GPU runs as cuDNN) computes
    what the project's loop computes, forward and backward through the straight-through weights."""
    x = _x(5)
    lstm = _float_lstm(x, go_backwards=go_backwards)
    spec = QuantSpec(3, granularity="per_channel")
    loop = _twin(lstm, x, kernel=spec, recurrent_kernel=spec, bias=QuantSpec(8))
    fused = _twin(lstm, x, kernel=spec, recurrent_kernel=spec, bias=QuantSpec(8))
    loop.fused, fused.fused = False, True
    assert fused._fused_kernel_runs() and not loop._fused_kernel_runs()
    assert not tf.config.list_logical_devices("GPU") or QLSTM(U)._fused_kernel_runs()   # auto: fused on a GPU
    np.testing.assert_allclose(fused(x).numpy(), loop(x).numpy(), atol=2e-6, rtol=0)
    with tf.GradientTape(persistent=True) as tape:
        losses = [tf.reduce_sum(layer(x) ** 2) for layer in (loop, fused)]
    for name in ("kernel", "recurrent_kernel", "bias"):
        g_loop, g_fused = (tape.gradient(loss, getattr(layer, name)) for loss, layer in zip(losses, (loop, fused)))
        np.testing.assert_allclose(g_fused.numpy(), g_loop.numpy(), atol=1e-5, rtol=1e-4)
    graph = tf.function(lambda v: fused(v)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    assert any("lstm" in f.lower() for f in graph._functions), "Keras' LSTM kernel is not in the graph"


def test_the_fused_kernel_is_not_used_where_the_loop_quantizes():
    q = QLSTM(U, kernel_quant=QuantSpec(4), state_quant=QuantSpec(8), fused=True)
    x = _x(1)
    q(x)
    assert q.fused and "state_c" in q.activation_quantizers   # a state quantizer: the own loop runs
    assert QLSTM.from_config(q.get_config()).fused is True
    assert not QLSTM(U, activation="relu", fused=True)._fused_kernel_runs()   # cuDNN has tanh only
