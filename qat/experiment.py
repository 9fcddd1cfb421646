"""One experiment: features -> float model (trained or reused) -> recipe -> evaluation -> summary.

This is the library side of `train.py` and `evaluate.py`: plain typed arguments, no Hydra.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from qat.algorithms.predict import MAX_DROP, PredictSpec
from qat.algorithms.proposal import format_report, predict_run
from qat.checks import Nullable, OneOf
from qat.data.augment import training_data
from qat.data.datasets import DataSpec
from qat.data.features import Features, FeatureSpec, load_features, normalization_stats
from qat.errors import ConfigError, DataError
from qat.export.c_source import export_c
from qat.export.integer import IntegerModel, integer_inputs
from qat.export.packed import model_from_packed
from qat.io import make_dirs, write_json
from qat.layers.fold import fold_batch_norms
from qat.layers.model import check_quantizable
from qat.metrics import evaluate, flip_noise, plot_confusion
from qat.recipes.base import RecipeContext, RecipeSpec, tflite_int8_us_per_clip
from qat.tracking import Tracker
from qat.memo import Recent, derived, weights_fingerprint
from qat.training.checkpoints import (INFO_FILE, MODEL_FILE, cached_float_model, digest, entry_stamp, file_digest,
                                      load_model_dir, save_model_dir)
from qat.training.fit import TrainSpec, fit, set_seed
from qat.training.models import ModelSpec, build_model, check_user_model, fresh_copy, load_user_model

QUANTIZING_METHODS = ("ptq", "qat")   # recipes that quantize the model with qat.layers (the others convert it)

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
FLOAT_DIR = "float"


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, already validated (qat.config builds it from a composed config)."""

    data: DataSpec
    features: FeatureSpec
    model: ModelSpec
    trainer: TrainSpec
    recipe: RecipeSpec
    predict: PredictSpec
    seed: int
    cache_dir: Optional[str]
    verbose: int

    def __post_init__(self):
        self.recipe.recipe.check_model(self.model, self.recipe.options)   # rules across the recipe and the model

    def float_key(self, features_key: str) -> str:
        """What determines the float model: features, model, trainer (but not reuse) and seed."""
        trainer = asdict(self.trainer)
        trainer.pop("reuse_float")
        model = asdict(self.model)
        model.pop("keep_float")
        if self.model.path:
            model["file"] = file_digest(self.model.path)
        return digest({"features": features_key, "model": model, "trainer": trainer,
                       "normalize": self.features.normalize, "seed": self.seed})


def user_model(spec: RunSpec):
    """The user's saved model (`model.path`), or None; for a quantizing recipe, a one-line error
    before any data is read if it holds a layer that cannot be quantized (unless model.keep_float)."""
    if spec.model.path is None:
        return None
    model = load_user_model(spec.model.path)
    if spec.recipe.method in QUANTIZING_METHODS:
        folded = fold_batch_norms(model)[0]
        check_quantizable(folded, spec.model.keep_float)
        spec.recipe.recipe.check_float_model(folded, spec.recipe.bits, spec.recipe.options)
    return model


def train_float(spec: RunSpec, feats: Features, tracker: Tracker, user=None):
    """Build (or copy the user's model `user` with fresh weights) and train the float model from
    scratch with the run's seed."""
    set_seed(spec.seed)
    if user is not None:
        model = fresh_copy(user)
    else:
        mean = var = None
        if spec.features.normalize:
            mean, var = normalization_stats(feats.x["train"])
        model = build_model(feats.input_shape, len(feats.class_names), spec.model, mean, var)
    train_data, steps, aug = training_data(spec.data, spec.features, spec.trainer, feats, spec.seed, spec.cache_dir)
    start = time.perf_counter()
    result = fit(model, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], spec.trainer,
                 verbose=spec.verbose, train_data=train_data, steps_per_epoch=steps,
                 on_epoch=lambda e, logs: tracker.log({f"float/train/{k}": v for k, v in logs.items()} |
                                                      {"float/epoch": e + 1}))
    result["train_seconds"] = time.perf_counter() - start
    result.update(aug)
    return model, result


# Float models this process loaded or trained, by key: the jobs of a sweep in one process reuse them
# (with their traced functions and what `qat.memo.derived` keeps for them) while the cache entry on
# disk is unchanged and the weights are those it was loaded with.
_RECENT_FLOATS = Recent(4)


