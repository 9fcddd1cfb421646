"""Bidirectional LSTM and GRU: the twin is Keras' Bidirectional with both directions quantized
(every merge mode, sequences and last state), and it calibrates, rounds (GPTQ, bias correction),
saves, packs and reloads like a plain recurrent model."""
import numpy as np
import pytest
import tf_keras as keras

from qat.algorithms.bias_correction import bias_correct
from qat.algorithms.calibration import calibrate
from qat.algorithms.gptq import gptq
from qat.config import run_spec
from qat.errors import ConfigError
from qat.export.packed import load_packed_model, write_packed_model
from qat.layers.gru import QGRU
from qat.layers.lstm import QLSTM
from qat.layers.model import (QuantConfig, float_layers, freeze_ranges, quantize_model, quantized_layers,
                              quantized_weights, weight_tensor_names)
from qat.layers.streaming import Streamer
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs
from tests.sequences import F, T, U, sequences

CELLS = {"lstm": (keras.layers.LSTM, QLSTM), "gru": (keras.layers.GRU, QGRU)}


def _bi_model(cell, merge_mode="concat", return_sequences=True):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((T, F))
    out = keras.layers.Bidirectional(CELLS[cell][0](U, return_sequences=return_sequences, name=cell),
                                     merge_mode=merge_mode, name=f"bi{cell}")(inputs)
    return keras.Model(inputs, out)


def _outputs(model, x):
    out = model(x)
    return [o.numpy() for o in out] if isinstance(out, list) else [out.numpy()]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_twin_without_quantizers_equals_keras_bidirectional(cell, merge_mode, return_sequences):
    model, x = _bi_model(cell, merge_mode, return_sequences), sequences(6)
    twin = quantize_model(model, QuantConfig())
    bi = twin.get_layer(f"bi{cell}")
    assert isinstance(bi.forward_layer, CELLS[cell][1]) and isinstance(bi.backward_layer, CELLS[cell][1])
    assert bi.backward_layer.go_backwards and not bi.forward_layer.go_backwards
    for mine, theirs in zip(_outputs(twin, x), _outputs(model, x)):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_both_directions_quantized_calibrated_saved_and_packed(cell, tmp_path):
    x = sequences(7, (32, T, F))
    model = build_model((T, F), 3, specs.model(cell, units=U, bidirectional=True), np.zeros(F), np.ones(F))
    names = weight_tensor_names(model)
    assert {f"forward_{cell}/kernel", f"backward_{cell}/recurrent_kernel", "dense/kernel"} <= set(names)
    spec = QuantSpec(8)
    cfg = QuantConfig(weights=QuantSpec(3, granularity="per_channel"), bias=QuantSpec(8), inputs=spec, gates=spec,
                      state=spec)
    qmodel = quantize_model(model, cfg)
    assert [l.name for l in quantized_layers(qmodel)] == [f"forward_{cell}", f"backward_{cell}", "dense"]
    assert float_layers(qmodel) == ["normalize"]
    calibrate(qmodel, [x])
    for layer in quantized_layers(qmodel)[:2]:            # each direction has its own ranges
        assert all(float(np.max(q.hi.numpy())) > 0 for q in layer.activation_quantizers.values())
    fw, bw = (quantized_layers(qmodel)[i].activation_quantizers["state_h"].hi.numpy() for i in (0, 1))
    assert not np.array_equal(fw, bw)
    freeze_ranges(qmodel)
    codes = quantized_weights(qmodel)
    assert max(len(np.unique(codes[f"backward_{cell}/kernel"].codes[:, c])) for c in range(U)) <= 8
    expected = qmodel(x).numpy()
    qmodel.save(tmp_path / "twin.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "twin.keras")(x).numpy(), expected)
    write_packed_model(qmodel, str(tmp_path / "m.qlstm"))
    fresh = quantize_model(model, cfg)
    fresh(x)
    load_packed_model(fresh, str(tmp_path / "m.qlstm"))
    np.testing.assert_array_equal(fresh(x).numpy(), expected)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gptq_and_bias_correction_reach_both_directions(cell):
    x = sequences(8, (48, T, F))
    model = build_model((T, F), 3, specs.model(cell, units=U, bidirectional=True), np.zeros(F), np.ones(F))
    qmodel = quantize_model(model, QuantConfig(weights=QuantSpec(3, granularity="per_channel")))
    freeze_ranges(qmodel)
    before = {n: t.values.copy() for n, t in quantized_weights(qmodel).items()}
    gptq(model, qmodel, x)
    after = quantized_weights(qmodel)
    for direction in ("forward", "backward"):
        assert not np.array_equal(after[f"{direction}_{cell}/kernel"].values, before[f"{direction}_{cell}/kernel"])
    sizes = bias_correct(model, qmodel, x)
    assert set(sizes) == {f"forward_{cell}", f"backward_{cell}", "dense"} and all(v > 0 for v in sizes.values())


def test_what_cannot_take_a_bidirectional_model_says_so():
    with pytest.raises(ConfigError, match="model.bidirectional=true is not allowed with quant.method=qat_tfmot"):
        run_spec(specs.composed("model=bilstm", "quant=qat_tfmot"))
    with pytest.raises(ConfigError, match="reads the clip backwards"):
        Streamer(_bi_model("lstm"))
    assert run_spec(specs.composed("model=bilstm", "quant=qat")).model.bidirectional
