"""The TFLite int8 scheme (qat.layers.tflite_int8) against the real LiteRT interpreter running the
files it exports (qat.export.tflite_trained): the trained codes and ranges are in the file, the
interpreter computes what the fake-quant twin computes, streaming equals the whole clip, and a file
that computes in float is refused."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tensorflow.lite.tools import flatbuffer_utils

from qat.algorithms.calibration import calibrate_in_order
from qat.errors import ConfigError
from qat.export.tflite import TFLiteModel, tflite_model
from qat.export.tflite_trained import (LSTM_CELL_STATE, LSTM_INPUT_WEIGHTS, LSTM_RECURRENT_WEIGHTS, OPS,
                                       TFLiteStream, check_integer_only, float_ops, streaming_tflite,
                                       trained_tflite, twin_weights)
from qat.layers.model import freeze_ranges, quantized_weights
from qat.layers.tflite_int8 import (GATE_STEP, SOFTMAX_STEP, TfliteScheme, folded_float_model, logits_model,
                                    on_grid, tflite_twin, twin_layers)
from qat.quant.quantizers import GateBlockWeightQuantizer
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs

FRAMES, BINS, UNITS, CLASSES = 12, 10, 8, 4


def _float_model(seed=0, cell="lstm", sequences=True):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(size=BINS).astype(np.float32), rng.uniform(0.5, 2, BINS).astype(np.float32)
    return build_model((FRAMES, BINS), CLASSES, specs.model(cell, units=UNITS), mean, var) if sequences else \
        keras.Sequential([keras.Input((FRAMES, BINS)), keras.layers.LSTM(UNITS), keras.layers.Dense(CLASSES, "softmax")])


def _clips(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, FRAMES, BINS)) * 1.5 + 0.3).astype(np.float32)


def _trained_twin(bits=8, seed=0, sequences=True, estimator="minmax"):
    model = _float_model(seed, sequences=sequences)
    model.get_layer(index=-1).bias.assign(np.linspace(-0.2, 0.2, CLASSES).astype(np.float32))
    twin = tflite_twin(model, TfliteScheme(bits, estimator))
    x = _clips()
    calibrate_in_order(twin, x)
    freeze_ranges(twin)
    return model, twin, x


@pytest.fixture(scope="module")
def exported():
    model, twin, x = _trained_twin(bits=8)
    return model, twin, x, trained_tflite(twin, x[:8])


# ------------------------------------------------------------------------------------ the grids

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gate_block_quantizer_has_one_symmetric_scale_per_gate(bits):
    rng = np.random.default_rng(bits)
    w = (rng.normal(size=(6, 4 * 5)) * np.repeat([0.1, 1.0, 3.0, 0.5], 5)).astype(np.float32)
    layer = keras.layers.Layer()
    q = GateBlockWeightQuantizer(QuantSpec(bits, "symmetric", narrow_range=True))
    q.build(layer, "kernel", w.shape)
    q.init_from(w)
    scale, zp = (t.numpy() for t in q.scale_zero_point(tf.constant(w)))
    blocks = np.split(w, 4, axis=1)
    expected = np.repeat([np.abs(b).max() / (2 ** (bits - 1) - 1) for b in blocks], 5)   # minmax, numpy oracle
    np.testing.assert_allclose(scale.reshape(-1), expected, rtol=1e-6)
    assert not zp.any()
    w_hat = q(tf.constant(w)).numpy()
    for block in np.split(np.round(w_hat / scale), 4, axis=1):
        assert len(np.unique(block)) <= 2 ** bits - 1 and np.abs(block).max() <= 2 ** (bits - 1) - 1
    assert np.all(q(tf.zeros_like(w)).numpy() == 0)                    # zero exactly representable


def test_gate_block_error_shrinks_as_bits_grow():
    w = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
    errors = []
    for bits in range(2, 9):
        q = GateBlockWeightQuantizer(QuantSpec(bits, "symmetric", narrow_range=True))
        q.build(keras.layers.Layer(), "kernel", w.shape)
        q.init_from(w)
        errors.append(float(np.mean((q(tf.constant(w)).numpy() - w) ** 2)))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_gate_block_quantizer_refuses_asymmetric_and_odd_widths():
    with pytest.raises(ConfigError, match="expected 'symmetric'"):
        GateBlockWeightQuantizer(QuantSpec(4, "asymmetric"))
    with pytest.raises(ConfigError, match="divisible by 4"):
        GateBlockWeightQuantizer(QuantSpec(4, "symmetric")).build(keras.layers.Layer(), "kernel", (3, 10))


def test_on_grid_rounds_half_away_saturates_and_passes_gradients_inside():
    x = tf.constant([0.5, -0.5, 1.49, 2.5, 9.0, -9.0]) * GATE_STEP * np.array([1, 1, 1, 1, 2 ** 15, 2 ** 15])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = on_grid(x, GATE_STEP, -2 ** 15, 2 ** 15 - 1)
    codes = (y / GATE_STEP).numpy()
    np.testing.assert_array_equal(codes, [1, -1, 1, 3, 2 ** 15 - 1, -2 ** 15])
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [1, 1, 1, 1, 0, 0])


# ------------------------------------------------------------------------------------ the twin

def test_folding_the_normalization_keeps_the_float_model():
    model = _float_model()
    x = _clips(16)
    np.testing.assert_allclose(folded_float_model(model).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)


def test_twin_at_8_bits_is_close_to_the_float_model():
    model, twin, x = _trained_twin(bits=8)
    p_float, p_twin = model.predict(x, verbose=0), twin.predict(x, verbose=0)
    assert np.abs(p_float - p_twin).max() < 0.05
    assert np.mean(p_float.argmax(1) == p_twin.argmax(1)) >= 0.95


def test_the_logits_model_gives_the_int8_logits_the_twin_decides_from():
    """The twin's probabilities are the softmax of the logits model's outputs on the 1/256 grid; the
    logits lie on the int8 grid of the `output` quantizer."""
    _, twin, x = _trained_twin(bits=4)
    logits = logits_model(twin).predict(x, verbose=0)
    np.testing.assert_allclose(on_grid(tf.nn.softmax(logits), SOFTMAX_STEP, 0, 255).numpy(),
                               twin.predict(x, verbose=0), atol=1e-6)
    _, step, zero_point = twin_layers(twin)[1].activation_quantizers["output"].params()
    codes = logits / step.numpy() + zero_point.numpy()
    assert np.abs(codes - np.round(codes)).max() < 1e-3 and len(np.unique(np.round(codes))) <= 256


def test_qat_gradients_reach_every_weight_through_the_grids():
    _, twin, x = _trained_twin(bits=4)
    y = np.arange(len(x)) % CLASSES
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, twin(x, training=True))
    grads = tape.gradient(loss, twin.trainable_weights)
    assert [w.name.split("/")[-1] for w in twin.trainable_weights] == ["kernel:0", "recurrent_kernel:0", "bias:0",
                                                                        "kernel:0", "bias:0"]
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_topologies_tflite_cannot_run_are_one_line_errors():
    with pytest.raises(ConfigError, match="cannot run as TFLite's int8 LSTM: layer 'gru'"):
        tflite_twin(_float_model(cell="gru"), TfliteScheme(8))
    with pytest.raises(ConfigError, match="bits=12 is not allowed for the TFLite int8 scheme"):
        TfliteScheme(12)


# ------------------------------------------------------------------------------------ the file

def _lstm_op(flat):
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    graph = model.subgraphs[0]
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if OPS[max(code.builtinCode, code.deprecatedBuiltinCode)] == "UNIDIRECTIONAL_SEQUENCE_LSTM":
            return model, graph, op
    raise AssertionError("no LSTM op")


def _tensor_values(model, graph, index):
    t = graph.tensors[index]
    return np.frombuffer(bytes(model.buffers[t.buffer].data), np.int8).reshape(t.shape), t.quantization


@pytest.mark.parametrize("bits", [3, 8])
def test_the_file_holds_the_trained_codes_and_scales(bits):
    _, twin, x = _trained_twin(bits=bits, estimator="mse")
    flat = trained_tflite(twin, x[:8])
    model, graph, op = _lstm_op(flat)
    lstm, _ = twin_layers(twin)
    q = quantized_weights(twin)
    for name, slots in (("kernel", LSTM_INPUT_WEIGHTS), ("recurrent_kernel", LSTM_RECURRENT_WEIGHTS)):
        codes, scale = q[f"{lstm.name}/{name}"].codes, q[f"{lstm.name}/{name}"].scale.reshape(-1)
        for g, slot in enumerate(slots):
            values, params = _tensor_values(model, graph, op.inputs[slot])
            np.testing.assert_array_equal(values, codes[:, g * UNITS:(g + 1) * UNITS].T)
            assert len(np.unique(values)) <= 2 ** bits - 1
            assert params.scale[0] == pytest.approx(scale[g * UNITS], rel=1e-7) and params.zeroPoint[0] == 0
    cell = graph.tensors[op.inputs[LSTM_CELL_STATE]].quantization
    assert cell.scale[0] == 2.0 ** lstm.cell_exponent()
    w = twin_weights(twin)
    x_params = graph.tensors[op.inputs[0]].quantization
    assert (x_params.scale[0], x_params.zeroPoint[0]) == pytest.approx((w.x.scale, w.x.zero_point))
    assert float_ops(flat) == []


def test_the_interpreter_computes_what_the_twin_computes(exported):
    _, twin, x, flat = exported
    p_file, p_twin = TFLiteModel(flat).predict(x), twin.predict(x, verbose=0)
    assert np.mean(p_file.argmax(1) == p_twin.argmax(1)) >= 0.98
    assert np.abs(p_file - p_twin).max() <= 2 / 256 + 1e-6      # at most two steps of the int8 softmax


def test_hidden_states_agree_within_a_code(exported):
    """The interpreter's int8 hidden states, frame by frame (the streaming file), against the twin's."""
    _, twin, x, _ = exported
    lstm, _ = twin_layers(twin)
    stream, head = streaming_tflite(twin, x[:8])
    runner = TFLiteStream(stream, head, True)
    w = twin_weights(twin)
    h_twin = keras.Model(twin.input, lstm.output).predict(x[:16], verbose=0) / w.h.scale + w.h.zero_point
    h_file = np.stack([runner.hidden_states(clip) for clip in x[:16]]).astype(np.float64)
    diff = np.abs(h_file - np.round(h_twin))
    assert diff.max() <= 2 and np.mean(diff == 0) >= 0.97


@pytest.mark.parametrize("sequences", [True, False])
def test_streaming_equals_the_whole_clip(sequences):
    _, twin, x = _trained_twin(bits=4, sequences=sequences)
    lstm, _ = twin_layers(twin)
    flat = trained_tflite(twin, x[:8])
    stream, head = streaming_tflite(twin, x[:8])
    np.testing.assert_array_equal(TFLiteStream(stream, head, lstm.return_sequences).predict(x[:10]),
                                  TFLiteModel(flat).predict(x[:10]))


def test_int8_io_file_takes_the_twins_input_codes(exported):
    _, twin, x, flat = exported
    flat8 = trained_tflite(twin, x[:8], int8_io=True)
    runner = TFLiteModel(flat8)
    w = twin_weights(twin)
    assert runner.inp["dtype"] == np.int8 and runner.out["dtype"] == np.int8
    assert runner.inp["quantization"] == pytest.approx((w.x.scale, w.x.zero_point))
    assert float_ops(flat8) == []
    np.testing.assert_array_equal(runner.predict(x).argmax(1), TFLiteModel(flat).predict(x).argmax(1))


def test_a_file_computing_in_float_is_refused():
    model = _float_model()
    dynamic, _ = tflite_model(model, "dynamic")
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in float_ops(dynamic.flatbuffer)
    with pytest.raises(ValueError, match="computes in float"):
        check_integer_only(dynamic.flatbuffer, "file")


# ------------------------------------------------------------------------------------ the recipes

@pytest.mark.parametrize("overrides,needle", [
    (["quant=ptq_tflite", "bits=12"], "bits=12 is not allowed with quant.method=ptq_tflite: expected 2..8"),
    (["quant=qat_tflite", "act_bits=8"], "act_bits=8 is not allowed with quant.method=qat_tflite: expected null"),
    (["quant=qat_tflite", "model=gru"], "quant.method=qat_tflite is not allowed with model.cell=gru"),
    (["quant=ptq_tflite", "quant.representative_size=600"], "quant.representative_size=600 is not allowed")])
def test_recipe_settings_it_cannot_run_are_refused_before_any_data(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        spec = specs.run(*overrides)
        spec.recipe.recipe.check_model(spec.model, spec.recipe.options)


@pytest.mark.parametrize("preset", ["ptq_tflite", "qat_tflite"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_tflite_presets_are_valid_at_every_bit_width_they_hold(preset, bits):
    assert specs.recipe(preset, f"bits={bits}").bits.bits == bits
