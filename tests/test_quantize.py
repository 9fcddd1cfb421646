"""Whole-model quantization: the twin is the float model with fake-quantized weights, trains with fit,
keeps at most 2^b values per quantization group, calibrates, exports and survives save/load."""
import numpy as np
import pytest
import tf_keras as keras

from qat.algorithms.calibration import calibrate, values_per_clip
from qat.errors import ConfigError, DataError
from qat.layers.dense import QDense
from qat.layers.lstm import QLSTM
from qat.layers.model import (QuantConfig, check_quantizable, float_layers, freeze_ranges, quantize_model, quantized_weights,
                              weight_tensor_names)
from qat.quant.quantizers import LSQ, RANGE
from qat.quant.reference import dequantize_np, estimate_range, fake_quant_np, qparams
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs

SHAPE, N_CLASSES = (12, 16), 3
NAMES = ["lstm/kernel", "lstm/recurrent_kernel", "lstm/bias", "dense/kernel", "dense/bias"]


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE).astype(np.float32) * 2 + 0.5, rng.integers(0, N_CLASSES, n)


def _float_model(seed=0, **spec):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(SHAPE, N_CLASSES, specs.model(units=8, **spec),
                        norm_mean=rng.normal(size=SHAPE[1]) * 0.1, norm_var=rng.uniform(0.5, 2, SHAPE[1]))
    model.get_layer("dense").bias.assign(rng.normal(size=N_CLASSES).astype(np.float32) * 0.1)
    return model


@pytest.fixture(scope="module")
def float_model():
    return _float_model()


def _distinct_per_group(values, spec):
    if spec.granularity == "per_tensor":
        return [len(np.unique(values))]
    moved = np.moveaxis(values, spec.axis, 0)
    return [len(np.unique(moved[i])) for i in range(moved.shape[0])]


def test_weight_tensor_names(float_model):
    assert weight_tensor_names(float_model) == NAMES
    stacked = build_model(SHAPE, N_CLASSES, specs.model(units=4, layers=2))
    assert weight_tensor_names(stacked)[:6] == ["lstm/kernel", "lstm/recurrent_kernel", "lstm/bias",
                                                "lstm_1/kernel", "lstm_1/recurrent_kernel", "lstm_1/bias"]
    assert weight_tensor_names(quantize_model(float_model, QuantConfig())) == NAMES


def test_no_quantization_twin_equals_float_model(float_model):
    x, _ = _data()
    qmodel = quantize_model(float_model, QuantConfig())
    assert isinstance(qmodel.get_layer("lstm"), QLSTM) and isinstance(qmodel.get_layer("dense"), QDense)
    assert [type(layer).__name__ for layer in qmodel.layers[:2]] == ["InputLayer", "Normalization"]
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), float_model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, granularity="per_channel", scheme="symmetric"),
                                  QuantSpec(2, estimator="mse", granularity="per_channel")])
def test_twin_equals_float_model_with_prequantized_weights(float_model, spec):
    x, _ = _data()
    qmodel = quantize_model(float_model, QuantConfig(weights=spec, bias=QuantSpec(8)))
    oracle = keras.models.clone_model(float_model)
    oracle.set_weights([fake_quant_np(w, QuantSpec(8) if w.ndim == 1 else spec) for w in float_model.get_weights()])
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), oracle.predict(x, verbose=0), atol=2e-6)


def test_overrides_give_mixed_precision_and_unknown_names_are_rejected(float_model):
    cfg = QuantConfig(weights=QuantSpec(8), overrides={"lstm/kernel": QuantSpec(2), "dense/bias": QuantSpec(3)})
    qw = quantized_weights(quantize_model(float_model, cfg))
    assert sorted(qw) == ["dense/bias", "dense/kernel", "lstm/kernel", "lstm/recurrent_kernel"]   # bias float
    assert qw["lstm/kernel"].spec.bits == 2 and len(np.unique(qw["lstm/kernel"].values)) <= 4
    assert qw["dense/bias"].spec.bits == 3 and qw["lstm/recurrent_kernel"].spec.bits == 8
    with pytest.raises(ConfigError, match=r"override name\(s\) \['lstm/kernal'\] are not allowed: "
                                          r"expected names among \['lstm/kernel'"):
        quantize_model(float_model, QuantConfig(overrides={"lstm/kernal": QuantSpec(4)}))


@pytest.mark.parametrize("kwargs, match", [({"weights": 4}, r"QuantConfig.weights=4 is not allowed"),
                                           ({"strategy": "lsq"}, "QuantConfig.strategy='lsq' is not allowed"),
                                           ({"overrides": {"lstm/kernel": 3}}, r"overrides\['lstm/kernel'\]=3")])