def _recent_float_model(spec: RunSpec, key: str):
    """(model, info, True) from an earlier job of this process, or None."""
    hit = _RECENT_FLOATS.get(key)
    if hit is None or not spec.trainer.reuse_float:
        return None
    model, info, stamp, weights = hit
    if entry_stamp(spec.cache_dir, key) != stamp or weights_fingerprint(model) != weights:
        _RECENT_FLOATS.pop(key)
        return None
    log.info("float model %s reused from this process", key)
    return model, info, True


def float_model(spec: RunSpec, feats: Features, run_dir: Path, tracker: Tracker, user=None):
    """The float model of this data/model/trainer/seed: reused from the cache or trained (or the
    user's trained model as it is, `model.trained`), and saved into the run directory either way.
    Returns (model, info, reused)."""
    key = spec.float_key(feats.key)
    if user is not None and spec.model.trained:
        model, info, reused = user, {"epochs": 0, "best_epoch": 0, "sec_per_epoch": None,
                                     "source": os.path.abspath(spec.model.path)}, True
    else:
        model, info, reused = _recent_float_model(spec, key) or cached_float_model(
            spec.cache_dir, key, lambda: train_float(spec, feats, tracker, user), reuse=spec.trainer.reuse_float)
        if (stamp := entry_stamp(spec.cache_dir, key)) is not None:
            _RECENT_FLOATS.put(key, (model, info, stamp, weights_fingerprint(model)))
    info = {**info, "key": key}
    save_model_dir(model, info, run_dir / FLOAT_DIR)
    return model, info, reused


def log_artifacts(spec: RunSpec, summary: Dict[str, Any], exports: Dict[str, Path], float_dir: Path,
                  tracker: Tracker) -> None:
    """The run's models as W&B artifacts: the float checkpoint (`float-<key>`, logged by the run that
    trained it and used by every run that reuses it) and the recipe's exports (`packed-<key>-<preset>-b<bits>`,
    `tflite-<key>-<preset>`), each with what it is and how well it did."""
    key = summary["float/key"]
    what = {"data": spec.data.name, "task": spec.data.task_name, "seed": spec.seed,
            "features": f"{spec.features.mel_bins or spec.features.fft_length // 2 + 1} bins", "units": spec.model.units,
            "layers": spec.model.layers, "cell": spec.model.cell, "bidirectional": spec.model.bidirectional,
            "conv_filters": spec.model.conv_filters, "model_path": spec.model.path, "float/test_acc": summary["float/test_acc"],
            "float/params": summary["float/params"], "float/size_bytes": summary["float/size_bytes"]}
    tracker.artifact(f"float-{key}", "model", sorted(str(p) for p in float_dir.iterdir()), what,
                     use=summary["float/reused"])
    quant = {**what, "float_model": f"float-{key}", "preset": spec.recipe.preset, "method": spec.recipe.method,
             **{k: summary.get(k) for k in ("bits", "act_bits", "state_bits", "quant/test_acc", "quant/degradation",
                                            "quant/size_bytes", "quant/levels_ok", "tflite/test_acc",
                                            "tflite/agreement")}}
    names = {"packed": f"packed-{key}-{spec.recipe.preset}-b{spec.recipe.bits.bits}",
             "tflite": f"tflite-{key}-{spec.recipe.preset}"}
    for kind, path in exports.items():
        tracker.artifact(names[kind], "model", [str(path)], quant)


CORRECT = "_test_correct"    # evaluate_model's per-clip correctness on test (not a summary key)


def evaluate_model(model, feats: Features, prefix: str, run_dir: Path) -> Dict[str, Any]:
    """Validation and test figures of one model, with a confusion-matrix PNG; keys `<prefix>/...`."""
    test = evaluate(model, feats.x["test"], feats.y["test"], feats.class_names)
    val = evaluate(model, feats.x["val"], feats.y["val"], feats.class_names)
    png = plot_confusion(test["confusion"], feats.class_names, str(run_dir / f"confusion_{prefix}.png"),
                         f"{prefix} model, test set (acc {100 * test['acc']:.1f}%)")
    out = {f"{prefix}/test_acc": test["acc"], f"{prefix}/test_balanced_acc": test["balanced_acc"],
           f"{prefix}/test_macro_f1": test["macro_f1"], f"{prefix}/val_acc": val["acc"],
           f"{prefix}/test_n": test["n"], f"{prefix}/confusion_png": png}
    out.update({f"{prefix}/class_acc/{name}": acc for name, acc in test["per_class_acc"].items()})
    out[f"{prefix}/confusion"] = test["confusion"]
    out[CORRECT] = test["correct"]
    return out


