"""Real Hydra composition of the shipped configs, turned into specs."""
import os
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat import ConfigError
from qat.config import logger_spec, run_spec
from tests.conftest import REPO

os.environ.setdefault("LSTM_QAT_REPO", str(REPO))


def composed(*overrides, name="config"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_study_preset_is_the_study():
    spec = run_spec(composed("experiment=study"))
    assert spec.data.name == "speech_commands" and spec.data.task == "seed"
    assert spec.data.root.endswith("shared/data/speech_commands_v2_test")
    assert (spec.features.frame_length, spec.features.frame_step, spec.features.fft_length) == (480, 320, 512)
    assert (spec.features.mel_bins, spec.features.log, spec.features.normalize) == (0, False, False)
    assert spec.features.log_floor_db == 0
    assert spec.model.units == 80 and spec.model.layers == 1 and spec.model.dropout == 0
    assert not spec.trainer.augment


def test_default_config_is_the_stronger_baseline_with_4_bit_ptq():
    assert run_spec(composed()) == run_spec(composed("experiment=seed_task_best"))
    spec = run_spec(composed())
    assert spec.recipe.method == "ptq" and spec.recipe.bits == 4 and spec.seed == 0
    assert logger_spec(composed()).mode == "offline"


def test_seed_task_best_preset():
    spec = run_spec(composed("experiment=seed_task_best"))
    assert spec.model.units == 80 and spec.model.dropout == 0
    assert (spec.features.mel_bins, spec.features.log, spec.features.normalize) == (40, True, True)
    assert spec.features.log_floor_db == 50
    assert spec.trainer.time_shift_ms == 100 and spec.trainer.augment and spec.trainer.noise_prob == 0


def test_qat_and_ptq_defaults_are_the_documented_recipes():
    qat = run_spec(composed("quant=qat", "bits=3")).recipe.options
    assert (qat["estimator"], qat["distill"], qat["temperature"]) == ("mse", 0.5, 4.0)
    ptq = run_spec(composed()).recipe.options
    assert ptq["search"] is True and ptq["refine_epochs"] == 20 and ptq["refine_learning_rate"] == 1e-4


def test_qat_act_preset_is_qat_with_its_fine_tuning_settings():
    spec = run_spec(composed("quant=qat_act", "act_bits=4", "state_bits=4", "bits=2"))
    base = run_spec(composed("quant=qat", "act_bits=4", "state_bits=4", "bits=2"))
    assert spec.recipe.method == "qat" and (spec.recipe.act_bits, spec.recipe.state_bits) == (4, 4)
    assert spec.recipe.options["learning_rate"] == 0.001 and spec.recipe.options["epochs"] == 20
    assert {k: v for k, v in spec.recipe.options.items() if k not in ("learning_rate", "epochs")} == \
        {k: v for k, v in base.recipe.options.items() if k not in ("learning_rate", "epochs")}


def test_data_groups_compose():
    assert run_spec(composed("data=kws12")).data.task == "kws12"
    fsdd = run_spec(composed("data=fsdd"))
    assert fsdd.data.name == "fsdd" and fsdd.data.root.endswith("shared/data/fsdd")
    assert run_spec(composed("data=folder", "data.root=/x")).data.name == "folder"
    assert logger_spec(composed("logger=none")).mode == "disabled"


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("LSTM_QAT_DATA", "/elsewhere")
    assert run_spec(composed()).data.root == "/elsewhere/speech_commands_v2_test"


@pytest.mark.parametrize("override,needle", [("bits=1", "bits=1 is not allowed: expected an integer 2..16"),
                                             ("bits=17", "bits=17"), ("bits=abc", "bits='abc'"),
                                             ("act_bits=0", "act_bits=0"), ("seed=-1", "seed=-1"),
                                             ("trainer.epochs=0", "trainer.epochs=0"),
                                             ("logger.mode=cloud", "logger.mode='cloud'"),
                                             ("+data.colour=red", "data.colour is not a setting")])
def test_bad_values_give_one_line_errors(override, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        cfg = composed(override)
        run_spec(cfg), logger_spec(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("quant.act_granularity=foo", "quant.act_granularity='foo' is not allowed: expected one of per_tensor, per_channel"),
    ("quant.estimator=max", "quant.estimator='max' is not allowed"),
    ("quant.percentile=120", "quant.percentile=120 is not allowed"),
    ("quant.calibration_size=0", "quant.calibration_size=0 is not allowed"),
    ("quant.bias=maybe", "quant.bias='maybe' is not allowed: expected true or false"),
    ("quant.search=maybe", "quant.search='maybe' is not allowed: expected true or false"),
    ("quant=qat quant.distill=2", "quant.distill=2 is not allowed: expected a weight in [0, 1]"),
    ("quant=qat quant.epochs=0", "quant.epochs=0 is not allowed"),
    ("quant=qat_act quant.learning_rate=-1", "quant.learning_rate=-1 is not allowed"),
    ("quant=tflite_int8 quant.int8_io=2", "quant.int8_io=2 is not allowed: expected true or false"),
    ("quant=tflite_int8 +quant.colour=red", "quant.colour is not an option of quant.method=tflite_int8")])
def test_bad_quant_options_fail_before_any_training(override, needle):
    """Shared and recipe-specific quantization options are checked when the config is read, with a
    one-line error naming the key, not after the float model has been trained."""
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        run_spec(composed(*override.split()))
    assert "\n" not in str(e.value)
