"""Real Hydra composition of the shipped configs, turned into typed specs: the presets are what they
say, every default lives in the YAML alone, and every bad value fails when the config is read."""
import copy
import dataclasses
import re

import pytest
from omegaconf import OmegaConf

from qat.algorithms.predict import PredictSpec
from qat.config import OPTIONS_ADDED, logger_spec, proposal_command, proposal_overrides, run_spec, saved_config
from qat.data.datasets import DataSpec
from qat.data.features import FeatureSpec
from qat.errors import ConfigError
from qat.layers.model import QuantConfig
from qat.quant.spec import QuantSpec
from qat.recipes.base import RECIPES, BitWidths
from qat.tracking import LoggerSpec
from qat.training.fit import TrainSpec
from qat.training.models import ModelSpec
from tests.conftest import REPO
from tests.specs import composed

QUANT_PRESETS = sorted(p.stem for p in (REPO / "conf" / "quant").glob("*.yaml"))


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
    assert spec.recipe.method == "ptq" and spec.recipe.bits == BitWidths(4, None, None) and spec.seed == 0
    assert logger_spec(composed()).mode == "offline"


def test_seed_task_best_preset():
    spec = run_spec(composed("experiment=seed_task_best"))
    assert spec.model.units == 80 and spec.model.dropout == 0
    assert (spec.features.mel_bins, spec.features.log, spec.features.normalize) == (40, True, True)
    assert spec.features.log_floor_db == 50
    assert spec.trainer.time_shift_ms == 100 and spec.trainer.augment and spec.trainer.noise_prob == 0


def test_qat_and_ptq_defaults_are_the_documented_recipes():
    qat = run_spec(composed("quant=qat", "bits=3")).recipe.options
    assert (qat.estimator, qat.granularity, qat.distill, qat.temperature) == ("mse", "per_channel", 0.5, 4.0)
    ptq = run_spec(composed()).recipe.options
    assert ptq.search and ptq.gptq and ptq.bias_correction and ptq.granularity == "per_channel"
    assert ptq.percentile == 99.9 and ptq.refine_epochs == 20 and ptq.refine_learning_rate == 1e-4
    seed = run_spec(composed("quant=ptq_seed")).recipe.options
    assert (seed.granularity, seed.estimator, seed.gptq, seed.search, seed.bias_correction, seed.refine_epochs) \
        == ("per_tensor", "minmax", False, False, False, 0)


def test_qat_picks_its_schedule_from_what_is_quantized():
    weights = run_spec(composed("quant=qat", "bits=2")).recipe
    acts = run_spec(composed("quant=qat", "bits=2", "act_bits=4", "state_bits=4")).recipe
    assert weights.options.schedule(weights.bits) == (10, 1e-4, "quant.learning_rate")
    assert acts.options.schedule(acts.bits) == (20, 1e-3, "quant.act_learning_rate")
    state_only = run_spec(composed("quant=qat", "bits=2", "state_bits=8")).recipe
    assert state_only.options.schedule(state_only.bits)[:2] == (20, 1e-3)


def test_every_preset_names_a_registered_recipe_and_every_recipe_has_a_preset():
    methods = {run_spec(composed(f"quant={name}")).recipe.method for name in QUANT_PRESETS}
    assert methods == set(RECIPES)


def test_data_groups_compose():
    assert run_spec(composed("data=kws12")).data.task == "kws12"
    fsdd = run_spec(composed("data=fsdd"))
    assert fsdd.data.name == "fsdd" and fsdd.data.root.endswith("shared/data/fsdd") and fsdd.data.task is None
    assert run_spec(composed("data=folder", "data.root=/x")).data.name == "folder"
    assert logger_spec(composed("logger=none")).mode == "disabled"


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("LSTM_QAT_DATA", "/elsewhere")
    assert run_spec(composed()).data.root == "/elsewhere/speech_commands_v2_test"