def evaluate_float_model(model, feats: Features, run_dir: Path) -> Dict[str, Any]:
    """`evaluate_model(model, feats, "float", run_dir)`, computed once per float model and data in a
    process (the jobs of a sweep share it); each run gets its own copy of the PNG."""
    def compute():
        out = evaluate_model(model, feats, "float", run_dir)
        return out, Path(out["float/confusion_png"]).read_bytes()

    out, png = derived(model, "float evaluation", compute, feats.key)
    path = run_dir / "confusion_float.png"
    if not path.exists():
        path.write_bytes(png)
    return {**out, "float/confusion_png": str(path)}


def fold_float_model(model):
    """`fold_batch_norms(model)`, once per float model in a process."""
    def compute():
        folded, names = fold_batch_norms(model)
        return (None if folded is model else folded), names     # never a reference to `model` itself

    folded, names = derived(model, "folded batch norms", compute)
    return (model if folded is None else folded), list(names)


def float_size_bytes(model) -> int:
    """Bytes of the weights stored as float32."""
    return int(sum(np.prod(w.shape) for w in model.weights) * 4)


def run_experiment(spec: RunSpec, run_dir: str, tracker: Tracker, float_from: Optional[str] = None) -> Dict[str, Any]:
    """Run one recipe end to end and write `summary.json` into `run_dir`. Returns the summary.

    `float_from`: the folder of an earlier run whose float model is used as it is (evaluate.py);
    otherwise the float model comes from the cache or is trained.
    """
    t0 = time.perf_counter()
    user = user_model(spec) if float_from is None else None
    run_dir = make_dirs(Path(run_dir))
    feats = load_features(spec.data, spec.features, spec.cache_dir)
    t_features = time.perf_counter() - t0
    if user is not None:
        check_user_model(user, spec.model.path, feats.input_shape, len(feats.class_names))
    if float_from is not None:
        model, info = load_saved_float_model(float_from)
        reused = True
    else:
        model, info, reused = float_model(spec, feats, run_dir, tracker, user)
    model, folded = fold_float_model(model)   # the float model every recipe starts from
    bits = spec.recipe.bits
    summary: Dict[str, Any] = {
        "preset": spec.recipe.preset, "method": spec.recipe.method, "bits": bits.bits, "act_bits": bits.act_bits,
        "state_bits": bits.state_bits, "seed": spec.seed, "data": spec.data.name, "task": spec.data.task_name,
        "classes": feats.class_names,
        "n_train": len(feats.y["train"]), "n_val": len(feats.y["val"]), "n_test": len(feats.y["test"]),
        "data/skipped_files": sum(len(v) for v in feats.skipped.values()),
        "data/skipped": sorted(f for v in feats.skipped.values() for f in v),
        "float/reused": reused, "float/key": info.get("key"), "float/epochs": info["epochs"],
        "float/best_epoch": info["best_epoch"],
        "float/sec_per_epoch": info["sec_per_epoch"], "float/params": int(model.count_params()),
        "float/size_bytes": float_size_bytes(model), "float/folded_batch_norms": folded,
        "time/features_s": t_features,
    }
    summary.update(spec.recipe.option_values())
    float_eval = dict(evaluate_float_model(model, feats, run_dir))
    float_correct = float_eval.pop(CORRECT)
    summary.update(float_eval)
    t1 = time.perf_counter()
    ctx = RecipeContext(model, feats, spec.data, spec.features, spec.trainer, spec.predict, bits, spec.seed,
                        run_dir, tracker, spec.verbose)
    result = spec.recipe.run(ctx)
    summary["time/recipe_s"] = time.perf_counter() - t1
    summary.update(result.summary)
    if result.model is model:
        quant = {k.replace("float/", "quant/", 1): v for k, v in summary.items() if k.startswith("float/")
                 and k.split("/", 1)[1].startswith(("test_", "val_", "class_acc/", "confusion"))}
        quant_correct = float_correct
    else:
        quant = evaluate_model(result.model, feats, "quant", run_dir)
        quant_correct = quant.pop(CORRECT)
    summary.update(quant)
    # beside any prediction: the drop measured on the validation split, and the test set's own noise
    summary["quant/val_degradation"] = 100.0 * (summary["float/val_acc"] - summary["quant/val_acc"])
    summary.update({f"quant/test_{k}": v for k, v in flip_noise(float_correct, quant_correct).items()})
    summary.setdefault("quant/size_bytes", summary["float/size_bytes"])
    # the physical limit where the recipe gives none: every parameter at `bits` bits, nothing else
    summary.setdefault("quant/size_limit_bytes", -(-summary["float/params"] * bits.bits // 8))
    summary["quant/size_ratio"] = summary["quant/size_bytes"] / summary["quant/size_limit_bytes"]
    summary["quant/degradation"] = 100.0 * (summary["float/test_acc"] - summary["quant/test_acc"])
    summary["quant/balanced_degradation"] = 100.0 * (summary["float/test_balanced_acc"]
                                                     - summary["quant/test_balanced_acc"])
    summary["time/total_s"] = time.perf_counter() - t0
    write_json(run_dir / SUMMARY_FILE, summary)
    log_summary(tracker, summary)
    log_artifacts(spec, summary, result.exports, Path(float_from or run_dir) / FLOAT_DIR, tracker)
    return summary


def log_summary(tracker: Tracker, summary: Dict[str, Any]) -> None:
    """Scalars to the W&B summary, the result row to its history, confusion matrices as images."""
    tracker.result(summary)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None})
    for prefix in ("float", "quant"):
        png = summary.get(f"{prefix}/confusion_png")
        if png and os.path.exists(png):
            tracker.image(f"{prefix}/confusion_matrix", png)


