"""qat.predict on a small model trained on real clips: the per-clip sensitivities against Keras's own
gradients, the noise-gain variance against margin changes measured with injected weight noise, the
shape of the predicted-drop curve, the mixed-precision search against brute force, and
`evaluate.py predict_only=true` as a user runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import itertools
from dataclasses import replace

import tensorflow as tf
import tf_keras as keras
from omegaconf import OmegaConf

from qat.algorithms.calibration import batches, calibrate, calibration_clips
from qat.algorithms.predict import (PREDICT_MARGINS_FILE, PTQ_VALIDATED, MarginFit, ValidatedRange, calibration_set,
                                    config_variance, drop_table, expected_drop, fit_margins, fitted_drop,
                                    margin_temperature, measured_drop, output_margins, packed_size, predict_drop,
                                    predict_run_model, predict_summary, probability_correct, propose_mixed,
                                    sensitivity, strongest_rivals, weight_config)
from qat.algorithms.proposal import (PART_CALIBRATION_CLIPS, PARTS, format_report, measure_part_noise, predict_run,
                                     propose_with_parts)
from qat.config import proposal_overrides
from qat.data.features import load_features
from qat.errors import ConfigError, DataError
from qat.experiment import train_float
from qat.layers.model import QuantConfig, freeze_ranges, quantize_model, quantized_weights, weight_tensor_names
from qat.metrics import predict_classes
from qat.quant.spec import QuantSpec
from qat.tracking import Tracker
from qat.training.checkpoints import save_model_dir
from qat.training.models import build_model
from tests import specs
from tests.conftest import FSDD, REPO

LIMIT, UNITS, EPOCHS = 60, 16, 6     # FSDD, 60 clips per digit: ~92 % validation accuracy in ~10 s


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not FSDD.is_dir():
        pytest.skip(f"real speech data not found at {FSDD}")
    cache = str(tmp_path_factory.mktemp("cache"))
    run = specs.run("data=fsdd", f"data.root={FSDD}", f"data.limit_per_class={LIMIT}", "features=stft",
                    f"model.units={UNITS}", "trainer=default", f"trainer.epochs={EPOCHS}", "trainer.batch_size=32")
    feats = load_features(run.data, run.features, cache)
    model, _ = train_float(run, feats, Tracker())
    x, y = calibration_set(feats.x["train"], feats.y["train"], 128, 0)
    return model, feats, cache, sensitivity(model, x, y), (x, y)


def _keras_margins(model, x, y, rivals):
    """Logit margins from the Keras model's own softmax output: log p_y - log p_k (the per-clip
    normaliser cancels), independent of qat.algorithms.predict's unrolled forward."""
    logp = tf.math.log(model(x, training=False))
    idx = np.arange(len(y))
    return tf.gather_nd(logp, np.stack([idx, y], 1)) - tf.gather_nd(logp, np.stack([idx, rivals], 1))


def _rivals(model, x, y):
    p = model.predict(x, verbose=0).astype(np.float64)
    p[np.arange(len(y)), y] = -np.inf
    return np.argmax(p, axis=1)


def _variables(model):
    out = {}
    for name in weight_tensor_names(model):
        layer = model.get_layer(name.split("/")[0])
        out[name] = getattr(getattr(layer, "cell", layer), name.split("/")[1])
    return out


def _check_against_keras(model, x, y, sens, rivals, variables, clips, margin_abs, grad_atol=0.0):
    """Margins and per-clip squared gradients of `sens` against a tf.GradientTape through Keras."""
    for i in clips:
        with tf.GradientTape() as tape:
            m = _keras_margins(model, x[i:i + 1], y[i:i + 1], rivals[i:i + 1])[0]
        grads = tape.gradient(m, list(variables.values()))
        assert float(m) == pytest.approx(sens.margins[0, i], rel=1e-4, abs=margin_abs)
        for name, g in zip(variables, grads):
            g = g.numpy().astype(np.float64)
            ref = (g ** 2).reshape(-1, g.shape[-1]).sum(0) if g.ndim > 1 else g ** 2
            np.testing.assert_allclose(sens.sq_grads[name][0, i], ref, rtol=2e-3, atol=1e-6 * ref.max() + grad_atol)

