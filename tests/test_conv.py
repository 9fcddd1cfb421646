"""Convolutions: QConv1D / QConv2D / QDepthwiseConv2D compute Keras' convolutions (quantization off) and
the convolution of numpy-quantized kernels (one range per output channel); batch norms fold into
them exactly; GPTQ's patches and bias correction's mean shift match the convolution they stand for;
the crnn preset quantizes, calibrates, packs and reloads bit-identically."""
import numpy as np
import pytest
import tf_keras as keras

from qat.algorithms.bias_correction import bias_correct, mean_shift
from qat.algorithms.calibration import calibrate
from qat.algorithms.gptq import gptq
from qat.errors import ConfigError
from qat.export.packed import load_packed_model, write_packed_model
from qat.layers.conv import QConv1D, QConv2D, QDepthwiseConv2D, conv_patches
from qat.layers.fold import fold_batch_norms
from qat.layers.model import (QuantConfig, check_quantizable, float_layers, freeze_ranges, quantize_model,
                              quantized_layers, quantized_weights, weight_tensor_names)
from qat.quant.reference import fake_quant_np
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs
from tests.sequences import sequences

T, F = 20, 12

CONVS = {
    "conv1d": (lambda **kw: keras.layers.Conv1D(6, 3, **kw), (T, F)),
    "conv1d_causal": (lambda **kw: keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2, **kw), (T, F)),
    "conv2d": (lambda **kw: keras.layers.Conv2D(5, (4, 3), strides=(2, 1), **kw), (T, F, 2)),
    "conv2d_same": (lambda **kw: keras.layers.Conv2D(5, 3, padding="same", **kw), (T, F, 2)),
    "depthwise": (lambda **kw: keras.layers.DepthwiseConv2D((3, 3), **kw), (T, F, 4)),
    "depthwise_m2": (lambda **kw: keras.layers.DepthwiseConv2D((3, 3), depth_multiplier=2, **kw), (T, F, 4)),
}


def _conv_model(kind, **kw):
    keras.utils.set_random_seed(3)
    make, shape = CONVS[kind]
    inputs = keras.Input(shape)
    layer = make(name="conv", bias_initializer="glorot_uniform", **kw)
    return keras.Model(inputs, layer(inputs)), shape


def _kernel_name(model) -> str:
    return [n for n in weight_tensor_names(model) if n.endswith("kernel")][0]


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_unquantized_twin_equals_the_keras_convolution(kind):
    model, shape = _conv_model(kind, activation="relu")
    x = sequences(1, (3, *shape))
    qmodel = quantize_model(model, QuantConfig())
    assert isinstance(qmodel.get_layer("conv"), (QConv1D, QConv2D, QDepthwiseConv2D))
    np.testing.assert_allclose(qmodel(x).numpy(), model(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_kernel_is_the_numpy_reference_per_output_channel(kind, bits):
    """The twin computes the Keras convolution of the numpy-quantized kernel and bias; per channel,
    each output channel (depthwise: each channel) holds at most 2^bits levels."""
    model, shape = _conv_model(kind)
    x = sequences(2, (3, *shape))
    spec = QuantSpec(bits, granularity="per_channel")
    qmodel = quantize_model(model, QuantConfig(weights=spec, bias=QuantSpec(8)))
    name = _kernel_name(model)
    kernel, bias = model.get_layer("conv").get_weights()
    depthwise = name.endswith("depthwise_kernel")
    axis_spec = QuantSpec(bits, granularity="per_channel", axis=-2 if depthwise else -1)
    oracle = keras.models.clone_model(model)
    oracle.set_weights([fake_quant_np(kernel, axis_spec), fake_quant_np(bias, QuantSpec(8))])
    np.testing.assert_allclose(qmodel(x).numpy(), oracle(x).numpy(), atol=1e-5)
    codes = quantized_weights(qmodel)[name].codes
    channels = codes.reshape(-1, *codes.shape[-2:]) if depthwise else codes.reshape(-1, codes.shape[-1])
    per_group = [np.unique(channels[:, c]).size for c in range(channels.shape[1])]
    assert max(per_group) <= 2 ** bits and min(per_group) > 1


@pytest.mark.parametrize("kind", ["conv1d", "conv2d_same", "depthwise_m2"])
def test_batch_norm_folds_exactly(kind):
    keras.utils.set_random_seed(3)
    make, shape = CONVS[kind]
    inputs = keras.Input(shape)
    h = make(name="conv", use_bias=False)(inputs)
    bn = keras.layers.BatchNormalization(name="bn")
    out = keras.layers.ReLU()(bn(h))
    with_bn = keras.Model(inputs, out)
    rng = np.random.default_rng(4)
    c = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c) * 0.1, rng.uniform(0.2, 2, c)])
    x = sequences(3, (4, *shape))
    folded, names = fold_batch_norms(with_bn)
    assert names == ["bn"] and "bn" not in [l.name for l in folded.layers]
    assert folded.get_layer("conv").use_bias
    np.testing.assert_allclose(folded(x).numpy(), with_bn(x).numpy(), atol=1e-5)
    assert fold_batch_norms(folded) == (folded, [])


def test_a_batch_norm_that_cannot_fold_stays_and_is_refused_unless_kept_float():
    """BN after an activation cannot fold: quantization refuses it (naming it and what is handled),
    or with keep_float leaves it float and lists it."""
    inputs = keras.Input((T, F))
    h = keras.layers.Conv1D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GRU(4, name="gru")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="dense")(h))
    folded, names = fold_batch_norms(model)
    assert names == []
    with pytest.raises(ConfigError, match=r"layer 'bn' \(BatchNormalization\) of model .* cannot be quantized: "
                                          r"expected LSTM, GRU, .*Conv2D.*model.keep_float=true"):
        check_quantizable(folded, keep_float=False)
    check_quantizable(folded, keep_float=True)
    assert float_layers(quantize_model(folded, QuantConfig(weights=QuantSpec(4)))) == ["bn"]