def test_bad_quant_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_layers_that_cannot_be_quantized_are_refused_by_name_or_kept_float_and_listed():
    """A SimpleRNN (also in a Bidirectional) or a LayerNormalization cannot be quantized:
    check_quantizable names it and the types it can handle; with keep_float the twin keeps it float
    and float_layers lists it, beside the normalisation (its statistics are float constants)."""
    inp = keras.Input(SHAPE)
    bi = ["forward_simple_rnn", "backward_simple_rnn"]      # a Bidirectional's float layers, by direction
    for layer, kind, listed in [(keras.layers.Bidirectional(keras.layers.SimpleRNN(4), name="bad"), "Bidirectional", bi),
                                (keras.layers.SimpleRNN(4, name="bad"), "SimpleRNN", ["bad"]),
                                (keras.layers.LayerNormalization(name="bad"), "LayerNormalization", ["bad"])]:
        model = keras.Model(inp, layer(keras.layers.Normalization(mean=0.0, variance=1.0, name="normalize")(inp)))
        with pytest.raises(ConfigError, match=rf"layer 'bad' \({kind}\) of model .* cannot be quantized: expected "
                                              r"LSTM, GRU, Bidirectional\(LSTM / GRU\), Dense, Conv1D"):
            check_quantizable(model, keep_float=False)
        check_quantizable(model, keep_float=True)
        assert float_layers(quantize_model(model, QuantConfig(weights=QuantSpec(4)))) == ["normalize", *listed]
    assert float_layers(quantize_model(build_model(SHAPE, 3, specs.model(units=4)), QuantConfig())) == []


@pytest.mark.parametrize("strategy, spec", [
    (RANGE, QuantSpec(3)),
    (RANGE, QuantSpec(4, granularity="per_channel", estimator="percentile", percentile=99.0)),
    (LSQ, QuantSpec(2, granularity="per_channel")),
    (LSQ, QuantSpec(4, scheme="symmetric")),
])
def test_twin_trains_with_fit_and_keeps_2_to_the_b_values_per_group(tmp_path, strategy, spec):
    learned = strategy is LSQ
    x, y = _data()
    float_model = _float_model(seed=1, dropout=0.1)
    qmodel = quantize_model(float_model, QuantConfig(weights=spec, bias=spec, strategy=strategy))
    before = {k: v.values.copy() for k, v in quantized_weights(qmodel).items()}
    qmodel.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    hist = qmodel.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(hist.history["loss"]))
    after = quantized_weights(qmodel)
    assert list(after) == NAMES
    assert any(np.any(before[k] != after[k].values) for k in NAMES), "training changed no quantized weight"
    for name, t in after.items():
        layer, weight = name.split("/")
        used = qmodel.get_layer(layer).quantized_weight(weight).numpy()
        np.testing.assert_array_equal(t.values, used)                          # exported == what the model uses
        np.testing.assert_array_equal(t.values, dequantize_np(t.codes, t.scale, t.zero_point))
        assert t.codes.min() >= spec.qmin and t.codes.max() <= spec.qmax
        assert max(_distinct_per_group(t.values, spec)) <= 2 ** spec.bits
        if not learned and spec.estimator == "minmax":                         # ranges follow the weights
            w = getattr(qmodel.get_layer(layer), weight).numpy()
            np.testing.assert_array_equal(t.scale, qparams(*estimate_range(w, spec), spec)[0])
    if learned:                                                                # trained scales persist
        qmodel.save(tmp_path / "trained.keras")
        loaded = keras.models.load_model(tmp_path / "trained.keras")
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))


def test_weight_ranges_start_from_the_estimator(float_model):
    spec = QuantSpec(3, granularity="per_channel", estimator="mse")
    qw = quantized_weights(quantize_model(float_model, QuantConfig(weights=spec)))
    w = float_model.get_layer("lstm").cell.kernel.numpy()
    scale, zp = qparams(*estimate_range(w, spec), spec)
    np.testing.assert_allclose(qw["lstm/kernel"].scale, scale, rtol=1e-6)
    np.testing.assert_allclose(qw["lstm/kernel"].values, fake_quant_np(w, spec), atol=1e-6)


def test_calibrate_sets_activation_ranges_from_data(float_model):
    x, _ = _data()
    cfg = QuantConfig(weights=QuantSpec(8), inputs=QuantSpec(8), gates=QuantSpec(8), state=QuantSpec(8))
    qmodel = quantize_model(float_model, cfg)
    uncalibrated = qmodel.predict(x, verbose=0)
    weights_only = quantize_model(float_model, QuantConfig(weights=QuantSpec(8))).predict(x, verbose=0)
    np.testing.assert_allclose(uncalibrated, weights_only, atol=1e-6)           # pass-through until calibrated
    calibrate(qmodel, [x[:24], x[24:]])
    lstm = qmodel.get_layer("lstm")
    normalized = float_model.get_layer("normalize")(x).numpy()
    np.testing.assert_allclose(lstm.activation_quantizers["input"].lo.numpy(), min(normalized.min(), 0), rtol=1e-6)
    np.testing.assert_allclose(lstm.activation_quantizers["input"].hi.numpy(), normalized.max(), rtol=1e-6)
    for g in ("gate_i", "gate_f", "gate_o"):
        aq = lstm.activation_quantizers[g]
        assert aq.lo.numpy() == 0 and 0.5 < aq.hi.numpy() <= 1
    dense_in = qmodel.get_layer("dense").activation_quantizers["input"]
    assert -1 <= dense_in.lo.numpy() < 0 < dense_in.hi.numpy() <= 1                # flattened h
    calibrated = qmodel.predict(x, verbose=0)
    assert 1e-5 < np.abs(calibrated - uncalibrated).max() < 0.05                   # 8 bits: small, not zero
    with pytest.raises(DataError, match="calibration got no batches"):
        calibrate(qmodel, [])


