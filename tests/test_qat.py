"""QAT recipes on a small real task: they train, honour 2^b levels, and the packed export predicts
exactly what the fake-quant graph predicts."""
import numpy as np
import pytest

from qat import ConfigError
from qat.data import DataSpec
from qat.experiment import RunSpec, train_float
from qat.features import FeatureSpec, load_features
from qat.models import ModelSpec
from qat.recipes import RecipeSpec, run_recipe
from qat.tracking import Tracker
from qat.training import TrainSpec

TRAINER = TrainSpec(epochs=2, batch_size=32, patience=0)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from tests.conftest import SPEECH_COMMANDS

    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    feats = load_features(DataSpec(root=str(SPEECH_COMMANDS), limit_per_class=40),
                          FeatureSpec(log=True, normalize=True), str(tmp_path_factory.mktemp("cache")))
    model, _ = train_float(RunSpec(model=ModelSpec(units=12), features=FeatureSpec(log=True, normalize=True),
                                   trainer=TRAINER), feats, Tracker())
    return model, feats


def _run(float_model, tmp_path, method, bits, act_bits=None, state_bits=None, **options):
    model, feats = float_model
    spec = RecipeSpec(method=method, bits=bits, act_bits=act_bits, state_bits=state_bits,
                      options={"epochs": 2, "calibration_size": 64, **options})
    return run_recipe(spec, model, feats, TRAINER, 0, tmp_path, Tracker())


@pytest.mark.parametrize("method,bits,act,state", [("qat", 2, None, None), ("qat", 3, 4, 4), ("qat_lsq", 2, 4, 4)])
def test_qat_levels_and_packed_export(float_model, tmp_path, method, bits, act, state):
    result = _run(float_model, tmp_path, method, bits, act, state)
    s = result.summary
    assert s["quant/levels_ok"] and s["qat/packed_matches"]
    assert all(v <= 2 ** bits for k, v in s.items() if k.endswith("/levels"))
    assert (tmp_path / f"model_{bits}bit.qlstm").stat().st_size == s["quant/size_bytes"]
    assert s["qat/epochs"] == 2 and 1 <= s["qat/best_epoch"] <= 2


def test_qat_with_per_unit_state_ranges_and_time_shift(float_model, tmp_path):
    """W2/A4/S4 with one range per LSTM unit for the state (and per feature for the input), fine-tuned
    on time-shifted frames: every unit has its own calibrated range and the packed model still
    predicts what the fake-quant graph predicts."""
    model, feats = float_model
    trainer = TrainSpec(epochs=2, batch_size=32, patience=0, time_shift_ms=60)
    spec = RecipeSpec(method="qat", bits=2, act_bits=4, state_bits=4,
                      options={"epochs": 2, "calibration_size": 64, "act_granularity": "per_channel",
                               "act_estimator": "percentile"})
    result = run_recipe(spec, model, feats, trainer, 0, tmp_path, Tracker())
    s = result.summary
    assert s["quant/levels_ok"] and s["qat/packed_matches"] and s["qat/epochs"] == 2
    lstm = result.model.get_layer("lstm")
    c = lstm.activation_quantizers["state_c"]
    assert c.hi.shape == (12,) and len(np.unique(c.hi.numpy())) > 1      # a range per unit, not one shared
    assert lstm.activation_quantizers["input"].hi.shape == (feats.input_shape[-1],)
    assert result.model.get_layer("dense").activation_quantizers["input"].hi.shape == ()   # per tensor


def test_qat_moves_the_weights_and_lowers_bits_progressively(float_model, tmp_path):
    model, _ = float_model
    result = _run(float_model, tmp_path, "qat", 2, progressive_bits=[6, 4], freeze_ranges_after=1,
                  learning_rate=1e-3)
    assert result.summary["qat/stages"] == [6, 4, 2] and result.summary["qat/epochs"] == 6
    moved = np.abs(result.model.get_layer("lstm").kernel.numpy() - model.get_layer("lstm").cell.kernel.numpy())
    assert moved.max() > 0


def test_qat_with_distillation_trains_from_the_float_model(float_model, tmp_path):
    """quant.distill > 0: the quantized model learns from the float model's outputs; the float model is
    untouched and the result is still a real b-bit model."""
    model, _ = float_model
    before = [w.copy() for w in model.get_weights()]
    result = _run(float_model, tmp_path, "qat", 2, distill=0.5, temperature=2.0, learning_rate=1e-3)
    assert result.summary["quant/levels_ok"] and result.summary["qat/packed_matches"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    moved = np.abs(result.model.get_layer("lstm").kernel.numpy() - model.get_layer("lstm").cell.kernel.numpy())
    assert moved.max() > 0


def test_qat_tfmot(float_model, tmp_path):
    result = _run(float_model, tmp_path, "qat_tfmot", 3, scheme="symmetric")
    assert result.summary["quant/levels_ok"]
    assert any(k.startswith("quant/weights/lstm") for k in result.summary)
    with pytest.raises(ConfigError, match="state_bits=4 is not allowed with quant.method=qat_tfmot"):
        _run(float_model, tmp_path, "qat_tfmot", 3, state_bits=4)


@pytest.mark.parametrize("options,needle", [({"epochs": 0}, "quant.epochs=0"),
                                            ({"progressive_bits": [2]}, "progressive_bits"),
                                            ({"progressive_bits": [4, 8]}, "decreasing"),
                                            ({"learning_rate": -1}, "learning_rate"),
                                            ({"distill": 1.5}, "quant.distill=1.5"),
                                            ({"distill": 0.5, "temperature": 0}, "quant.temperature=0"),
                                            ({"warmup": 3}, "quant.warmup is not an option")])
def test_bad_qat_options(float_model, tmp_path, options, needle):
    with pytest.raises(ConfigError, match=needle):
        _run(float_model, tmp_path, "qat", 3, **options)