def load_run(run_dir: str) -> Dict[str, Any]:
    """The summary of a finished run; a one-line error for a missing, unfinished or damaged folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run_dir={run_dir!r} is not a folder: expected the output folder of a train.py run")
    missing = [p for p in (SUMMARY_FILE, f"{FLOAT_DIR}/{MODEL_FILE}", f"{FLOAT_DIR}/{INFO_FILE}", ".hydra/config.yaml")
               if not (path / p).exists()]
    if missing:
        raise DataError(f"run_dir={run_dir!r} is not a finished train.py run: missing {', '.join(missing)}")
    try:
        return json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path / SUMMARY_FILE} ({type(e).__name__}): the run folder is damaged")


def load_saved_float_model(run_dir: str):
    """(model, info) of a finished run's float model; DataError naming the file if it is damaged."""
    folder = Path(run_dir) / FLOAT_DIR
    try:
        return load_model_dir(folder)
    except Exception as e:  # a truncated or foreign file: Keras raises many kinds of errors
        raise DataError(f"cannot load the float model in {folder} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): the run folder is damaged; rerun train.py")


EXPORTS = ("c",)


def export_saved_run(spec: RunSpec, run_dir: str, export: str) -> Dict[str, Any]:
    """`evaluate.py export=c`: the C99 export of a finished integer-mode run into `<run_dir>/c/`,
    compiled and run on the test clips' int8 features (also left there as test_clips.i8 with
    test_labels.u8), compared with the numpy reference; report.json adds the TFLite int8
    interpreter's time per clip of the run's float model for comparison."""
    OneOf(EXPORTS)("export", export)
    summary = load_run(run_dir)
    options = spec.recipe.options
    if not getattr(options, "integer", False):
        raise ConfigError(f"export=c is not allowed for run_dir={run_dir!r}: it is not an integer-mode run (expected "
                          "a run of quant=ptq or quant=qat with quant.integer=true)")
    packed = Path(run_dir) / f"model_{summary['bits']}bit.qlstm"
    if not packed.exists():
        raise DataError(f"run_dir={run_dir!r} has no packed model {packed.name}: the run folder is damaged")
    feats = load_features(spec.data, spec.features, spec.cache_dir)
    model, _ = load_saved_float_model(run_dir)
    model = fold_batch_norms(model)[0]
    qmodel = model_from_packed(model, options.quant_config(spec.recipe.bits), str(packed))
    x8 = integer_inputs(qmodel, feats.x["test"])
    out = Path(run_dir) / "c"
    report = export_c(IntegerModel.load(str(packed)), x8, out,
                      extra={"tflite_int8_us_per_clip": tflite_int8_us_per_clip(model, feats, spec.seed)})
    x8.tofile(out / "test_clips.i8")
    np.asarray(feats.y["test"], np.uint8).tofile(out / "test_labels.u8")
    return report


def predict_saved_run(spec: RunSpec, run_dir: str, max_drop: Optional[float] = None,
                      verify: bool = True) -> Tuple[str, Dict[str, Any]]:
    """`evaluate.py predict_only=true`: the predicted-drop report (qat.algorithms.predict) of a
    finished run's float model on its features and seed, as text, and the result it was made from
    (qat.algorithms.proposal.predict_run)."""
    Nullable(MAX_DROP)("max_drop", max_drop)
    t0 = time.perf_counter()
    feats = load_features(spec.data, spec.features, spec.cache_dir)
    model, _ = load_saved_float_model(run_dir)
    r = predict_run(model, feats, spec.predict, spec.seed, max_drop, verify)
    return f"run {run_dir}\n" + format_report(r) + f"\n(total {time.perf_counter() - t0:.1f} s)", r
