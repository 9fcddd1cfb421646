"""Nothing lost, nothing silently wrong: run folders, diverged models, damaged and shared caches,
failed runs and sweeps, bad run folders and bad clips, each on small real data."""
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from qat.config import saved_config
from qat.data.datasets import list_files, read_wav
from qat.data.features import load_features
from qat.errors import ConfigError, DataError, TrainingError
from qat.experiment import load_run, load_saved_float_model, run_experiment, train_float
from qat.io import file_lock
from qat.metrics import classification_report, plot_confusion
from qat.quant.reference import fake_quant_np, qparams
from qat.quant.spec import QuantSpec
from qat.tracking import LoggerSpec, Tracker, start_run
from qat.training.checkpoints import MODEL_FILE, cached_float_model, save_model_dir
from tests import specs
from tests.conftest import REPO, SPEECH_COMMANDS
from tests.wandb_records import of_type, run_file

TINY = ("features=stft", "model.units=8", "trainer=default", "trainer.epochs=1", "trainer.batch_size=32")


def run(script, *overrides, env=None, **kwargs):
    return subprocess.run([sys.executable, str(REPO / script), *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small real speech data set, its features and a trained float model."""
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    spec = specs.run(f"data.root={SPEECH_COMMANDS}", "data.limit_per_class=30", *TINY)
    feats = load_features(spec.data, spec.features, None)
    model, info = train_float(spec, feats, Tracker())
    return spec, feats, model, info


# ------------------------------------------------------------------------------ run folders, sweeps

@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(speech_commands_root, fsdd_root, tmp_path):
    """Two runs started in the same second (different data) write into two folders, each its own."""
    common = ["quant=none", "logger=none", "trainer.epochs=1", "model.units=8", f"cache_dir={tmp_path / 'cache'}",
              "data.limit_per_class=60"]
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), f"data={d}", *common], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LSTM_QAT_DATA": str(SPEECH_COMMANDS.parent)})
             for d in ("speech_commands", "fsdd")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    folders = [Path(o[0].strip().split("| ")[-1]) for o in outs]
    assert folders[0] != folders[1]
    summaries = [json.loads((tmp_path / f / "summary.json").read_text()) for f in folders]
    assert [s["data"] for s in summaries] == ["speech_commands", "fsdd"]


@pytest.mark.slow
def test_a_multirun_goes_on_past_a_failed_job_and_lists_it(speech_commands_root, tmp_path):
    proc = run("train.py", "-m", "bits=1,4", "seed=0,1", "quant=ptq_seed", "logger=none",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}", "trainer.epochs=1",
               "data.limit_per_class=30", "model.units=8")
    assert proc.returncode == 1
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))      # the jobs after the failures ran
    assert [(json.loads(p.read_text())["bits"], json.loads(p.read_text())["seed"]) for p in summaries] == [(4, 0), (4, 1)]
    lines = proc.stderr.strip().splitlines()
    assert "2 of 4 jobs failed:" in lines
    assert lines[-2].endswith("0-ptq_seed-b1-s0: error: bits=1 is not allowed: expected an integer 2..16")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_ends_the_run_with_one_line(speech_commands_root, tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"cache_dir={tmp_path / 'cache'}",
                             f"hydra.run.dir={tmp_path / 'run'}", "data.limit_per_class=30", "model.units=8",
                             "logger=none", "trainer.epochs=30", "trainer.patience=0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "features" in log.read_text()):
        time.sleep(0.5)
    time.sleep(2)                                        # into float training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not (tmp_path / "cache" / "float").exists() or not list((tmp_path / "cache" / "float").glob("*/" + MODEL_FILE))


CTRL_C_JOB = """
import os, signal, sys, time
from pathlib import Path
from qat.config import CtrlC, _run_job

def job(cfg):
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            if {swallow}:
                pass
            else:
                raise RuntimeError("what TensorFlow makes of an interrupt while tracing")
    assert signal.getsignal(signal.SIGINT) is before
    return ctrl_c

with CtrlC() as outer:
    _run_job(job, None, Path("."), False, outer)
print("ran on")
"""


@pytest.mark.parametrize("swallow", [False, True])
def test_ctrl_c_ends_the_job_as_interrupted_whatever_became_of_its_keyboard_interrupt(swallow):
    """A SIGINT inside a job is remembered (the previous handler is back afterwards): the job ends
    with `interrupted`, exit 130, whether TensorFlow turned the KeyboardInterrupt into another
    exception or the code it landed in swallowed it and ran on."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_JOB.format(swallow=swallow)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "interrupted" and "ran on" not in proc.stdout


# ------------------------------------------------------------------------------ diverged training

@pytest.mark.slow
def test_a_diverged_float_model_fails_the_run_before_anything_is_cached(fsdd_root, tmp_path):
    proc = run("train.py", "data=fsdd", "quant=none", "trainer.learning_rate=1e30", "data.limit_per_class=60",
               "trainer.epochs=2", "model.units=8", f"cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: float training diverged (") and "trainer.learning_rate=1e+30" in message
    assert not list((tmp_path / "cache" / "float").glob(f"*/{MODEL_FILE}"))       # nothing cached
    assert not (tmp_path / "run" / "summary.json").exists()
    assert message in (tmp_path / "run" / "train.log").read_text()                # the error is in the run's log
    assert [e.exit_code for e in of_type(run_file(tmp_path / "run"), "exit")] == [1]   # W&B: the run failed


def test_a_cached_model_with_nan_weights_is_trained_again(small, tmp_path, caplog):
    _, _, model, info = small
    broken = keras.models.clone_model(model)
    broken.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    save_model_dir(broken, info, tmp_path / "float" / "k")
    (tmp_path / "float" / ".k.tmp123").mkdir()                                     # left by a killed writer
    calls = []
    got, _, reused = cached_float_model(str(tmp_path), "k", lambda: calls.append(1) or (model, info))
    assert calls == [1] and not reused and "not finite" in caplog.text
    assert all(np.isfinite(w).all() for w in keras.models.load_model(tmp_path / "float" / "k" / MODEL_FILE,
                                                                     compile=False).get_weights())
    assert not (tmp_path / "float" / ".k.tmp123").exists()


def test_training_that_diverges_is_a_training_error(small):
    spec, feats, _, _ = small
    bad = specs.run(f"data.root={SPEECH_COMMANDS}", "data.limit_per_class=30", *TINY, "trainer.learning_rate=1e30")
    with pytest.raises(TrainingError, match=r"float training diverged .* with trainer.learning_rate=1e\+30"):
        train_float(bad, feats, Tracker())


# ------------------------------------------------------------------------------ caches

def test_a_damaged_feature_cache_is_named_and_rebuilt(small, tmp_path, caplog):
    caplog.set_level("INFO")
    spec = small[0]
    first = load_features(spec.data, spec.features, str(tmp_path))
    path = next((tmp_path / "features").glob("*.npz"))
    path.write_bytes(path.read_bytes()[:1000])                                     # truncated
    again = load_features(spec.data, spec.features, str(tmp_path))
    assert caplog.text.count(f"feature cache {path} is damaged") == 1
    np.testing.assert_array_equal(again.x["train"], first.x["train"])
    caplog.clear()
    load_features(spec.data, spec.features, str(tmp_path))                         # rewritten, readable
    assert "is damaged" not in caplog.text and "features from cache" in caplog.text


def test_cache_files_honour_the_umask(small, tmp_path):
    spec, _, model, info = small
    old = os.umask(0o002)
    try:
        load_features(spec.data, spec.features, str(tmp_path))
        cached_float_model(str(tmp_path), "k", lambda: (model, info))
    finally:
        os.umask(old)
    npz = next((tmp_path / "features").glob("*.npz"))
    assert npz.stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "float" / "k").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "float" / "k" / MODEL_FILE).stat().st_mode & 0o777 == 0o664


