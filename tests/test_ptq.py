"""Post-training quantization: the study's formula, bias correction, the search over estimator and
rounding, and rounding refinement, on a small model trained on real clips."""
import dataclasses

import numpy as np
import pytest

from qat.algorithms.bias_correction import bias_correct
from qat.algorithms.calibration import calibration_clips
from qat.algorithms.gptq import gptq_round
from qat.algorithms.report import weight_report
from qat.algorithms.rounding import refine_rounding
from qat.data.features import load_features
from qat.errors import ConfigError
from qat.experiment import train_float
from qat.layers.model import float_weight, freeze_ranges, quantize_model, quantized_weights
from qat.recipes.ptq import quantize_weights, validation_loss
from qat.tracking import Tracker
from tests import specs
from tests.conftest import SPEECH_COMMANDS


def study_formula(w, b):
    """The study's 4-bit scheme, written out independently: per-tensor asymmetric min-max."""
    w = w.astype(np.float64)
    lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
    scale = (hi - lo) / (2 ** b - 1)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(w / scale + zp), 0, 2 ** b - 1)
    return scale * (q - zp)


def quant_config(method, *overrides):
    recipe = specs.recipe(method, *overrides)
    return recipe.options.quant_config(recipe.bits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    run = specs.run(f"data.root={SPEECH_COMMANDS}", "data.limit_per_class=60", "features=stft", "model.units=24",
                    "trainer=default", "trainer.epochs=3", "trainer.batch_size=32")
    feats = load_features(run.data, run.features, str(tmp_path_factory.mktemp("cache")))
    model, _ = train_float(run, feats, Tracker())
    return model, feats


def test_ptq_seed_is_the_studys_formula(trained):
    model, _ = trained
    qmodel = quantize_model(model, quant_config("ptq_seed", "bits=4"))
    report = weight_report(model, qmodel)
    assert set(report) == {"lstm/kernel", "lstm/recurrent_kernel", "lstm/bias", "dense/kernel", "dense/bias"}
    for name, q in quantized_weights(qmodel).items():
        w = float_weight(model, name)
        ref = study_formula(w, 4)
        np.testing.assert_allclose(q.values, ref, atol=1e-6 * np.abs(w).max())
        assert report[name]["mae"] == pytest.approx(np.abs(ref - w).mean(), rel=1e-3)
        assert report[name]["mse"] == pytest.approx(((ref - w) ** 2).mean(), rel=1e-3)
        assert report[name]["levels"] <= 16 and report[name]["levels_ok"]


def test_bias_correction_restores_mean_pre_activation(trained):
    model, feats = trained
    qmodel = quantize_model(model, quant_config("ptq_seed", "bits=3", "quant.granularity=per_channel",
                                                "quant.bias=false"))
    x = calibration_clips(feats.x["train"], 64, 0)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w, b = float_weight(model, "lstm/kernel"), float_weight(model, "lstm/bias")
    wq = quantized_weights(qmodel)["lstm/kernel"].values
    before = np.abs((flat @ wq + b).mean(0) - (flat @ w + b).mean(0)).max()
    sizes = bias_correct(model, qmodel, x)
    assert set(sizes) == {"lstm", "dense"}
    b_new = qmodel.get_layer("lstm").bias.numpy()
    # Only the input part can be checked in closed form; E[h] enters through the recurrent term.
    h_part = b_new - b + (flat.mean(0) @ (wq - w))
    after = np.abs((flat @ wq + b_new - h_part).mean(0) - (flat @ w + b).mean(0)).max()
    assert before > 0 and after < 1e-4 * max(before, 1e-3) + 1e-6


def test_search_keeps_the_candidate_with_the_lowest_validation_loss(trained, tmp_path):
    """`quant.search`: the four estimator x rounding candidates are all scored on validation loss,
    the kept one has the lowest, and the exported model is that candidate (recomputed here alone)."""
    model, feats = trained
    recipe = specs.recipe("ptq", "bits=2", "quant.calibration_size=64", "quant.refine_epochs=0")
    s = recipe.run(specs.context(model, feats, recipe, tmp_path)).summary
    losses = {k.split("/")[2]: v for k, v in s.items() if k.startswith("ptq/search/")}
    assert set(losses) == {"minmax", "minmax+gptq", "mse", "mse+gptq"}
    chosen = s["ptq/estimator"] + ("+gptq" if s["ptq/gptq"] else "")
    assert losses[chosen] == min(losses.values())
    alone, _ = quantize_weights(model, dataclasses.replace(recipe.options, estimator=s["ptq/estimator"]), recipe.bits,
                                calibration_clips(feats.x["train"], 64, 0), s["ptq/gptq"], 0.01, True)
    assert validation_loss(alone, feats) == pytest.approx(losses[chosen], rel=1e-6)
    assert s["quant/levels_ok"] and (tmp_path / "model_2bit.qlstm").exists()


@pytest.mark.parametrize("name", ["search", "gptq", "bias_correction"])
def test_ptq_switches_must_be_booleans(name):
    with pytest.raises(ConfigError, match=f"quant.{name}='maybe' is not allowed: expected true or false"):
        specs.recipe("ptq", f"quant.{name}=maybe")


def test_rounding_refinement_only_moves_codes_to_the_other_neighbour_and_lowers_the_kl(trained):
    """`refine_rounding` (AdaRound's search space): every weight ends on the grid point just below or
    just above its float value, some codes change, and the calibration KL to the float model falls."""
    model, feats = trained
    qmodel = quantize_model(model, quant_config("ptq_seed", "bits=3", "quant.granularity=per_channel"))
    freeze_ranges(qmodel)
    start = quantized_weights(qmodel)
    info = refine_rounding(model, qmodel, calibration_clips(feats.x["train"], 128, 0), epochs=8,
                           learning_rate=1e-3, seed=0)
    after = quantized_weights(qmodel)
    assert 0 < info["changed"] < 0.5 and info["kl_after"] < info["kl_before"] and info["kept"]
    for name, q in after.items():
        v = float_weight(model, name) / start[name].scale + start[name].zero_point   # float value in code units
        np.testing.assert_array_equal(q.scale, start[name].scale)                     # the grid is untouched
        low = np.clip(np.floor(v), q.spec.qmin, q.spec.qmax)
        high = np.clip(np.floor(v) + 1, q.spec.qmin, q.spec.qmax)
        assert np.all((q.codes == low) | (q.codes == high)), name


def test_rounding_refinement_is_dropped_when_it_does_not_lower_the_kl(trained):
    """A step far too large throws every shadow weight to an edge of its two cells (random rounding):
    the calibration KL rises, so the model is given back exactly as it was."""
    model, feats = trained
    qmodel = quantize_model(model, quant_config("ptq_seed", "bits=4", "quant.granularity=per_channel"))
    freeze_ranges(qmodel)
    start = [w.copy() for w in qmodel.get_weights()]
    info = refine_rounding(model, qmodel, calibration_clips(feats.x["train"], 64, 0), epochs=2,
                           learning_rate=1.0, seed=0)
    assert not info["kept"] and info["kl_after"] >= info["kl_before"] and info["changed"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(start, qmodel.get_weights()))


def _obq_round(w, h, scale, zp, qmin, qmax, damp):
    """GPTQ written as the original optimal-brain-quantizer update with the full inverse Hessian: round
    row i, spread its error over the later rows with H^-1, then drop row i from H^-1 (Gaussian
    elimination): an independent formulation of what qat.algorithms.gptq.gptq_round computes."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    out = np.zeros_like(w)
    for i in range(len(w)):
        q = np.clip(np.round(w[i] / scale + zp), qmin, qmax)
        out[i] = scale * (q - zp)
        err = (w[i] - out[i]) / hinv[i, i]
        w[i + 1:] -= np.outer(hinv[i + 1:, i], err)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out


def test_gptq_round_matches_the_inverse_hessian_formulation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24))     # correlated inputs
    w = rng.standard_normal((24, 5))
    scale, zp = np.full(5, 0.37), np.full(5, 7.0)
    got = gptq_round(w, x.T @ x, scale, zp, 0, 15, 0.01)
    want = _obq_round(w, x.T @ x, scale, zp, 0, 15, 0.01)
    assert np.array_equal(got, want.astype(np.float32))
    nearest = scale * (np.clip(np.round(w / scale + zp), 0, 15) - zp)
    assert not np.array_equal(got, nearest.astype(np.float32))           # it did compensate
    err = lambda wq: np.sum((x @ (w - wq)) ** 2)
    assert err(got) < err(nearest)