def test_per_clip_squared_gradients_match_keras(trained):

    model, _, _, sens, (x, y) = trained
    rivals = _rivals(model, x, y)
    variables = _variables(model)
    _check_against_keras(model, x, y, sens, rivals, variables, (0, len(y) // 2, len(y) - 1), margin_abs=1e-4)


def test_stacked_lstm_with_normalization_and_dropout():
    """The unrolled forward follows the other model shapes build_model makes (normalisation layer,
    2 LSTM layers, dropout): logits and per-clip squared gradients against Keras's own."""
    rng = np.random.default_rng(3)
    x = rng.random((6, 12, 10)).astype(np.float32)
    model = build_model((12, 10), 4, specs.model(units=8, layers=2, dropout=0.2), x.reshape(-1, 10).mean(0),
                        x.reshape(-1, 10).var(0) + 1e-3)
    y = rng.integers(0, 4, 6)
    sens = sensitivity(model, x, y, competitors=3)
    rivals = _rivals(model, x, y)
    variables = _variables(model)
    assert set(variables) == {"lstm/kernel", "lstm/recurrent_kernel", "lstm/bias", "lstm_1/kernel",
                              "lstm_1/recurrent_kernel", "lstm_1/bias", "dense/kernel", "dense/bias"}
    _check_against_keras(model, x, y, sens, rivals, variables, range(len(y)), margin_abs=1e-5, grad_atol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False])
def test_stacked_gru_gradients_match_keras(reset_after):
    """The unrolled GRU (model=gru, both reset_after modes, stacked, with normalisation and dropout):
    logits and per-clip squared gradients of every weight, the (2, 3U) bias's two rows summed,
    against Keras's own."""
    rng = np.random.default_rng(4)
    x = rng.random((6, 12, 10)).astype(np.float32)
    model = build_model((12, 10), 4, specs.model("gru", units=8, layers=2, dropout=0.2), x.reshape(-1, 10).mean(0),
                        x.reshape(-1, 10).var(0) + 1e-3)
    if not reset_after:
        model = _without_reset_after(model)
    for layer in model.layers:             # biases away from zero, so that their gradients are tested
        if hasattr(layer, "cell"):
            layer.cell.bias.assign(rng.normal(size=layer.cell.bias.shape).astype(np.float32) * 0.3)
    y = rng.integers(0, 4, 6)
    sens = sensitivity(model, x, y, competitors=3)
    variables = _variables(model)
    assert {"gru/kernel", "gru/recurrent_kernel", "gru/bias", "gru_1/bias"} <= set(variables)
    _check_against_keras(model, x, y, sens, _rivals(model, x, y), variables, range(len(y)), margin_abs=1e-5,
                         grad_atol=1e-12)


@pytest.mark.parametrize("front", ["conv2d", "conv1d_causal"])
def test_conv_front_end_gradients_match_keras(front):
    """The crnn preset (Conv2D -> BatchNorm -> ReLU -> GRU, the BN left unfolded here) and a causal,
    dilated Conv1D front end: logits and per-clip squared gradients of the convolution's kernel and
    bias against Keras's own."""
    rng = np.random.default_rng(5)
    x = rng.random((6, 12, 10)).astype(np.float32)
    if front == "conv2d":
        model = build_model((12, 10), 4, specs.model("crnn", units=6, conv_filters=3, conv_kernel=(3, 3)),
                            x.reshape(-1, 10).mean(0), x.reshape(-1, 10).var(0) + 1e-3)
        model.get_layer("conv2d_bn").set_weights([rng.uniform(0.5, 2, 3), rng.normal(size=3) * 0.1,
                                                   rng.normal(size=3) * 0.1, rng.uniform(0.5, 2, 3)])
    else:
        inputs = keras.Input((12, 10))
        h = keras.layers.Conv1D(5, 3, padding="causal", dilation_rate=2, activation="relu", name="conv",
                                bias_initializer="glorot_uniform")(inputs)
        h = keras.layers.Flatten()(keras.layers.LSTM(6, return_sequences=True, name="lstm")(h))
        model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="dense")(h))
    y = rng.integers(0, 4, 6)
    sens = sensitivity(model, x, y, competitors=3)
    variables = _variables(model)
    assert ({"conv2d/kernel"} if front == "conv2d" else {"conv/kernel", "conv/bias"}) <= set(variables)
    _check_against_keras(model, x, y, sens, _rivals(model, x, y), variables, range(len(y)), margin_abs=1e-5,
                         grad_atol=1e-12)


