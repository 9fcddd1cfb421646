"""train.py and evaluate.py as a user runs them: real data, real Hydra, real W&B offline runs."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from qat.tracking import RESULT_KEYS, RESULT_X
from tests.conftest import REPO
from tests.wandb_records import of_type, run_file

pytestmark = pytest.mark.slow

SHARED_KEYS = {"preset", "method", "bits", "seed", "float/test_acc", "float/test_balanced_acc", "float/test_macro_f1",
               "quant/test_acc", "quant/test_balanced_acc", "quant/degradation", "float/sec_per_epoch",
               "float/epochs", "float/size_bytes", "quant/size_bytes"}


# Lines TensorFlow prints that say nothing about the run (qat.runtime, qat.metrics.batched, and the
# per-configuration traced loops of qat.layers.recurrent keep them out).
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit", "NodeDef mentions",
         "triggered tf.function retracing", "rebuild TensorFlow")


def run(script, *overrides, cwd=REPO, env=None):
    proc = subprocess.run([sys.executable, str(REPO / script), *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    return proc


def small(tmp_path, name):
    return [f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / name}", "trainer.epochs=2",
            "data.limit_per_class=40", "model.units=16"]


def test_train_then_evaluate(speech_commands_root, tmp_path):
    proc = run("train.py", *small(tmp_path, "run"), "quant.refine_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SHARED_KEYS <= set(summary)
    assert summary["float/epochs"] == 2 and 0 <= summary["float/test_acc"] <= 1
    assert (run_dir / "confusion_float.png").stat().st_size > 1000
    assert (run_dir / "float" / "float_model.keras").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 0
    assert "float acc" in proc.stdout
    for noise in NOISE:                                   # a quiet run: no start-up or tracing chatter
        assert noise not in proc.stdout + proc.stderr, noise
    # The W&B run (read from its file): the preset names it, and it logged the float model it trained
    # and the packed 4-bit file it exported as artifacts, with what they are.
    key = summary["float/key"]
    (wandb_run,) = of_type(run_file(run_dir), "run")
    assert wandb_run.job_type == "ptq" and list(wandb_run.tags)[:3] == ["ptq", "bits=4", "speech_commands"]
    artifacts = {a.name: a for a in of_type(run_file(run_dir), "artifact")}
    assert {f"float-{key}", f"packed-{key}-ptq-b4"} <= set(artifacts)
    assert {e.path for e in artifacts[f"float-{key}"].manifest.contents} == {"float_model.keras", "float_info.json"}
    packed = json.loads(artifacts[f"packed-{key}-ptq-b4"].metadata)
    assert (packed["bits"], packed["preset"], packed["float_model"]) == (4, "ptq", f"float-{key}")
    assert packed["quant/size_bytes"] == summary["quant/size_bytes"]
    # ... and its result row, which the sweep report's curves draw against bits.
    rows = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in h.item}
            for h in of_type(run_file(run_dir), "history")]
    (result,) = [r for r in rows if RESULT_X in r]
    assert {k: result[k] for k in (RESULT_X, *RESULT_KEYS)} == {k: summary[k] for k in (RESULT_X, *RESULT_KEYS)}

    # A second run with the same data/model/seed reuses the float checkpoint and says which it used
    # (an offline W&B run cannot record an artifact as an input: it names it in its summary).
    again = run("train.py", *small(tmp_path, "run2"), "quant=none")
    assert again.returncode == 0, again.stderr[-3000:]
    summary2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary2["float/reused"] is True and summary2["float/test_acc"] == summary["float/test_acc"]
    used = [json.loads(i.value_json) for s in of_type(run_file(tmp_path / "run2"), "summary") for i in s.update
            if i.key == "artifacts/used"]
    assert used == [f"float-{key}"]
    assert not [a for a in of_type(run_file(tmp_path / "run2"), "artifact") if a.name.startswith("float-")]

    ev = run("evaluate.py", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["float/test_acc"] == summary["float/test_acc"]
    assert evaluated["quant/test_acc"] == summary["quant/test_acc"]       # same recipe, same answer
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*/run-*.wandb"))

    # The saved run at another recipe and bit-width; the run folder itself is left untouched.
    before = sorted(p.name for p in run_dir.rglob("*"))
    ev3 = run("evaluate.py", f"run_dir={run_dir}", "quant=ptq_seed", "bits=3", "logger=none",
              f"hydra.run.dir={tmp_path / 'eval3'}")
    assert ev3.returncode == 0, ev3.stderr[-3000:]
    at3 = json.loads((tmp_path / "eval3" / "summary.json").read_text())
    assert (at3["preset"], at3["method"], at3["bits"], at3["quant/levels_ok"]) == ("ptq_seed", "ptq_seed", 3, True)
    assert at3["float/test_acc"] == summary["float/test_acc"]
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_unreachable_wandb_falls_back_to_offline(speech_commands_root, tmp_path):
    proc = run("train.py", *small(tmp_path, "online"), "quant=none", "logger.mode=online", "logger.init_timeout=15",
               env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logged offline instead" in proc.stdout + proc.stderr   # Hydra logs to stdout
    assert (tmp_path / "online" / "summary.json").exists()
    assert list((tmp_path / "online" / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("overrides,message", [
    (["bits=1"], "error: bits=1 is not allowed: expected an integer 2..16"),
    (["quant=qat_tfmot", "state_bits=4"],
     "error: state_bits=4 is not allowed with quant.method=qat_tfmot: tfmot cannot do it (use quant=qat or "
     "quant=qat_lsq)")])
def test_bad_input_is_one_line_before_any_data_is_read(tmp_path, overrides, message):
    proc = run("train.py", *overrides, *small(tmp_path, "outputs/day/bad"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "outputs").exists()          # a rejected run leaves no folder behind
    assert not (tmp_path / "cache").exists()            # no features extracted, nothing trained


def test_bad_evaluate_input_is_one_line(tmp_path):
    ev = run("evaluate.py", f"run_dir={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 2 and "is not a folder" in ev.stderr and "Traceback" not in ev.stderr


def test_optuna_search_selects_on_validation(speech_commands_root, tmp_path):
    """hparams_search=qat_optuna: Optuna tunes QAT's learning rate, epochs and distillation weight on
    the quantized model's validation accuracy; the best trial it reports is the one with the highest
    validation accuracy, whatever the test split says, and the act_* schedule follows the tuned one."""
    sweep = tmp_path / "search"
    proc = run("train.py", "-m", "hparams_search=qat_optuna", "bits=2", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.sampler.n_startup_trials=2", "quant.epochs=range(1,3)", "trainer.epochs=2",
               "data.limit_per_class=40", "model.units=16", f"cache_dir={tmp_path / 'cache'}", "logger=none",
               f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert len(trials) == 3 and {s["preset"] for s in trials.values()} == {"qat"}
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = max(s["quant/val_acc"] for s in trials.values())
    assert result["best_value"] == top

    def tuned(trial):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep / trial / ".hydra" / "overrides.yaml").read_text()))
        return {k: float(overrides[k]) for k in result["best_params"]}

    # the reported trial is one with the highest validation accuracy (several may tie on a small set)
    best = [t for t in trials if trials[t]["quant/val_acc"] == top and tuned(t) == pytest.approx(result["best_params"])]
    assert len(best) == 1, (result, {t: (s["quant/val_acc"], tuned(t)) for t, s in trials.items()})
    best = best[0]
    assert f"-> {sweep / best}" in proc.stdout and "best of 3 trials" in proc.stdout
    lr = result["best_params"]["quant.learning_rate"]
    assert trials[best]["options/learning_rate"] == trials[best]["options/act_learning_rate"] == lr
    assert trials[best]["qat/learning_rate"] == lr


def test_optuna_search_where_every_trial_fails(fsdd_root, tmp_path):
    sweep = tmp_path / "search"
    proc = run("train.py", "-m", "hparams_search=qat_optuna", "bits=2", "data=fsdd", "data.limit_per_class=40",
               "hydra.sweeper.n_trials=2", f"cache_dir={tmp_path / 'cache'}", "logger=none", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1
    assert "error: every trial of the search failed" in proc.stderr and "2 of 2 jobs failed" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_gru_model_with_qat_then_ptq_on_its_saved_run(speech_commands_root, tmp_path):
    """model=gru: the float GRU trains, QAT at W2/A4/S4 exports a packed file that reproduces it, and
    evaluate.py runs PTQ on the saved run, with a predicted degradation for the GRU."""
    proc = run("train.py", *small(tmp_path, "gru"), "model=gru", "quant=qat", "bits=2", "act_bits=4",
               "state_bits=4", "quant.act_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "gru" / "summary.json").read_text())
    assert s["qat/packed_matches"] and s["quant/levels_ok"] and s["options/act_epochs"] == 2
    assert s["quant/float_layers"] == ["normalize"]        # the log-mel statistics, said, not silent
    assert {"quant/weights/gru/kernel/levels", "quant/weights/gru/recurrent_kernel/levels"} <= set(s)
    ev = run("evaluate.py", f"run_dir={tmp_path / 'gru'}", "quant=ptq", "bits=3", "quant.refine_epochs=1",
             f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    at3 = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert at3["quant/levels_ok"] and at3["float/test_acc"] == s["float/test_acc"]
    assert isinstance(at3["predict/degradation"], float) and "predict/unsupported" not in at3


def test_bidirectional_lstm_with_qat_then_ptq_on_its_saved_run(speech_commands_root, tmp_path):
    """model=bilstm: both directions quantized at W3/A8/S8 by QAT with a packed file that reproduces
    the model; PTQ (search, GPTQ, bias correction, refinement) on the saved run; the predictor says
    has no per-clip gradients through a Bidirectional and fits the run's margins with a uniform spread."""
    proc = run("train.py", *small(tmp_path, "bi"), "model=bilstm", "quant=qat", "bits=3", "act_bits=8",
               "state_bits=8", "quant.act_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "bi" / "summary.json").read_text())
    assert s["qat/packed_matches"] and s["quant/levels_ok"] and s["quant/float_layers"] == ["normalize"]
    assert {"quant/weights/forward_lstm/kernel/levels", "quant/weights/backward_lstm/kernel/levels"} <= set(s)
    ev = run("evaluate.py", f"run_dir={tmp_path / 'bi'}", "quant=ptq", "bits=3", "quant.refine_epochs=1",
             f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    at3 = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert at3["quant/levels_ok"] and at3["predict/noise_shape"] == "uniform"   # fitted, every margin spread alike
    assert isinstance(at3["predict/degradation"], float) and "Bidirectional" in at3["predict/unsupported"]


def test_crnn_with_qat_then_ptq_on_its_saved_run(speech_commands_root, tmp_path):
    """model=crnn: Conv2D -> BN -> ReLU -> GRU trains; its BN is folded into the convolution, QAT at
    W3/A8/S8 quantizes the convolution too and exports a packed file that reproduces the model; PTQ runs
    on the saved run, with a predicted degradation through the conv front end."""
    proc = run("train.py", *small(tmp_path, "crnn"), "model=crnn", "model.conv_filters=4", "quant=qat", "bits=3",
               "act_bits=8", "state_bits=8", "quant.act_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "crnn" / "summary.json").read_text())
    assert s["float/folded_batch_norms"] == ["conv2d_bn"] and s["quant/float_layers"] == ["normalize"]
    assert s["qat/packed_matches"] and s["quant/levels_ok"] and s["quant/weights/conv2d/kernel/levels"] <= 8
    ev = run("evaluate.py", f"run_dir={tmp_path / 'crnn'}", "quant=ptq", "bits=4", "quant.refine_epochs=1",
             f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    at4 = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert at4["quant/levels_ok"] and at4["float/test_acc"] == s["float/test_acc"]
    assert "quant/bias_correction/conv2d" in at4 and isinstance(at4["predict/degradation"], float)


USER_MODEL = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tf_keras as keras
inputs = keras.Input((49, 40))
h = keras.layers.Conv1D(8, 3, use_bias=False, name="conv")(inputs)
h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
if sys.argv[2] == "layer_norm":
    h = keras.layers.LayerNormalization(name="ln")(h)
h = keras.layers.GRU(12, name="gru")(h)
outputs = keras.layers.Dense(5 if sys.argv[2] == "five" else 3, activation="softmax", name="out")(h)
keras.Model(inputs, outputs, name="mine").save(sys.argv[1])
"""


def _user_model(tmp_path, kind):
    path = tmp_path / f"{kind}.keras"
    subprocess.run([sys.executable, "-c", USER_MODEL, str(path), kind], check=True, capture_output=True)
    return path


def test_a_users_saved_model_is_trained_or_taken_as_it_is(speech_commands_root, tmp_path):
    """model=keras: the user's Conv1D -> BN -> GRU(last state) -> Dense is trained here and quantized by
    PTQ (BN folded, every layer quantized); with model.trained=true its own weights are the float
    model and QAT runs on it."""
    path = _user_model(tmp_path, "ok")
    proc = run("train.py", *small(tmp_path, "mine"), "model=keras", f"model.path={path}", "quant=ptq",
               "quant.refine_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "mine" / "summary.json").read_text())
    assert s["float/epochs"] >= 1 and s["float/folded_batch_norms"] == ["bn"] and s["quant/float_layers"] == []
    assert {"quant/weights/conv/kernel/levels", "quant/weights/gru/kernel/levels"} <= set(s) and s["quant/levels_ok"]
    proc = run("train.py", *small(tmp_path, "as_is"), "model=keras", f"model.path={path}", "model.trained=true",
               "quant=qat", "bits=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "as_is" / "summary.json").read_text())
    assert s["float/epochs"] == 0 and s["qat/packed_matches"] and s["quant/levels_ok"]


def test_a_users_model_that_does_not_fit_is_one_line_before_training(speech_commands_root, tmp_path):
    """A layer that cannot be quantized is named before any data is read (or kept float and listed
    with model.keep_float=true); a model with the wrong number of classes is refused before training."""
    bad = _user_model(tmp_path, "layer_norm")
    proc = run("train.py", *small(tmp_path, "outputs/day/bad"), "model=keras", f"model.path={bad}")
    assert proc.returncode == 2 and not (tmp_path / "cache").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: layer 'ln' (LayerNormalization) of model 'mine' cannot be quantized: expected LSTM, GRU, "
        "Bidirectional(LSTM / GRU), Dense, Conv1D, Conv2D, DepthwiseConv2D, BatchNormalization after a convolution "
        "or Dense (folded), Normalization (kept float), layers without weights (model.keep_float=true keeps such "
        "layers float)"]
    five = _user_model(tmp_path, "five")
    proc = run("train.py", *small(tmp_path, "five"), "model=keras", f"model.path={five}")
    assert proc.returncode == 2 and not (tmp_path / "cache" / "float").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: model.path='{five}' gives output [5]: expected [3], one probability per class of the task"]
    proc = run("train.py", *small(tmp_path, "kept"), "model=keras", f"model.path={bad}", "model.keep_float=true",
               "quant.gptq=false", "quant.refine_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["quant/float_layers"] == ["ln"]


def test_jobs_of_a_sweep_in_one_process_give_what_separate_runs_give(speech_commands_root, tmp_path):
    """The basic launcher runs every job in one process, which reuses the features, the float model
    and what is computed from it (qat.memo): each job's figures and packed file are those of the same
    job run alone."""
    common = [f"cache_dir={tmp_path / 'cache'}", "trainer.epochs=2", "data.limit_per_class=40", "model.units=16",
              "quant.refine_epochs=2", "logger=none"]
    alone = run("train.py", "quant=ptq", "bits=4", *common, f"hydra.run.dir={tmp_path / 'alone'}")
    assert alone.returncode == 0, alone.stderr[-3000:]
    sweep = run("train.py", "-m", "quant=ptq", "bits=2,4", *common, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (job,) = [p.parent for p in (tmp_path / "sweep").glob("*/summary.json")
              if json.loads(p.read_text())["bits"] == 4]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "alone", job))
    assert b["float/reused"] and b["float/key"] == a["float/key"]
    figures = [k for k in a if k.startswith(("float/test", "float/val", "quant/test", "quant/val", "predict/degradation",
                                             "ptq/search/", "ptq/refine/", "quant/bias_correction/"))]
    assert len(figures) > 10 and {k: b[k] for k in figures} == {k: a[k] for k in figures}
    assert (job / "model_4bit.qlstm").read_bytes() == (tmp_path / "alone" / "model_4bit.qlstm").read_bytes()
    assert (job / "confusion_float.png").stat().st_size > 1000


def test_qat_for_tflite_writes_the_model_the_interpreter_runs(speech_commands_root, tmp_path):
    """quant=qat_tflite: fine-tuned through the TFLite int8 twin, written into .tflite files with the
    trained weights, evaluated by LiteRT's interpreter; the streaming pair gives the whole clip's
    outputs."""
    proc = run("train.py", *small(tmp_path, "tfl"), "quant=qat_tflite", "bits=4", "quant.epochs=1",
               "quant.calibration_size=64", "quant.stream_clips=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "tfl"
    s = json.loads((run_dir / "summary.json").read_text())
    assert SHARED_KEYS <= set(s) and s["qat/epochs"] == 1 and s["quant/levels_ok"]
    assert s["tflite/stream_matches"] and s["tflite/stream_clips"] == 3
    assert s["tflite/agreement"] >= 0.9 and abs(s["tflite/test_acc"] - s["quant/test_acc"]) <= 0.1
    assert s["tflite/size_bytes"] == (run_dir / "model_tflite_int8_b4.tflite").stat().st_size == s["quant/size_bytes"]
    assert (run_dir / "model_tflite_int8_b4_stream.tflite").exists() and s["tflite/latency_ms"] > 0
    # the prediction is of this run's model (the fine-tuned twin), fitted on its int8 logits
    assert s["predict/matches_run"] and s["predict/degradation"] >= 0 and 0 < s["predict/shrink"] < 2
    assert s["predict/of"].startswith("the run's model") and (run_dir / "predict_margins.npz").exists()
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
