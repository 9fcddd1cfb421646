"""tfmot integration: quantize_apply takes the seed model's LSTM at any bit-width, trains, and yields
kernels on a 2^b-level grid per channel (cross-checked against our numpy reference)."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.tfmot import DenseQuantizeConfig, LSTMQuantizeConfig, tfmot_quantize
from qat.quant.reference import fake_quant_np
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs

SHAPE = (12, 16)


def _model(shape=SHAPE, units=8, seed=0, cell="lstm"):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    return build_model(shape, 3, specs.model(cell, units=units), norm_mean=rng.normal(size=shape[1]) * 0.1,
                       norm_var=rng.uniform(0.5, 2, shape[1]))


def _data(shape=SHAPE, n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + shape).astype(np.float32), rng.integers(0, 3, n)


def _quantized_kernels(qmodel, layer="quant_lstm"):
    """(float kernel, fake-quantized kernel as inference uses it, stored min, max) per weight."""
    out = []
    for weight, quantizer, qvars in qmodel.get_layer(layer)._weight_vars:
        out.append((weight.numpy(), quantizer(weight, False, weights=qvars).numpy(),
                    qvars["min_var"].numpy(), qvars["max_var"].numpy()))
    return out


def test_tfmot_default_registry_rejects_lstm():
    with pytest.raises(RuntimeError, match="not supported|QuantizeConfig"):
        tfmot.quantization.keras.quantize_model(_model())


@pytest.mark.parametrize("bits, per_channel, shape, units", [(2, True, SHAPE, 8), (3, False, SHAPE, 8),
                                                             (4, True, (49, 257), 80), (8, True, SHAPE, 8)])
def test_quantize_apply_trains_one_step_with_2_to_the_b_values_per_channel(bits, per_channel, shape, units):
    x, y = _data(shape)
    qmodel = tfmot_quantize(_model(shape, units), bits, per_channel=per_channel, narrow_range=True)
    qmodel.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    before = [k for k, *_ in _quantized_kernels(qmodel)]
    loss = qmodel.train_on_batch(x, y)
    assert np.isfinite(loss)
    spec = QuantSpec(bits, scheme="symmetric", narrow_range=True,
                     granularity="per_channel" if per_channel else "per_tensor")
    for (w, wq, lo, hi), w0 in zip(_quantized_kernels(qmodel), before):
        assert np.any(w != w0)                                           # the step updated the kernel
        distinct = [len(np.unique(wq[:, j])) for j in range(wq.shape[1])] if per_channel else [len(np.unique(wq))]
        assert max(distinct) <= 2 ** bits - 1                            # narrow range: 2^b - 1 levels
        ours = fake_quant_np(w, spec, lo.reshape(1, -1) if per_channel else lo, hi.reshape(1, -1) if per_channel else hi)
        off = np.abs(ours - wq) > 1e-6 * np.abs(hi).max()
        assert off.mean() < 0.01                                         # only float32 rounding ties differ


@pytest.mark.parametrize("act_bits", [None, 8])
def test_quantize_apply_takes_a_gru(act_bits):
    """model=gru through tfmot: GRUQuantizeConfig quantizes its kernel and recurrent kernel at `bits`
    (2^b values per channel after a training step), with act_bits its sigmoid / tanh inputs."""
    x, y = _data()
    model = _model(cell="gru")
    np.testing.assert_allclose(tfmot_quantize(model, 16).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-3)
    qmodel = tfmot_quantize(model, 3, act_bits)
    qmodel.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    assert np.isfinite(qmodel.train_on_batch(x, y))
    kernels = _quantized_kernels(qmodel, "quant_gru")
    assert len(kernels) == 2
    for _, wq, _, _ in kernels:
        assert max(len(np.unique(wq[:, j])) for j in range(wq.shape[1])) <= 8


def test_weights_are_kept_and_ranges_set_before_training():
    x, _ = _data()
    model = _model()
    np.testing.assert_allclose(tfmot_quantize(model, 16).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-3)
    for w, wq, lo, hi in _quantized_kernels(tfmot_quantize(model, 4, narrow_range=True)):
        np.testing.assert_allclose(hi, np.abs(w).max(axis=0), rtol=1e-6)  # not tfmot's initial [-6, 6]
        np.testing.assert_allclose(lo, -hi, rtol=1e-6)


def test_activation_quantization_reaches_the_lstm_cell():
    x, y = _data()
    model = _model()
    weights_only, with_acts = tfmot_quantize(model, 8), tfmot_quantize(model, 8, act_bits=2)
    names = [v.name for v in with_acts.get_layer("quant_lstm").weights]
    assert sum("pre_activation_min" in n for n in names) == 2            # tanh inputs, sigmoid inputs
    lstm_out = [keras.Model(m.inputs, m.get_layer("quant_lstm").output).predict(x, verbose=0)
                for m in (weights_only, with_acts)]
    assert np.abs(lstm_out[1] - lstm_out[0]).max() > 1e-2     # Keras' fused kernel would ignore them
    with_acts.compile("adam", "sparse_categorical_crossentropy")
    assert np.isfinite(with_acts.train_on_batch(x, y))


@pytest.mark.parametrize("cls", [LSTMQuantizeConfig, DenseQuantizeConfig])
def test_configs_validate_and_serialize(cls):
    cfg = cls(3, act_bits=8, per_channel=False)
    assert cls.from_config(cfg.get_config()).get_config() == cfg.get_config()
    with pytest.raises(ConfigError, match=r"^bits=1 is not allowed: expected an integer 2\.\.16$"):
        cls(1)
    with pytest.raises(ConfigError, match="act_bits=17 is not allowed"):
        cls(4, act_bits=17)
    with pytest.raises(ConfigError, match="quantize_output=True is not allowed without act_bits"):
        cls(4, quantize_output=True)