def _without_reset_after(model):
    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.GRU):
            config["reset_after"] = False
        return layer.__class__.from_config(config)
    return keras.models.clone_model(model, clone_function=clone)


def test_noise_gain_matches_margin_change_under_injected_noise(trained):
    """For small independent weight noise with the per-unit variance of an 8-bit grid, the mean
    squared change of every margin, measured by running the Keras model with noisy weights, is
    the predicted sum_t sum_c sigma_tc^2 * sum_rows g^2."""
    model, _, _, sens, (x, y) = trained
    cfg = weight_config(8, "per_channel")
    predicted = config_variance(sens, cfg)[0]                      # [clips], first rival
    rivals = _rivals(model, x, y)
    variables = _variables(model)
    orig = {n: v.numpy() for n, v in variables.items()}
    m0 = _keras_margins(model, x, y, rivals).numpy().astype(np.float64)
    specs = {n: cfg.bias if n.endswith("/bias") else cfg.weights for n in orig}
    sigma = {n: np.sqrt(sens.column_noise(n, specs[n])) for n in orig}
    rng = np.random.default_rng(0)
    sq = np.zeros_like(m0)
    draws = 24
    try:
        for _ in range(draws):
            for n, v in variables.items():
                v.assign((orig[n] + rng.standard_normal(orig[n].shape) * sigma[n]).astype(np.float32))
            sq += (_keras_margins(model, x, y, rivals).numpy() - m0) ** 2
    finally:
        for n, v in variables.items():
            v.assign(orig[n])
    measured = sq / draws
    ratio = measured.sum() / predicted.sum()
    assert 0.85 < ratio < 1.15, ratio
    # clip by clip too: the per-clip predictions order the clips as the measurements do
    assert np.corrcoef(np.log(predicted), np.log(measured))[0, 1] > 0.8


def test_probability_formula_matches_sampling():
    rng = np.random.default_rng(1)
    margins = rng.normal(1.0, 2.0, size=(2, 400))
    variance = rng.uniform(0.1, 4.0, size=(2, 400))
    noise = rng.standard_normal((4000, 2, 400)) * np.sqrt(variance)
    sampled = np.all(margins + noise > 0, axis=1).mean(axis=0)
    np.testing.assert_allclose(probability_correct(margins, variance), sampled, atol=0.04)
    assert np.array_equal(probability_correct(margins, np.zeros_like(margins)), np.all(margins > 0, axis=0))


def test_predicted_drop_falls_with_bits_and_vanishes_at_16(trained):
    model, _, _, sens, (x, y) = trained
    assert sens.correct.mean() > 0.85          # the property is about a trained classifier
    for granularity in ("per_tensor", "per_channel"):
        drops = [r["predicted_drop"] for r in drop_table(sens, range(2, 17), (granularity,))]
        # Not a theorem: noise can also push a misclassified clip near the boundary to the right
        # class (measured drops dip below 0 too), so allow 0.1 points of rise between bit-widths.
        assert all(a >= b - 0.1 for a, b in zip(drops, drops[1:])), drops
        assert drops[0] > drops[1] > drops[2] > drops[6] and drops[0] > 5, drops
        assert abs(drops[-1]) < 0.01, drops
    # the function form agrees with the table, and reuses the same gradient pass
    cfg = weight_config(3, "per_channel")
    assert predict_drop(model, x, y, cfg, sens=sens) == pytest.approx(
        [r for r in drop_table(sens, [3], ["per_channel"])][0]["predicted_drop"])
    # per channel is never predicted worse than per tensor for this asymmetric min-max grid
    pt = drop_table(sens, [2, 3, 4], ["per_tensor"])
    pc = drop_table(sens, [2, 3, 4], ["per_channel"])
    assert all(c["predicted_drop"] <= t["predicted_drop"] + 0.05 for t, c in zip(pt, pc))