@contextlib.contextmanager
def read_only(folder: Path):
    """The folder, recursively, cannot be written to, even by root (the immutable attribute), or by
    its owner (modes) when not root."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available on this file system (needed to make a folder read-only as root)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
    else:
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


def test_a_complete_read_only_cache_is_used_and_an_incomplete_one_is_bypassed(small, tmp_path, caplog):
    spec, feats, model, info = small
    load_features(spec.data, spec.features, str(tmp_path))
    cached_float_model(str(tmp_path), "k", lambda: (model, info))

    def no_training():
        raise AssertionError("trained although the cache holds the model")

    with read_only(tmp_path):
        again = load_features(spec.data, spec.features, str(tmp_path))
        _, _, reused = cached_float_model(str(tmp_path), "k", no_training)
        np.testing.assert_array_equal(again.x["test"], feats.x["test"])
        assert reused
        _, _, reused = cached_float_model(str(tmp_path), "other", lambda: (model, info))   # not in the cache
        assert not reused and "cannot be written" in caplog.text


def test_a_cache_path_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"cache_dir='.*afile' is a file: expected a folder"):
        specs.run(f"cache_dir={tmp_path / 'afile'}")


def test_waiting_for_a_cache_lock_is_said_and_times_out(tmp_path, caplog):
    caplog.set_level("INFO")
    holder_ready, release = threading.Event(), threading.Event()

    def hold():
        with file_lock(tmp_path / "x.lock", "holding"):
            holder_ready.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holder_ready.wait(10)
    try:
        with pytest.raises(DataError, match=r"gave up after \d+ s waiting for another run that holds .*x.lock"):
            with file_lock(tmp_path / "x.lock", "computing x", timeout_s=1.5):
                pass
        assert "waiting for another run that is computing x" in caplog.text
    finally:
        release.set()
        t.join()


# ------------------------------------------------------------------------------ evaluate.py on bad folders

@pytest.fixture
def finished_run(small, tmp_path):
    """A run folder as train.py leaves it (summary, float model, saved config)."""
    _, _, model, info = small
    folder = tmp_path / "run"
    save_model_dir(model, info, folder / "float")
    (folder / "summary.json").write_text(json.dumps({"method": "none", "bits": 32}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(json.dumps(specs.composed("quant=none")))
    return folder


def test_evaluate_names_what_is_wrong_with_a_run_folder(finished_run):
    assert load_run(str(finished_run))["method"] == "none" and saved_config(str(finished_run))["bits"] == 4
    model_file = finished_run / "float" / MODEL_FILE
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot load the float model in .*float \(.*the run folder is damaged"):
        load_saved_float_model(str(finished_run))
    (finished_run / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*summary.json \(JSONDecodeError\)"):
        load_run(str(finished_run))
    (finished_run / "float" / "float_info.json").unlink()
    with pytest.raises(DataError, match=r"is not a finished train.py run: missing float/float_info.json"):
        load_run(str(finished_run))
    (finished_run / ".hydra" / "config.yaml").write_text("model: {units: 3}\n")
    with pytest.raises(DataError, match=r"config.yaml is not a train.py config: it lacks data, features, trainer"):
        saved_config(str(finished_run))


# ------------------------------------------------------------------------------ clips and labels

def _copy_clips(src: Path, dst: Path, n: int):
    dst.mkdir(parents=True)
    for p in sorted(src.glob("*.wav"))[:n]:
        shutil.copy(p, dst / p.name)


def test_a_truncated_wav_is_a_data_error_naming_it(speech_commands_root, tmp_path):
    src = next((speech_commands_root / "yes").glob("*.wav"))
    raw = src.read_bytes()
    bad = tmp_path / "cut.wav"
    bad.write_bytes(raw[: len(raw) // 16])                  # the header still announces the whole clip
    with pytest.raises(DataError, match=r"cut.wav: it holds \d+ of the \d+ samples its header announces"):
        read_wav(str(bad), 16000, 16000)
    assert read_wav(str(src), 16000, 16000).shape == (16000,)


def test_a_symlinked_label_folder_and_an_empty_one_are_data_errors(speech_commands_root, tmp_path):
    root = tmp_path / "mine"
    _copy_clips(speech_commands_root / "yes", root / "yes", 20)
    _copy_clips(speech_commands_root / "no", root / "no", 20)
    (root / "yes_again").symlink_to(root / "yes")
    data = specs.data("folder", root=str(root))
    with pytest.raises(DataError, match=r"label folders .*/yes and .*/yes_again are the same folder"):
        list_files(data)
    (root / "yes_again").unlink()
    (root / "maybe").mkdir()
    with pytest.raises(DataError, match=r"label folder .*/maybe holds no .wav files: add clips to it or remove it"):
        list_files(data)


@pytest.mark.slow
def test_skipped_files_are_named_in_the_summary(speech_commands_root, tmp_path):
    root = tmp_path / "mine"
    for label in ("yes", "no"):
        _copy_clips(speech_commands_root / label, root / label, 40)
    (root / "yes" / "zz_corrupt.wav").write_bytes(b"RIFF\x00\x00not a wav at all")
    spec = specs.run("data=folder", f"data.root={root}", "data.on_bad_file=skip", "quant=none", *TINY,
                     f"cache_dir={tmp_path / 'cache'}")
    s = run_experiment(spec, str(tmp_path / "run"), Tracker())
    assert s["data/skipped_files"] == 1 and s["data/skipped"] == [str(root / "yes" / "zz_corrupt.wav")]


def test_a_class_without_clips_has_no_accuracy():
    r = classification_report(np.array([0, 0, 1]), np.array([0, 1, 1]), ["a", "b", "c"])
    assert r["per_class_acc"] == {"a": 0.5, "b": 1.0, "c": None}


def test_the_confusion_figure_is_bounded_for_many_labels(tmp_path):
    n = 200
    cm = np.random.default_rng(0).integers(0, 5, size=(n, n))
    start = time.perf_counter()
    path = plot_confusion(cm.tolist(), [f"label{i}" for i in range(n)], str(tmp_path / "cm.png"), "many")
    seconds = time.perf_counter() - start
    width, height = struct.unpack(">II", Path(path).read_bytes()[16:24])          # the PNG header
    assert width * height <= 15 * 14 * 120 ** 2 and seconds < 30


# ------------------------------------------------------------------------------ W&B and numbers

def test_wandb_mode_disabled_in_the_environment_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = LoggerSpec.from_config({**specs.composed()["logger"], "mode": "offline"})
    tracker = start_run(spec, str(tmp_path), {})
    assert tracker.run is None and not (tmp_path / "wandb").exists()


def test_a_range_near_the_float32_limit_is_quantized_without_nan():
    x = np.array([-3e38, -1.0, 0.0, 1.0, 3e38], np.float32)
    spec = QuantSpec(4)
    scale, zp = qparams(x.min(), x.max(), spec)
    assert np.isfinite(scale) and np.all(np.isfinite(fake_quant_np(x, spec)))