def test_hidden_state_takes_its_own_spec_or_the_states(float_model):
    """`hidden` puts h on its own grid (c stays at `state`); unset, h follows `state`; the spec is saved
    with the layer; values per clip count every time step."""
    x, _ = _data()
    as_state = quantize_model(float_model, QuantConfig(state=QuantSpec(3)))
    same = quantize_model(float_model, QuantConfig(state=QuantSpec(3), hidden=QuantSpec(3)))
    own = quantize_model(float_model, QuantConfig(state=QuantSpec(3), hidden=QuantSpec(6)))
    only_h = quantize_model(float_model, QuantConfig(hidden=QuantSpec(2)))
    for q in (as_state, same, own, only_h):
        calibrate(q, [x])
        freeze_ranges(q)
    np.testing.assert_array_equal(as_state.predict(x, verbose=0), same.predict(x, verbose=0))
    lstm = own.get_layer("lstm")
    assert lstm.activation_quantizers["state_c"].spec.bits == 3 and lstm.activation_quantizers["state_h"].spec.bits == 6
    assert set(only_h.get_layer("lstm").activation_quantizers) == {"state_h"}
    h = only_h.get_layer("lstm").sequence(float_model.get_layer("normalize")(x)).numpy()
    assert all(len(np.unique(h[..., u])) <= 4 for u in range(h.shape[-1]))           # 2 bits per unit
    assert not np.allclose(own.predict(x, verbose=0), as_state.predict(x, verbose=0))
    counts = values_per_clip(own, x[0])
    assert counts[("lstm", "state_h")] == counts[("lstm", "state_c")] == SHAPE[0] * 8
    with pytest.raises(ConfigError, match="QuantConfig.hidden is not allowed with integer=True"):
        QuantConfig(weights=QuantSpec(4), inputs=QuantSpec(8), state=QuantSpec(8), hidden=QuantSpec(4), integer=True)


@pytest.mark.parametrize("strategy", [RANGE, LSQ])
def test_save_and_load_give_identical_predictions(tmp_path, float_model, strategy):
    x, _ = _data()
    cfg = QuantConfig(weights=QuantSpec(4, granularity="per_channel"), bias=QuantSpec(8),
                      inputs=QuantSpec(8, estimator="percentile"), gates=QuantSpec(8), state=QuantSpec(8),
                      hidden=QuantSpec(6), strategy=strategy)
    qmodel = quantize_model(float_model, cfg)
    calibrate(qmodel, [x])
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("lstm"), QLSTM) and loaded.get_layer("lstm").specs == qmodel.get_layer("lstm").specs
    assert loaded.get_layer("lstm").strategy is strategy
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
    for name, t in quantized_weights(loaded).items():
        np.testing.assert_array_equal(t.codes, quantized_weights(qmodel)[name].codes)


def test_freeze_ranges_makes_requantization_exact():
    """Frozen ranges no longer follow the weights: re-quantizing the exported grid values, or weights
    moved by training, uses the stored scale / zero point (what a deployed model does)."""
    keras.utils.set_random_seed(5)
    model = build_model((6, 9), 3, specs.model(units=5))
    q = quantize_model(model, QuantConfig(weights=QuantSpec(3, granularity="per_channel", estimator="mse"),
                                          bias=QuantSpec(3)))
    freeze_ranges(q)
    before = quantized_weights(q)
    for name, t in before.items():                       # load the grid values as the float weights
        layer, weight = name.split("/")
        getattr(q.get_layer(layer), weight).assign(t.values)
    after = quantized_weights(q)
    for name in before:
        np.testing.assert_array_equal(after[name].codes, before[name].codes)
        np.testing.assert_array_equal(after[name].values, before[name].values)
        np.testing.assert_array_equal(after[name].scale, before[name].scale)
    lstm = q.get_layer("lstm")
    lstm.kernel.assign(lstm.kernel * 10.0)               # far outside the frozen range: clipped, not rescaled
    codes = quantized_weights(q)["lstm/kernel"].codes
    assert set(np.unique(codes)) <= {0, 7} | set(np.unique(before["lstm/kernel"].codes))
    np.testing.assert_array_equal(quantized_weights(q)["lstm/kernel"].scale, before["lstm/kernel"].scale)