def test_mixed_proposal_is_the_smallest_within_budget(trained):
    _, _, _, sens, _ = trained
    bits = (2, 4, 8)
    budget = 0.5 * (drop_table(sens, [2], ["per_tensor"])[0]["predicted_drop"]
                    + drop_table(sens, [4], ["per_tensor"])[0]["predicted_drop"])
    prop = propose_mixed(sens, budget, bits=bits, bias_bits=None)
    assert prop.predicted_drop <= budget
    assert sens.drop(config_variance(sens, prop.config)) == pytest.approx(prop.predicted_drop)
    assert packed_size(sens, prop.config) == prop.size_bytes
    # brute force, written independently: every combination through the public predictor
    names = sens.names
    best = None
    for combo in itertools.product(bits, repeat=len(names)):
        cfg = QuantConfig(weights=QuantSpec(2), bias=QuantSpec(2),
                          overrides={n: QuantSpec(b) for n, b in zip(names, combo)})
        if sens.drop(config_variance(sens, cfg)) <= budget:
            size = packed_size(sens, cfg)
            best = size if best is None else min(best, size)
    assert prop.size_bytes == best
    assert prop.uniform_bits is not None and prop.size_bytes <= prop.uniform_size_bytes
    greedy = propose_mixed(sens, budget, bits=bits, bias_bits=None, exhaustive_limit=0)
    assert greedy.predicted_drop <= budget and greedy.size_bytes >= prop.size_bytes
    kept = propose_mixed(sens, budget, bits=bits)                 # default: biases stay at 8 bits
    assert kept.bits["lstm/bias"] == kept.bits["dense/bias"] == 8 and kept.predicted_drop <= budget
    assert kept.size_bytes >= prop.size_bytes
    with pytest.raises(ConfigError, match="cannot be met"):
        propose_mixed(sens, 0.0, bits=(2,))


def test_run_report_verifies_the_proposals_on_test(trained):
    model, feats, _, _, _ = trained
    r = predict_run(model, feats, specs.predict(n_calib=64, bits=(3, 4, 8)), max_drop=5.0)
    assert [row["bits"] for row in r["table"]] == [3, 3, 4, 4, 8, 8]
    v = r["verified"]
    assert v["drop"] == pytest.approx(100 * (v["float_acc"] - v["quant_acc"]))
    assert r["proposal"].predicted_drop <= 5.0
    joint, vp = r["part_proposal"], r["verified_parts"]
    assert joint.predicted_drop <= 5.0 and set(joint.parts) == set(PARTS) and set(joint.parts.values()) <= {3, 4, 8}
    assert vp["float_acc"] == v["float_acc"] and vp["drop"] == pytest.approx(100 * (vp["float_acc"] - vp["quant_acc"]))
    text = format_report(r)
    assert "weights and activation parts under a predicted drop of 5 points" in text and "cell state=" in text


