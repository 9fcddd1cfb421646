"""Streaming: a model run frame by frame with its recurrent states carried between calls gives what
the whole-clip model gives, float and quantized, LSTM and GRU, stacked, with normalisation and a conv front end."""
import numpy as np
import pytest
import tf_keras as keras

from qat.algorithms.calibration import calibrate
from qat.errors import ConfigError
from qat.layers.fold import fold_batch_norms
from qat.layers.model import QuantConfig, freeze_ranges, quantize_model
from qat.layers.streaming import Streamer
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs

T, F = 15, 12


def _model(cell, layers=2):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    return build_model((T, F), 4, specs.model(cell, units=8, layers=layers, dropout=0.2),
                       rng.normal(size=F) * 0.1, rng.uniform(0.5, 2, F))


def _clips(n=6, seed=2):
    return np.random.default_rng(seed).normal(size=(n, T, F)).astype(np.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float_model_streamed_equals_the_whole_clip(cell):
    model, x = _model(cell), _clips()
    np.testing.assert_allclose(Streamer(model).run(x), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("act_bits", [None, 4])
def test_quantized_model_streamed_equals_the_whole_clip(cell, act_bits):
    """W3 per channel, and W3/A4/S4 calibrated and frozen (the deployment semantics): frame by frame
    the top layer's outputs are the sequence the whole-clip layer computes, and the class
    probabilities are the model's."""
    model, x = _model(cell), _clips()
    spec = None if act_bits is None else QuantSpec(act_bits, granularity="per_channel", estimator="percentile")
    cfg = QuantConfig(weights=QuantSpec(3, granularity="per_channel"), bias=QuantSpec(8), inputs=spec,
                      gates=spec, state=spec)
    qmodel = quantize_model(model, cfg)
    calibrate(qmodel, [_clips(32, 3)])
    freeze_ranges(qmodel)
    streamer = Streamer(qmodel)
    streamer.reset(len(x))
    frames = np.stack([streamer.push(x[:, t]) for t in range(T)], axis=1)
    top = keras.Model(qmodel.inputs, qmodel.get_layer(f"{cell}_1").output)(x).numpy()
    np.testing.assert_allclose(frames, top, atol=1e-5)
    expected = qmodel(x).numpy()
    np.testing.assert_allclose(streamer.output(), expected, atol=1e-5)
    assert np.array_equal(np.argmax(streamer.output(), 1), np.argmax(expected, 1))
    # a second clip starts from zero states again
    np.testing.assert_allclose(streamer.run(x[:2]), expected[:2], atol=1e-5)


def test_a_last_state_head_streams_too():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((T, F))
    h = keras.layers.GRU(8, name="gru")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    qmodel = quantize_model(model, QuantConfig(weights=QuantSpec(4)))
    x = _clips()
    np.testing.assert_allclose(Streamer(qmodel).run(x), qmodel(x).numpy(), atol=1e-5)


def _crnn():
    """Conv2D (time kernel 4, stride 2) -> folded BN -> ReLU -> GRU -> Flatten -> Dense."""
    keras.utils.set_random_seed(6)
    spec = specs.model("crnn", units=8, conv_filters=3, conv_kernel=(4, 3), conv_strides=(2, 2))
    return fold_batch_norms(build_model((T, F), 4, spec, np.zeros(F), np.ones(F)))[0]


@pytest.mark.parametrize("act_bits", [None, 8])
def test_a_conv_front_end_streams_over_a_window_of_frames(act_bits):
    """The crnn preset, float and quantized (W4 per channel, or W4/A8/S8 calibrated and frozen):
    the front runs on the last 4 frames every 2 frames, and the outputs over a clip are the
    whole-clip model's."""
    model, x = _crnn(), _clips()
    streamer = Streamer(model)
    assert (streamer.field, streamer.stride) == (4, 2)
    np.testing.assert_allclose(streamer.run(x), model(x).numpy(), atol=1e-5)
    spec = None if act_bits is None else QuantSpec(act_bits)
    qmodel = quantize_model(model, QuantConfig(weights=QuantSpec(4, granularity="per_channel"), bias=QuantSpec(8),
                                               inputs=spec, gates=spec, state=spec))
    calibrate(qmodel, [_clips(32, 3)])
    freeze_ranges(qmodel)
    streamer = Streamer(qmodel)
    streamer.reset(len(x))
    steps = [h for h in (streamer.push(x[:, t]) for t in range(T)) if h is not None]
    assert len(steps) == (T - 4) // 2 + 1
    expected = qmodel(x).numpy()
    np.testing.assert_allclose(streamer.output(), expected, atol=1e-5)
    assert np.array_equal(np.argmax(streamer.output(), 1), np.argmax(expected, 1))


def test_models_that_cannot_stream_are_refused_with_one_line():
    inputs = keras.Input((T, F))
    conv = keras.layers.Conv1D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.LSTM(4)(conv))))
    with pytest.raises(ConfigError, match=r"streaming cannot run 'conv' \(Conv1D\).*padding='valid'"):
        Streamer(model)
    inputs = keras.Input((T, F))
    h = keras.layers.Reshape((T, F, 1), name="fixed")(inputs)
    h = keras.layers.Reshape((T, F), name="back")(keras.layers.Conv2D(1, 1)(h))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.LSTM(4)(h)))
    with pytest.raises(ConfigError, match="reshapes that keep time free; 'fixed'"):
        Streamer(model)
    inputs = keras.Input((T, F))
    h = keras.layers.LSTM(4, name="last_only")(inputs)
    h = keras.layers.LSTM(4, name="lstm_2")(keras.layers.RepeatVector(T)(h))
    with pytest.raises(ConfigError, match="one stack of recurrent layers"):
        Streamer(keras.Model(inputs, keras.layers.Dense(3)(h)))
    with pytest.raises(ConfigError, match="before any frame"):
        Streamer(_model("lstm")).output()
