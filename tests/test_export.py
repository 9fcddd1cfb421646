"""Packed b-bit files (bit packing, a whole model written and read back bit-identically) and the
TFLite modes through the stock interpreter."""
import struct

import numpy as np
import pytest
import tf_keras as keras

from qat.errors import DataError
from qat.export.packed import load_packed_model, pack_bits, read_packed, unpack_bits, write_packed_model
from qat.export.tflite import tflite_model
from qat.layers.model import QuantConfig, freeze_ranges, quantize_model, quantized_weights
from qat.quant.spec import QuantSpec
from qat.training.models import build_model
from tests import specs


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_unpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=1001)
    blob = pack_bits(codes, bits)
    assert len(blob) == int(np.ceil(1001 * bits / 8))
    np.testing.assert_array_equal(unpack_bits(blob, bits, 1001), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(np.array([8]), 3)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def small_model(request):
    """The framework's model (conf/model/<cell>.yaml) at a small size, with LSTM and with GRU."""
    keras.utils.set_random_seed(0)
    mean, var = np.full(20, 0.5, np.float32), np.full(20, 2.0, np.float32)
    return build_model((7, 20), 4, specs.model(request.param, units=8), mean, var)


def _config(bits, granularity):
    recipe = specs.recipe("ptq_seed", f"bits={bits}", f"quant.granularity={granularity}")
    return recipe.options.quant_config(recipe.bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_packed_model_is_bit_identical(small_model, tmp_path, bits, granularity):
    qmodel = quantize_model(small_model, _config(bits, granularity))
    freeze_ranges(qmodel)       # deployment: the ranges are part of the exported model
    path = tmp_path / "m.qlstm"
    size = write_packed_model(qmodel, str(path))
    back = read_packed(str(path))
    for name, q in quantized_weights(qmodel).items():
        assert back[name].values.tobytes() == q.values.tobytes()      # bit-identical
        np.testing.assert_array_equal(back[name].codes, q.codes)
    np.testing.assert_array_equal(back["normalize/mean"], small_model.get_layer("normalize").mean.numpy())
    n_weights = sum(q.codes.size for q in quantized_weights(qmodel).values())
    assert size < n_weights * bits / 8 + 4096                          # b bits a weight plus a small header

    fresh = quantize_model(small_model, _config(bits, granularity))
    for v in fresh.weights:                                            # scramble, then reload from the file
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype(np.float32))
    load_packed_model(fresh, str(path))
    x = np.random.default_rng(2).normal(size=(5, 7, 20)).astype(np.float32)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), qmodel.predict(x, verbose=0))


def test_not_a_packed_file(tmp_path):
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a packed weight file"):
        read_packed(str(tmp_path / "x"))
    (tmp_path / "old").write_bytes(b"QLSTMPK1" + bytes(16))
    with pytest.raises(DataError, match="older format"):
        read_packed(str(tmp_path / "old"))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_packed_payload_is_codes_scales_and_integer_zero_points(small_model, tmp_path, scheme, bits):
    """Per tensor: codes and zero points at `bits` bits, one float32 scale per group, no zero points
    for the symmetric scheme (QuantSpec.packed_bytes); the zero points read back are the model's."""
    spec = QuantSpec(bits, scheme, "per_channel")
    qmodel = quantize_model(small_model, QuantConfig(weights=spec, bias=QuantSpec(bits, scheme)))
    freeze_ranges(qmodel)
    path = tmp_path / "m.qlstm"
    size = write_packed_model(qmodel, str(path))
    (header,) = struct.unpack("<I", path.read_bytes()[8:12])
    quantized = quantized_weights(qmodel)
    back = read_packed(str(path))
    payload = sum(q.spec.packed_bytes(q.codes.size, q.scale.size) for q in quantized.values())
    payload += sum(4 * v.size for k, v in back.items() if k not in quantized)
    assert size == 12 + header + payload
    for name, q in quantized.items():
        np.testing.assert_array_equal(back[name].zero_point, q.zero_point)


@pytest.mark.parametrize("mode,tol", [("float16", 1e-2), ("dynamic", 5e-2), ("int8", 0.15)])
def test_tflite_modes_follow_keras(small_model, mode, tol):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 7, 20)).astype(np.float32)
    model, info = tflite_model(small_model, mode, representative=x)
    assert info["size_bytes"] > 0
    ref = small_model.predict(x, verbose=0)
    out = model.predict(x)
    assert np.abs(out - ref).max() < tol
    again = model.predict(x[:1])            # state is reset between clips: same clip, same answer
    np.testing.assert_array_equal(again[0], out[0])
    assert len(model.latencies_ms) == 21


def test_tflite_int8_io(small_model):
    x = np.random.default_rng(4).normal(size=(10, 7, 20)).astype(np.float32)
    model, _ = tflite_model(small_model, "int8", representative=x, int8_io=True)
    assert model.inp["dtype"] == np.int8 and model.out["dtype"] == np.int8
    assert np.abs(model.predict(x) - small_model.predict(x, verbose=0)).max() < 0.2
    with pytest.raises(DataError, match="representative"):
        tflite_model(small_model, "int8")