def test_part_noise_shrinks_with_bits_and_the_joint_proposal_spends_it(trained):
    """Each part quantized alone: its measured margin variance falls as bits grow; the joint proposal
    stays within its budget, costs less under a looser one, and its prediction matches brute force
    of the variances it searched."""
    model, feats, _, sens, (x, y) = trained
    spec = specs.predict()
    noise = measure_part_noise(model, sens, x, feats.x["train"][:256], spec.act_spec, (2, 4, 8))
    assert set(noise.variance) == set(PARTS) and noise.values["gates"] == 4 * noise.values["hidden"]
    for part, v in noise.variance.items():
        assert v.shape == (3,) + sens.margins.shape
        assert v[0].mean() > v[1].mean() > v[2].mean(), part
    tight = propose_with_parts(sens, noise, 1.0, spec.act_spec)
    loose = propose_with_parts(sens, noise, 10.0, spec.act_spec)
    assert tight.predicted_drop <= 1.0 and loose.predicted_drop <= 10.0
    assert loose.weight_bytes + loose.activation_bytes < tight.weight_bytes + tight.activation_bytes
    opts_var = config_variance(sens, replace(loose.config, inputs=None, gates=None, state=None, hidden=None))
    parts_var = sum(noise.variance[p][noise.bits.index(b)] for p, b in loose.parts.items())
    assert loose.predicted_drop == pytest.approx(sens.drop(opts_var + parts_var), abs=1e-9)
    assert loose.config.hidden.bits == loose.parts["hidden"] and loose.config.state.bits == loose.parts["state"]
    with pytest.raises(ConfigError, match=r"max_drop=0.0 cannot be met: even 8 bits on every tensor and activation part"):
        propose_with_parts(sens, noise, 0.0, spec.act_spec)


def _quant_config(*overrides):
    recipe = specs.recipe("ptq_seed", *overrides)
    return recipe.options.quant_config(recipe.bits)


def test_ptq_summary_keys(trained):
    model, feats, _, _, _ = trained
    spec = specs.predict(calib="train", n_calib=128)
    cfg = _quant_config("bits=3")
    out = predict_summary(model, feats, cfg, spec, 0, True)
    assert out["predict/weights_only"] is False and out["predict/calibration_clips"] == 128
    assert out["predict/matches_run"] and out["predict/in_validated_range"]
    assert out["predict/of"] == "3-bit per_tensor asymmetric weights rounded to nearest (minmax ranges)"
    x, y = calibration_set(feats.x["train"], feats.y["train"], 128, 0)
    assert out["predict/degradation"] == pytest.approx(predict_drop(model, x, y, cfg), abs=1e-6)
    with_acts = _quant_config("bits=3", "act_bits=8")
    out = predict_summary(model, feats, with_acts, spec, 0, True)
    assert out["predict/weights_only"] is True and not out["predict/matches_run"]   # activations not modelled
    assert out["predict/of"].endswith(", activations and state float")
    assert out["predict/degradation"] == pytest.approx(predict_drop(model, x, y, cfg), abs=1e-6)
    at2 = predict_summary(model, feats, _quant_config("bits=2"), spec, 0, False, "the PTQ starting point of QAT")
    assert not at2["predict/in_validated_range"] and not at2["predict/matches_run"]
    assert at2["predict/of"].startswith("the PTQ starting point of QAT: 2-bit")


def test_a_model_the_predictor_cannot_follow_gets_no_prediction_and_a_reason(trained):
    """A PTQ run of a model with a layer the predictor has no adjoint for (a depthwise convolution)
    still runs: `predict/degradation` is null and `predict/unsupported` says why."""
    _, feats, _, _, _ = trained
    inputs = keras.Input(feats.input_shape)
    h = keras.layers.Reshape((*feats.input_shape, 1))(inputs)
    h = keras.layers.DepthwiseConv2D(3, name="conv")(h)
    out = keras.layers.Dense(len(feats.class_names), activation="softmax")(keras.layers.Flatten()(h))
    out = predict_summary(keras.Model(inputs, out), feats, _quant_config("bits=4"), specs.predict(calib="train"), 0,
                          True)
    assert out["predict/degradation"] is None and "'conv' (DepthwiseConv2D)" in out["predict/unsupported"]


def test_bad_input_is_a_config_error(trained):
    model, _, _, sens, (x, y) = trained
    with pytest.raises(ConfigError, match=r"predict.calib='test' is not allowed: expected one of val, train"):
        specs.predict(calib="test")
    with pytest.raises(ConfigError, match="weight quantization only"):
        config_variance(sens, QuantConfig(weights=QuantSpec(4), inputs=QuantSpec(8)))
    with pytest.raises(ConfigError, match="override"):
        config_variance(sens, QuantConfig(weights=QuantSpec(4), overrides={"lstm/nope": QuantSpec(3)}))
    with pytest.raises(DataError, match="labels"):
        sensitivity(model, x, y[:3])
    with pytest.raises(ConfigError, match="max_drop"):
        propose_mixed(sens, "one")