CONFIG_SPECS = [DataSpec, FeatureSpec, ModelSpec, TrainSpec, LoggerSpec, PredictSpec, BitWidths] + \
    sorted({r.options_type for r in RECIPES.values()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", CONFIG_SPECS, ids=lambda c: c.__name__)
def test_defaults_live_in_the_yaml_only(cls):
    """A spec built from the config has no default of its own that could disagree with conf/."""
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_default, f"{cls.__name__} has code defaults for {with_default}: put them in conf/ only"


@pytest.mark.parametrize("override,needle", [("bits=1", "bits=1 is not allowed: expected an integer 2..16"),
                                             ("bits=17", "bits=17"), ("bits=abc", "bits='abc'"),
                                             ("act_bits=0", "act_bits=0"), ("state_bits=4.5", "state_bits=4.5"),
                                             ("seed=-1", "seed=-1"), ("verbose=5", "verbose=5"),
                                             ("trainer.epochs=0", "trainer.epochs=0"),
                                             ("trainer.learning_rate=abc", "trainer.learning_rate='abc'"),
                                             ("trainer.learning_rate=inf", "trainer.learning_rate=inf"),
                                             ("model.dropout=abc", "model.dropout='abc'"),
                                             ("data.sample_rate=abc", "data.sample_rate='abc'"),
                                             ("data.clip_seconds=abc", "data.clip_seconds='abc'"),
                                             ("features.mel_bins=abc", "features.mel_bins='abc'"),
                                             ("features.log_offset=abc", "features.log_offset='abc'"),
                                             ("predict.calib=test", "predict.calib='test'"),
                                             ("logger.mode=cloud", "logger.mode='cloud'"),
                                             ("+data.colour=red", "data.colour is not a setting"),
                                             ("~trainer.patience", "trainer.patience is missing")])
def test_bad_values_give_one_line_errors(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
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
    ("quant=qat quant.act_learning_rate=-1", "quant.act_learning_rate=-1 is not allowed"),
    ("quant=tflite_int8 quant.int8_io=2", "quant.int8_io=2 is not allowed: expected true or false"),
    ("quant=tflite_int8 +quant.colour=red", "quant.colour is not an option of quant.method=tflite_int8"),
    ("quant.method=ptq_fancy", "quant.method='ptq_fancy' is not allowed: expected one of"),
    # combinations that only a rule across settings catches
    ("quant=ptq quant.narrow_range=true", "narrow_range=True is not allowed with scheme='asymmetric'"),
    ("quant=qat_tfmot state_bits=4", "state_bits=4 is not allowed with quant.method=qat_tfmot"),
    ("quant=qat_tfmot quant.progressive_bits=[8]", "quant.progressive_bits=[8] is not allowed with quant.method="),
    ("quant=qat_lsq quant.progressive_bits=[3] bits=4", "quant.progressive_bits=[3] is not allowed: expected bit"),
    ("quant=ptq bits=4 act_bits=1", "act_bits=1 is not allowed"),
    ("quant=ptq quant.tensor_bits={lstm/kernal:3}", "quant.tensor_bits names lstm/kernal, which the model does not "
                                                    "have: expected names among lstm/kernel, lstm/recurrent_kernel"),
    ("quant=qat model=gru quant.tensor_bits={lstm/kernel:3}", "expected names among gru/kernel"),
    ("quant=ptq quant.tensor_bits={lstm/kernel:1}", "quant.tensor_bits={'lstm/kernel': 1} is not allowed"),
    ("quant=ptq quant.gate_bits=17", "quant.gate_bits=17 is not allowed"),
    ("quant=ptq quant.integer=true act_bits=8 quant.hidden_bits=4", "quant.hidden_bits=4 is not allowed with "
                                                                    "quant.integer=true"),
    ("quant=qat_tfmot quant.gate_bits=4", "quant.gate_bits=4 is not allowed with quant.method=qat_tfmot")])
def test_bad_quant_options_fail_before_any_training(override, needle):
    """Shared and recipe-specific quantization options are checked when the config is read, with a
    one-line error naming the key, not after the float model has been trained."""
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        run_spec(composed(*override.split()))
    assert "\n" not in str(e.value)


def test_tensor_gate_and_hidden_bits_reach_the_quant_config():
    """quant.tensor_bits sets named weights and biases apart from `bits` (each keeping its own kind of
    spec); gate_bits and hidden_bits set the gates and h apart from act_bits and state_bits."""
    r = run_spec(composed("quant=ptq", "bits=4", "act_bits=8", "state_bits=6", "quant.gate_bits=5",
                          "quant.hidden_bits=7", "quant.tensor_bits={lstm/kernel:3,dense/bias:8}")).recipe
    cfg = r.options.quant_config(r.bits)
    assert cfg.overrides == {"lstm/kernel": dataclasses.replace(cfg.weights, bits=3),
                             "dense/bias": dataclasses.replace(cfg.bias, bits=8)}
    assert (cfg.weights.bits, cfg.inputs.bits, cfg.gates.bits, cfg.state.bits, cfg.hidden.bits) == (4, 8, 5, 6, 7)
    plain = run_spec(composed("quant=ptq", "bits=4", "act_bits=8", "state_bits=6")).recipe
    cfg = plain.options.quant_config(plain.bits)
    assert cfg.overrides == {} and cfg.gates.bits == 8 and cfg.hidden is None     # h as the state
    gates_only = run_spec(composed("quant=qat", "bits=4", "quant.gate_bits=4")).recipe
    cfg = gates_only.options.quant_config(gates_only.bits)
    assert cfg.inputs is None and cfg.gates.bits == 4 and cfg.quantizes_activations


@pytest.mark.parametrize("preset", ["qat", "ptq", "ptq_tflite"])
def test_a_run_saved_before_an_option_existed_still_evaluates(preset, tmp_path):
    """A run folder whose saved config predates options in OPTIONS_ADDED reads as the run it was."""
    cfg = composed(f"quant={preset}", "bits=3")
    older = copy.deepcopy(cfg)
    for key in OPTIONS_ADDED:
        older["quant"].pop(key, None)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(older), tmp_path / ".hydra" / "config.yaml")
    assert run_spec(saved_config(str(tmp_path))) == run_spec(cfg)


