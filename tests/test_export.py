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


def _config(bits, granularity, scale_bits=None):
    recipe = specs.recipe("ptq_seed", f"bits={bits}", f"quant.granularity={granularity}",
                          f"quant.scale_bits={'null' if scale_bits is None else scale_bits}")
    return recipe.options.quant_config(recipe.bits)


@pytest.mark.parametrize("bits,scale_bits", [(2, None), (3, None), (4, None), (8, None), (2, 4), (4, 8), (8, 6)])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_packed_model_is_bit_identical(small_model, tmp_path, bits, scale_bits, granularity):
    cfg = _config(bits, granularity, scale_bits)
    qmodel = quantize_model(small_model, cfg)
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

    fresh = quantize_model(small_model, cfg)
    for v in fresh.weights:                                            # scramble, then reload from the file
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype(np.float32))
    load_packed_model(fresh, str(path))
    x = np.random.default_rng(2).normal(size=(5, 7, 20)).astype(np.float32)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), qmodel.predict(x, verbose=0))


def test_not_a_packed_file(tmp_path):
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a packed weight file"):
        read_packed(str(tmp_path / "x"))
    for old in (b"QLSTMPK1", b"QLSTMPK2"):
        (tmp_path / "old").write_bytes(old + bytes(16))
        with pytest.raises(DataError, match="older format"):
            read_packed(str(tmp_path / "old"))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits,scale_bits", [(2, None), (3, 8), (5, 5)])
def test_packed_payload_is_codes_scales_and_small_zero_points(small_model, tmp_path, scheme, bits, scale_bits):
    """Per tensor: codes at `bits` bits, one scale per group (float32, or `scale_bits` bits), the zero
    points offset by their minimum at the width their spread needs (none for the symmetric scheme),
    within QuantSpec.packed_bytes; the scales and zero points read back are the model's."""
    spec = QuantSpec(bits, scheme, "per_channel", scale_bits=scale_bits)
    qmodel = quantize_model(small_model, QuantConfig(weights=spec, bias=QuantSpec(bits, scheme, scale_bits=scale_bits)))
    freeze_ranges(qmodel)
    path = tmp_path / "m.qlstm"
    size = write_packed_model(qmodel, str(path))
    (header,) = struct.unpack("<I", path.read_bytes()[8:12])
    quantized = quantized_weights(qmodel)
    back = read_packed(str(path))
    floats = sum(4 * v.size for k, v in back.items() if k not in quantized)
    expected = floats
    for q in quantized.values():
        groups = q.scale.size
        zp_width = 0 if scheme == "symmetric" else int(q.zero_point.max() - q.zero_point.min()).bit_length()
        expected += -(-q.codes.size * bits // 8) + (4 * groups if scale_bits is None else -(-groups * scale_bits // 8)) \
            + -(-groups * zp_width // 8)
    assert size == 12 + header + expected
    assert size <= 12 + header + floats + sum(q.spec.packed_bytes(q.codes.size, q.scale.size) for q in quantized.values())
    for name, q in quantized.items():
        np.testing.assert_array_equal(back[name].zero_point, q.zero_point)
        assert back[name].scale.tobytes() == np.asarray(q.scale, np.float32).tobytes()


def test_unfrozen_scales_off_the_format_are_refused(small_model, tmp_path):
    """A model whose scales were never snapped (not frozen) cannot be written as `scale_bits` codes."""
    qmodel = quantize_model(small_model, QuantConfig(weights=QuantSpec(4, "asymmetric", "per_channel", scale_bits=5)))
    with pytest.raises(ValueError, match="not on the 5-bit scale format"):
        write_packed_model(qmodel, str(tmp_path / "m.qlstm"))
    assert not (tmp_path / "m.qlstm").exists()


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