def test_the_printed_command_of_a_proposal_runs_the_model_its_verification_measured(trained, tmp_path):
    """A joint proposal (bits per tensor, inputs / gates / cell / hidden bits) run by the ptq_seed
    recipe from the overrides evaluate.py prints is the model the proposal's verification measured:
    the same test accuracy, every tensor at its own bits, and a size limit counting each at its own."""
    model, feats, _, sens, (x, y) = trained
    w = QuantSpec(4, "asymmetric", "per_tensor", -1, "minmax")
    act = lambda b: QuantSpec(b, "asymmetric", "per_channel", -1, "percentile", 99.9)
    bits = {"lstm/kernel": 5, "lstm/recurrent_kernel": 4, "lstm/bias": 8, "dense/kernel": 3, "dense/bias": 8}
    proposal = QuantConfig(weights=w, overrides={n: replace(w, bits=b) for n, b in bits.items()},
                           inputs=act(6), gates=act(5), state=act(8), hidden=act(4))
    calib = calibration_clips(feats.x["train"], PART_CALIBRATION_CLIPS, 0)
    verified = measured_drop(model, proposal, feats.x["test"], feats.y["test"], calib=calib)
    overrides = [o for o in proposal_overrides(proposal, sens.names) if not o.startswith("quant=")]
    recipe = specs.recipe("ptq_seed", *overrides)
    result = recipe.run(specs.context(model, feats, recipe, tmp_path))
    assert np.mean(predict_classes(result.model, feats.x["test"]) == feats.y["test"]) == verified["quant_acc"]
    assert {n: q.spec.bits for n, q in quantized_weights(result.model).items()} == bits
    assert result.summary["quant/size_limit_bytes"] == -(-sum(sens.weights[n].size * b for n, b in bits.items()) // 8)


@pytest.mark.slow
def test_evaluate_predict_only(trained, tmp_path):
    """`python evaluate.py run_dir=... predict_only=true max_drop=...` on a saved run folder."""
    model, feats, cache, _, _ = trained
    run_dir = tmp_path / "run"
    cfg = specs.composed("experiment=study", "data=fsdd", f"data.root={FSDD}", f"data.limit_per_class={LIMIT}",
                         f"model.units={UNITS}", f"trainer.epochs={EPOCHS}", f"cache_dir={cache}", "logger=none")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    save_model_dir(model, {"epochs": EPOCHS}, run_dir / "float")
    (run_dir / "summary.json").write_text(json.dumps({"method": "none", "bits": 4}))
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"run_dir={run_dir}", "predict_only=true",
                           "max_drop=3", "predict.n_calib=64", f"hydra.run.dir={tmp_path / 'eval'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| bits | per_tensor drop | per_channel drop" in out
    assert all(f"\n| {b} |" in out for b in range(2, 9))
    assert "mixed precision under a predicted drop of 3 points" in out and "verified by PTQ on the test split" in out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("python train.py ")]
    assert len(commands) == 2 and all(" quant=ptq_seed " in c for c in commands)
    assert "quant.tensor_bits={" in commands[0] and " act_bits=" in commands[1]


# ------------------------------------------------------------------ the run's own model (fitted margins)

def test_margin_fit_recovers_a_known_shrink_and_noise_scale():
    """Synthetic margins m_q = 0.8 m + N(0, 2.5 s^2): the fit finds both within sampling error."""
    rng = np.random.default_rng(0)
    m = rng.gamma(2.0, 2.0, size=(2, 20000))
    s2 = rng.uniform(0.2, 3.0, size=m.shape)
    mq = 0.8 * m + rng.normal(size=m.shape) * np.sqrt(2.5 * s2)
    fit = fit_margins(m, mq, s2)
    assert fit.shrink == pytest.approx(0.8, abs=0.02) and fit.noise_scale == pytest.approx(2.5, rel=0.03)
    assert fit.clips == 20000


