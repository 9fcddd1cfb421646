"""QAT recipes on a small real task: they train, honour 2^b levels, and the packed export predicts
exactly what the fake-quant graph predicts."""
import numpy as np
import pytest

from qat.data.features import load_features
from qat.errors import ConfigError
from qat.experiment import train_float
from qat.tracking import Tracker
from tests import specs
from tests.conftest import SPEECH_COMMANDS

SMALL = ("trainer=default", "trainer.epochs=2", "trainer.batch_size=32", "trainer.patience=0")


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    run = specs.run(f"data.root={SPEECH_COMMANDS}", "data.limit_per_class=40", "features=log_stft_norm",
                    "model.units=12", *SMALL)
    feats = load_features(run.data, run.features, str(tmp_path_factory.mktemp("cache")))
    model, _ = train_float(run, feats, Tracker())
    return model, feats


def _run(float_model, tmp_path, method, *overrides, trainer=SMALL):
    model, feats = float_model
    recipe = specs.recipe(method, "quant.epochs=2", "quant.act_epochs=2", "quant.calibration_size=64", *overrides)
    return recipe.run(specs.context(model, feats, recipe, tmp_path, *trainer))


@pytest.mark.parametrize("method,bits", [("qat", ["bits=2"]), ("qat", ["bits=3", "act_bits=4", "state_bits=4"]),
                                         ("qat_lsq", ["bits=2", "act_bits=4", "state_bits=4"])])
def test_qat_levels_and_packed_export(float_model, tmp_path, method, bits):
    s = _run(float_model, tmp_path, method, *bits).summary
    b = int(bits[0].split("=")[1])
    assert s["quant/levels_ok"] and s["qat/packed_matches"]
    assert all(v <= 2 ** b for k, v in s.items() if k.endswith("/levels"))
    assert (tmp_path / f"model_{b}bit.qlstm").stat().st_size == s["quant/size_bytes"]
    assert s["qat/epochs"] == 2 and 1 <= s["qat/best_epoch"] <= 2
    assert s["qat/learned"] == (method == "qat_lsq")


def test_qat_with_per_unit_state_ranges_and_time_shift(float_model, tmp_path):
    """W2/A4/S4 with one range per LSTM unit for the state (and per feature for the input), fine-tuned
    on time-shifted frames: every unit has its own calibrated range and the packed model still
    predicts what the fake-quant graph predicts."""
    _, feats = float_model
    result = _run(float_model, tmp_path, "qat", "bits=2", "act_bits=4", "state_bits=4",
                  "quant.act_granularity=per_channel", "quant.act_estimator=percentile",
                  trainer=SMALL + ("trainer.time_shift_ms=60",))
    s = result.summary
    assert s["quant/levels_ok"] and s["qat/packed_matches"] and s["qat/epochs"] == 2
    lstm = result.model.get_layer("lstm")
    c = lstm.activation_quantizers["state_c"]
    assert c.hi.shape == (12,) and len(np.unique(c.hi.numpy())) > 1      # a range per unit, not one shared
    assert lstm.activation_quantizers["input"].hi.shape == (feats.input_shape[-1],)
    assert result.model.get_layer("dense").activation_quantizers["input"].hi.shape == ()   # per tensor


def test_qat_moves_the_weights_and_lowers_bits_progressively(float_model, tmp_path):
    model, _ = float_model
    result = _run(float_model, tmp_path, "qat", "bits=2", "quant.progressive_bits=[6,4]",
                  "quant.freeze_ranges_after=1", "quant.learning_rate=1e-3")
    assert result.summary["qat/stages"] == [6, 4, 2] and result.summary["qat/epochs"] == 6
    moved = np.abs(result.model.get_layer("lstm").kernel.numpy() - model.get_layer("lstm").cell.kernel.numpy())
    assert moved.max() > 0


@pytest.mark.parametrize("distill", ["0", "0.5"])
def test_qat_with_and_without_distillation_leaves_the_float_model_alone(float_model, tmp_path, distill):
    """quant.distill > 0: the quantized model learns from the float model's outputs as well; either way
    the float model is untouched and the result is a real b-bit model."""
    model, _ = float_model
    before = [w.copy() for w in model.get_weights()]
    result = _run(float_model, tmp_path, "qat", "bits=2", f"quant.distill={distill}", "quant.temperature=2.0",
                  "quant.learning_rate=1e-3")
    assert result.summary["quant/levels_ok"] and result.summary["qat/packed_matches"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    moved = np.abs(result.model.get_layer("lstm").kernel.numpy() - model.get_layer("lstm").cell.kernel.numpy())
    assert moved.max() > 0


def test_qat_tfmot(float_model, tmp_path):
    result = _run(float_model, tmp_path, "qat_tfmot", "bits=3")
    assert result.summary["quant/levels_ok"]
    assert any(k.startswith("quant/weights/lstm") for k in result.summary)
    with pytest.raises(ConfigError, match="state_bits=4 is not allowed with quant.method=qat_tfmot"):
        specs.recipe("qat_tfmot", "bits=3", "state_bits=4")


@pytest.mark.parametrize("override,needle", [("quant.epochs=0", "quant.epochs=0"),
                                             ("quant.progressive_bits=[2]", "progressive_bits"),
                                             ("quant.progressive_bits=[4,8]", "decreasing"),
                                             ("quant.learning_rate=-1", "learning_rate"),
                                             ("quant.distill=1.5", "quant.distill=1.5"),
                                             ("quant.temperature=0", "quant.temperature=0"),
                                             ("+quant.warmup=3", "quant.warmup is not an option")])
def test_bad_qat_options(override, needle):
    with pytest.raises(ConfigError, match=needle):
        specs.recipe("qat", "bits=3", override)