@pytest.mark.parametrize("kind", ["conv1d", "conv1d_causal", "conv2d", "conv2d_same"])
def test_patches_times_the_kernel_are_the_convolution(kind):
    model, shape = _conv_model(kind, use_bias=False)
    layer = model.get_layer("conv")
    x = sequences(5, (2, *shape))
    kernel = layer.kernel.numpy()
    got = conv_patches(layer, x).numpy().reshape(-1, kernel.size // kernel.shape[-1]) @ kernel.reshape(-1, kernel.shape[-1])
    want = model(x).numpy().reshape(-1, kernel.shape[-1])
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "depthwise", "depthwise_m2"])
def test_mean_shift_is_the_convolution_of_a_constant_input(kind):
    """For a constant input the shift of every output position is exactly mean_shift (valid padding)."""
    model, shape = _conv_model(kind, use_bias=False)
    layer = model.get_layer("conv")
    level = np.random.default_rng(6).normal(size=shape[-1]).astype(np.float32)
    x = np.broadcast_to(level, (1, *shape)).astype(np.float32)
    out = model(x).numpy()
    kernel = layer.get_weights()[0]
    np.testing.assert_allclose(mean_shift(level.astype(np.float64), kernel.astype(np.float64),
                                          kind.startswith("depthwise")),
                               out.reshape(-1, out.shape[-1])[0], rtol=1e-4, atol=1e-5)


def _crnn(seed=7):
    keras.utils.set_random_seed(seed)
    spec = specs.model("crnn", units=8, conv_filters=4, conv_kernel=(4, 3), conv_strides=(2, 1))
    model = build_model((T, F), 3, spec, np.zeros(F), np.ones(F))
    bn = model.get_layer("conv2d_bn")
    rng = np.random.default_rng(seed)
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(size=4) * 0.1, rng.normal(size=4) * 0.1, rng.uniform(0.5, 2, 4)])
    return model


def test_crnn_preset_quantizes_rounds_calibrates_and_packs(tmp_path):
    """conv2d -> folded BN -> ReLU -> GRU -> Dense at W3 per channel / A8 / S8: every weight tensor quantized
    (conv included), GPTQ moves the conv kernel and improves its output error, bias correction reaches it,
    and the packed file reloads bit-identically."""
    model, names = fold_batch_norms(_crnn())
    assert names == ["conv2d_bn"]
    assert weight_tensor_names(model)[:2] == ["conv2d/kernel", "conv2d/bias"]
    noise = sequences(8, (48, T + 2, F + 2))
    x = sum(noise[:, i:i + T, j:j + F] for i in range(3) for j in range(3)) / 3   # correlated, as spectra are
    cfg = QuantConfig(weights=QuantSpec(3, granularity="per_channel"), bias=QuantSpec(8))
    rtn = quantize_model(model, cfg)
    freeze_ranges(rtn)
    rounded = quantize_model(model, cfg)
    freeze_ranges(rounded)
    gptq(model, rounded, x)
    conv_out = lambda m: keras.Model(m.inputs, m.get_layer("conv2d").output)(x).numpy()
    err = lambda m: float(np.mean((conv_out(m) - conv_out(model)) ** 2))
    assert err(rounded) < err(rtn)
    assert "conv2d" in bias_correct(model, rounded, x)
    spec = QuantSpec(8)
    qmodel = quantize_model(model, QuantConfig(weights=cfg.weights, bias=cfg.bias, inputs=spec, gates=spec, state=spec))
    assert [l.name for l in quantized_layers(qmodel)] == ["conv2d", "gru", "dense"]
    assert float_layers(qmodel) == ["normalize"]
    calibrate(qmodel, [x])
    assert float(qmodel.get_layer("conv2d").activation_quantizers["input"].hi.numpy()) > 0
    freeze_ranges(qmodel)
    expected = qmodel(x).numpy()
    qmodel.save(tmp_path / "twin.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "twin.keras")(x).numpy(), expected)
    write_packed_model(qmodel, str(tmp_path / "m.qlstm"))
    fresh = quantize_model(model, QuantConfig(weights=cfg.weights, bias=cfg.bias, inputs=spec, gates=spec, state=spec))
    fresh(x)
    load_packed_model(fresh, str(tmp_path / "m.qlstm"))
    np.testing.assert_array_equal(fresh(x).numpy(), expected)


def test_conv_kernel_larger_than_the_features_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.conv_kernel=\[30, 3\] is not allowed for 20 x 12 features"):
        build_model((T, F), 3, specs.model("crnn", conv_kernel=(30, 3)))


def test_a_sequential_model_folds_and_quantizes_too():
    keras.utils.set_random_seed(9)
    model = keras.Sequential([keras.Input((T, F)), keras.layers.Conv1D(4, 3, use_bias=False, name="conv"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                              keras.layers.GRU(6, name="gru"), keras.layers.Dense(3, activation="softmax", name="out")])
    model.get_layer("bn").set_weights([np.full(4, 1.5), np.full(4, 0.2), np.full(4, 0.1), np.full(4, 0.5)])
    x = sequences(10, (4, T, F))
    folded, names = fold_batch_norms(model)
    assert names == ["bn"]
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=1e-5)
    check_quantizable(folded, keep_float=False)
    qmodel = quantize_model(folded, QuantConfig(weights=QuantSpec(4), bias=QuantSpec(8)))
    assert [l.name for l in quantized_layers(qmodel)] == ["conv", "gru", "out"]