LSTM_TENSORS = ["lstm/kernel", "lstm/recurrent_kernel", "lstm/bias", "dense/kernel", "dense/bias"]


def _specs_of(cfg, names):
    """Every named weight's spec and the activation parts' specs (a percentile an estimator does not
    use left out)."""
    def used(spec):
        return spec if spec is None or spec.estimator == "percentile" else dataclasses.replace(spec, percentile=100)
    return ({n: used(cfg.overrides.get(n, cfg.bias if n.endswith("/bias") else cfg.weights)) for n in names},
            [used(getattr(cfg, part)) for part in ("inputs", "gates", "state", "hidden")])


def _proposal(parts: bool) -> QuantConfig:
    """A config as qat.algorithms.proposal proposes one: per-tensor round-to-nearest weights at
    their own bits, biases at 8, activation parts (per channel, percentile) at theirs."""
    w = QuantSpec(4, "asymmetric", "per_tensor", -1, "minmax")
    act = lambda b: QuantSpec(b, "asymmetric", "per_channel", -1, "percentile", 99.9) if parts else None
    bits = {"lstm/kernel": 5, "lstm/recurrent_kernel": 4, "lstm/bias": 8, "dense/kernel": 3, "dense/bias": 8}
    return QuantConfig(weights=w, bias=QuantSpec(4), overrides={n: dataclasses.replace(w, bits=b) if "kernel" in n
                                                                 else QuantSpec(b) for n, b in bits.items()},
                       inputs=act(5), gates=act(4), state=act(7), hidden=act(4))


@pytest.mark.parametrize("parts", [False, True])
def test_a_proposals_command_composes_into_the_proposed_config(parts):
    """Hydra composes the printed overrides into a ptq_seed run whose QuantConfig quantizes every
    tensor and activation part exactly as the proposal does."""
    proposal = _proposal(parts)
    r = run_spec(composed(*proposal_overrides(proposal, LSTM_TENSORS))).recipe
    assert r.method == "ptq_seed"
    assert _specs_of(r.options.quant_config(r.bits), LSTM_TENSORS) == _specs_of(proposal, LSTM_TENSORS)


def test_a_proposals_command_keeps_the_runs_data_model_and_seed(tmp_path):
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(["data=fsdd", "model.units=32", "seed=2", "quant=qat", "bits=2", "act_bits=4",
                                     "quant.epochs=3", "hydra.run.dir=somewhere"]), tmp_path / ".hydra" / "overrides.yaml")
    cmd = proposal_command(str(tmp_path), _proposal(True), LSTM_TENSORS)
    assert cmd.startswith("python train.py data=fsdd model.units=32 seed=2 bits=3 quant=ptq_seed ")
    assert " 'quant.tensor_bits={lstm/kernel:5,lstm/recurrent_kernel:4,lstm/bias:8,dense/bias:8}' " in cmd
    assert not any(k in cmd for k in ("quant=qat", "quant.epochs", "hydra.run.dir", "act_bits=4", "bits=2"))


# qat_tfmot and the TFLite-exact presets fix activation / state quantization themselves (and refuse the settings)
@pytest.mark.parametrize("preset", [p for p in QUANT_PRESETS if p not in ("qat_tfmot", "ptq_tflite", "qat_tflite")])
@pytest.mark.parametrize("bits", [["bits=2"], ["bits=8", "act_bits=8"], ["bits=4", "act_bits=8", "state_bits=4"]])
def test_every_preset_is_valid_at_every_bit_width(preset, bits):
    assert run_spec(composed(f"quant={preset}", *bits)).recipe.bits.bits == int(bits[0].split("=")[1])


def _bad_values(value):
    """Values of the wrong kind or range for a setting whose shipped value is `value`."""
    if isinstance(value, bool):
        return ["maybe", 2]
    if isinstance(value, (int, float)) or value is None:
        return ["abc", -1, float("nan")]
    if isinstance(value, str):
        return ["nonsense", 3]
    if isinstance(value, list):
        return [["x"], "abc"]
    raise AssertionError(f"no bad value known for {value!r}")


def _cases():
    for preset in QUANT_PRESETS:
        cfg = composed(f"quant={preset}")
        for key, value in cfg["quant"].items():
            if key != "method":
                yield pytest.param(preset, cfg, key, value, id=f"{preset}-{key}")


@pytest.mark.parametrize("preset,cfg,key,value", list(_cases()))
def test_every_option_of_every_preset_is_checked(preset, cfg, key, value):
    """Every option of every conf/quant preset refuses values of the wrong kind or range, and cannot
    be left out."""
    for bad in _bad_values(value):
        broken = copy.deepcopy(cfg)
        broken["quant"][key] = bad
        with pytest.raises(ConfigError, match=re.escape(f"quant.{key}=")) as e:
            run_spec(broken)
        assert "\n" not in str(e.value)
    missing = copy.deepcopy(cfg)
    del missing["quant"][key]
    with pytest.raises(ConfigError, match=re.escape(f"quant.{key} is missing")):
        run_spec(missing)