def test_fitted_drop_without_shrink_or_extra_noise_is_the_noise_model(trained):
    """shrink 1 and noise scale 1 is the round-to-nearest noise model itself; more noise, or a
    systematic shrink, predicts a larger drop."""
    model, _, _, sens, _ = trained
    var = config_variance(sens, weight_config(3))
    assert fitted_drop(sens.correct, sens.margins, var, MarginFit(1.0, 1.0, 0)) == pytest.approx(
        sens.drop(var), abs=1e-4)      # up to the variance floor
    base = fitted_drop(sens.correct, sens.margins, var, MarginFit(1.0, 1.0, 0))
    assert fitted_drop(sens.correct, sens.margins, var, MarginFit(1.0, 4.0, 0)) > base
    assert fitted_drop(sens.correct, sens.margins, var, MarginFit(0.5, 1.0, 0)) > base


def _calibrated_task(n, temperature, seed=0):
    """Three classes, logits z, labels drawn from softmax(z / temperature): a model exactly that
    calibrated. Returns (logits, labels, margins [2, n] to the two rivals, strongest first)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 2.0
    p = np.exp(z / temperature)
    p /= p.sum(axis=1, keepdims=True)
    y = (rng.uniform(size=(n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    rivals = strongest_rivals(z, y, 2)
    return z, y, output_margins(z, y, rivals, softmax=False)


def test_temperature_is_recovered_from_labels():
    for t in (0.5, 1.0, 2.5):
        _, _, m = _calibrated_task(40000, t)
        assert margin_temperature(m) == pytest.approx(t, rel=0.05)


def test_expected_drop_matches_monte_carlo_flips_of_a_calibrated_model():
    """Oracle: the top-2 gap of every clip gets Gaussian noise; where it flips, the accuracy changes by
    1[label = runner-up] - 1[label = float class]; averaged over clips and draws it must equal
    expected_drop with the true temperature (3 classes: label and rivals are every class)."""
    z, y, m = _calibrated_task(100000, 1.5, seed=1)
    rng = np.random.default_rng(2)
    order = np.argsort(-z, axis=1)
    a, b = order[:, 0], order[:, 1]
    gap = z[np.arange(len(y)), a] - z[np.arange(len(y)), b]
    sd, shrink = 0.8, 0.9
    drops = []
    for _ in range(20):
        flipped = shrink * gap + rng.normal(size=len(y)) * sd < 0
        drops.append(100 * np.mean(flipped * ((y == a).astype(float) - (y == b))))
    predicted = expected_drop(m, np.full_like(m, sd ** 2), MarginFit(shrink, 1.0, len(y)), 1.5)
    assert predicted == pytest.approx(np.mean(drops), abs=0.15) and predicted > 1.0
    assert expected_drop(m, np.full_like(m, sd ** 2), MarginFit(1.0, 0.0, len(y)), 1.5) == 0.0
    assert expected_drop(m, np.full_like(m, 0.01), MarginFit(1.0, 1.0, len(y)), 1.5) < 0.1 * predicted


def test_margins_from_softmax_outputs_match_keras(trained):
    model, _, _, sens, (x, y) = trained
    out = model.predict(x, verbose=0)
    rivals = strongest_rivals(out, y, 2)
    assert np.array_equal(rivals[0], _rivals(model, x, y))
    got = output_margins(out, y, rivals, softmax=True)
    np.testing.assert_allclose(got[0], _keras_margins(model, x, y, rivals[0]).numpy(), atol=1e-4)
    np.testing.assert_allclose(got, sens.margins, atol=1e-3)   # the gradient pass's own margins


def test_run_model_prediction_of_the_float_model_is_zero(trained, tmp_path):
    """The float model as its own 'quantized' model: shrink 1, no noise, no drop."""
    model, feats, _, _, _ = trained
    spec = specs.predict(calib="val", n_calib=128)
    out = predict_run_model(model, model, feats, weight_config(4), spec, 0, PTQ_VALIDATED)
    assert out["predict/shrink"] == pytest.approx(1.0, abs=1e-5) and out["predict/noise_scale"] < 1e-6
    assert abs(out["predict/degradation"]) < 0.1 and out["predict/matches_run"]


def test_run_model_prediction_follows_the_model_that_runs(trained, tmp_path):
    """A 3-bit model: every key, the margins saved for a study; quantizing the activations too at 3
    bits moves the calibration margins further than the weights alone, and the fit says so."""
    model, feats, _, _, _ = trained
    spec = specs.predict(calib="train", n_calib=128)
    w3 = _quant_config("bits=3")
    q_w = quantize_model(model, w3)
    path = tmp_path / PREDICT_MARGINS_FILE
    out = predict_run_model(model, q_w, feats, w3, spec, 0, PTQ_VALIDATED, str(path))
    assert {"predict/degradation", "predict/rtn_degradation", "predict/shrink", "predict/noise_scale",
            "predict/in_validated_range", "predict/validated_bits"} <= set(out)
    assert out["predict/noise_shape"] == "gradients" and out["predict/of"].endswith("fitted on 128 train clips")
    saved = np.load(path)
    assert saved["float_margins"].shape == saved["quant_margins"].shape == saved["variance"].shape == (2, 128)
    assert saved["quant_correct"].mean() == pytest.approx(
        np.mean(np.argmax(q_w.predict(calibration_set(feats.x["train"], feats.y["train"], 128, 0)[0], verbose=0),
                          axis=1) == saved["labels"]))
    fit = fit_margins(saved["float_margins"], saved["quant_margins"], saved["variance"])
    assert fit.noise_scale == pytest.approx(out["predict/noise_scale"])
    wa3 = _quant_config("bits=3", "act_bits=3")
    q_wa = quantize_model(model, wa3)
    calibrate(q_wa, batches(feats.x["train"][:256]))
    freeze_ranges(q_wa)
    both = predict_run_model(model, q_wa, feats, wa3, spec, 0, PTQ_VALIDATED)
    assert out["predict/in_validated_range"] and not both["predict/in_validated_range"]      # 3-bit activations
    assert "activations float or >= 8 bits" in both["predict/validated_range"]
    assert both["predict/noise_scale"] > out["predict/noise_scale"]
    assert both["predict/degradation"] > out["predict/degradation"]


def test_a_recipe_family_measured_nowhere_puts_every_run_outside_the_validated_range():
    w4 = weight_config(4)
    assert PTQ_VALIDATED.contains(w4) and not PTQ_VALIDATED.contains(weight_config(2))
    unmeasured = ValidatedRange("qat", None)
    assert not unmeasured.contains(w4) and unmeasured.describe() == "not measured for qat"
    assert not ValidatedRange("ptq", (3, 8), state_bits=8).contains(_quant_config("bits=4", "state_bits=4"))
    weights_only = ValidatedRange("qat", (3, 8))
    assert weights_only.contains(w4) and not weights_only.contains(_quant_config("bits=4", "act_bits=8"))
    assert weights_only.describe() == "qat: 3..8 weight bits, activations float, state float"
    assert not PTQ_VALIDATED.contains(QuantConfig(weights=QuantSpec(4), overrides={"dense/kernel": QuantSpec(2)}))


def test_a_model_the_gradient_pass_cannot_follow_gets_a_uniform_fit(trained):
    _, feats, _, _, _ = trained
    inputs = keras.Input(feats.input_shape)
    h = keras.layers.Reshape((*feats.input_shape, 1))(inputs)
    h = keras.layers.DepthwiseConv2D(3, name="conv")(h)
    out = keras.layers.Dense(len(feats.class_names), activation="softmax")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, out)
    cfg = _quant_config("bits=3")
    got = predict_run_model(model, quantize_model(model, cfg), feats, cfg, specs.predict(calib="val"), 0,
                            PTQ_VALIDATED)
    assert got["predict/noise_shape"] == "uniform" and isinstance(got["predict/degradation"], float)
    assert "'conv' (DepthwiseConv2D)" in got["predict/unsupported"]
