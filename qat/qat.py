"""Quantization-aware training recipes: fine-tune the trained float model through its fake-quant twin.

- `qat`: the project's QLSTM, straight-through rounding, weight ranges following the weights
  (initialised with the chosen estimator), activation / state ranges calibrated on training clips.
- `qat_lsq`: the same with learned step sizes (LSQ) for weights, activations and state.
- `qat_tfmot`: the same model through tfmot's `quantize_apply` with this project's QuantizeConfigs.

Options users of QAT expect: fine-tuning epochs and learning rate, freezing the ranges after N
epochs, progressive lowering of bits (e.g. 8 -> 4 -> target), early stopping on the quantized
model's validation accuracy (trainer.patience) with its best weights restored. (The model before
fine-tuning is not a candidate: on the seed task's 306 validation clips it won 3 of 68 runs and
lost 1-6 points on test each time.) Optional knowledge distillation from
the float model (`distill`, `temperature`; qat.distill).
Fine-tuning sees the trainer's time shift (on the cached frames, `qat.augment`), not its noise mixing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import tf_keras as keras

from qat import ConfigError
from qat.augment import training_data
from qat.export import load_packed_model, write_packed_model
from qat.ptq import batches, calibration_clips
from qat.quantize import calibrate, freeze_ranges, quantize_model
from qat.recipes import (QuantOptions, RecipeResult, RecipeSpec, check_bits, check_number, check_options,
                         max_levels, report_summary, weight_report)
from qat.training import TrainSpec, fit, set_seed

QAT_OPTIONS = ("epochs", "learning_rate", "freeze_ranges_after", "progressive_bits", "learned", "distill",
               "temperature")


class FreezeRangesAfter(keras.callbacks.Callback):
    """Freeze every quantization range of `qmodel` at the end of epoch N (1-based)."""

    def __init__(self, epochs: int, qmodel):
        super().__init__()
        self.epochs, self.qmodel = epochs, qmodel

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            freeze_ranges(self.qmodel)


def options(spec: RecipeSpec):
    """(QuantOptions, epochs, learning rate, freeze_ranges_after, progressive bits, learned, Distillation)
    from a QAT spec, checked (one-line ConfigError naming the key)."""
    opts, rest = QuantOptions.pick(spec.options)
    epochs = rest.pop("epochs", 10)
    lr = rest.pop("learning_rate", 1e-4)
    freeze_after = rest.pop("freeze_ranges_after", None)
    progressive = list(rest.pop("progressive_bits", None) or [])
    learned = bool(rest.pop("learned", spec.method == "qat_lsq"))
    distill = Distillation(rest.pop("distill", 0.0), rest.pop("temperature", 1.0))
    check_options(spec.method, rest, QAT_OPTIONS)
    check_number("epochs", epochs, "a positive integer", lambda v: v >= 1, integer=True)
    check_number("learning_rate", lr, "a number > 0", lambda v: v > 0)
    if freeze_after is not None:
        check_number("freeze_ranges_after", freeze_after, "null or an epoch number >= 1", lambda v: v >= 1,
                     integer=True)
    for b in progressive:
        check_bits("quant.progressive_bits entry", b)
        if b <= spec.bits:
            raise ConfigError(f"quant.progressive_bits={progressive} is not allowed: expected bit-widths above "
                              f"bits={spec.bits}, in decreasing order")
    if progressive != sorted(progressive, reverse=True):
        raise ConfigError(f"quant.progressive_bits={progressive} is not allowed: expected decreasing order")
    return opts, epochs, float(lr), freeze_after, progressive, learned, distill


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Weight of the float model's soft outputs in the fine-tuning loss, and their temperature (qat.distill)."""

    alpha: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        check_number("distill", self.alpha, "a weight in [0, 1] (0 = labels only, 1 = the float model's "
                     "outputs only)", lambda v: 0 <= v <= 1)
        check_number("temperature", self.temperature, "a number > 0", lambda v: v > 0)

    def fit_kwargs(self, teacher) -> Dict[str, Any]:
        """The distillation arguments of qat.training.fit (none when alpha is 0)."""
        if self.alpha == 0:
            return {}
        return {"teacher": teacher, "distill": float(self.alpha), "temperature": float(self.temperature)}


def copy_shadow_weights(src, dst) -> None:
    """Carry the float (shadow) weights of one fake-quant model into another of the same layout."""
    for layer in src.layers:
        for name in ("kernel", "recurrent_kernel", "bias"):
            a, b = getattr(layer, name, None), getattr(dst.get_layer(layer.name), name, None)
            if a is not None and b is not None and hasattr(b, "assign"):
                b.assign(a)


def run(spec: RecipeSpec, model, feats, trainer: TrainSpec, seed: int, run_dir: Path, tracker, verbose: int = 0):
    """`qat` / `qat_lsq`: fine-tune the fake-quant twin, stage by stage when bits are lowered
    progressively, then freeze the ranges, report and export packed weights."""
    opts, epochs, lr, freeze_after, progressive, learned, distill = options(spec)
    set_seed(seed)
    calib = calibration_clips(feats.x["train"], opts.calibration_size, seed)
    stages: List[int] = progressive + [spec.bits]
    qmodel, history, seconds = None, [], []
    for bits in stages:
        stage_spec = dataclasses.replace(spec, bits=bits, options={})   # quant_config reads only the bits
        twin = quantize_model(model, opts.quant_config(stage_spec, learned=learned))
        if qmodel is not None:
            copy_shadow_weights(qmodel, twin)
        qmodel = twin
        if spec.act_bits is not None or spec.state_bits is not None:
            calibrate(qmodel, batches(calib))
        callbacks = [FreezeRangesAfter(freeze_after, qmodel)] if freeze_after and bits == spec.bits else []
        train_data, steps, _ = training_data(None, None, trainer, feats, seed)
        result = fit(qmodel, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], trainer,
                     epochs=epochs, learning_rate=lr, callbacks=callbacks, verbose=verbose,
                     train_data=train_data, steps_per_epoch=steps, **distill.fit_kwargs(model),
                     on_epoch=lambda e, logs, b=bits: tracker.log(
                         {f"qat/train/{k}": v for k, v in logs.items()} | {"qat/epoch": e + 1, "qat/bits": b}))
        history.append({"bits": bits, **result})
        seconds.append(result["sec_per_epoch"])
    freeze_ranges(qmodel)
    report = weight_report(model, qmodel)
    summary: Dict[str, Any] = report_summary(report)
    path = Path(run_dir) / f"model_{spec.bits}bit.qlstm"
    summary["quant/size_bytes"] = write_packed_model(qmodel, str(path))
    summary.update({"qat/epochs": sum(h["epochs"] for h in history), "qat/sec_per_epoch": float(np.median(seconds)),
                    "qat/stages": stages, "qat/learned": learned,
                    "qat/best_epoch": history[-1]["best_epoch"]})
    summary["qat/packed_matches"] = packed_predictions_match(qmodel, model, opts, spec, learned, path,
                                                             feats.x["test"])
    tracker.table("quant/weight_error", ["tensor", "bits", "mae", "mse", "sqnr_db", "levels"],
                  [[n, r["bits"], r["mae"], r["mse"], r["sqnr_db"], r["levels"]] for n, r in report.items()])
    return RecipeResult(qmodel, summary)


def packed_predictions_match(qmodel, float_model, opts: QuantOptions, spec: RecipeSpec, learned: bool,
                             path: Path, x: np.ndarray) -> bool:
    """Rebuild the model from the packed file alone and check it predicts exactly the classes the
    fake-quant graph predicts: the reported accuracy is that of the real b-bit model."""
    rebuilt = quantize_model(float_model, opts.quant_config(spec, learned=learned))
    freeze_ranges(rebuilt)
    load_packed_model(rebuilt, str(path))
    a = np.argmax(qmodel.predict(x, batch_size=256, verbose=0), -1)
    b = np.argmax(rebuilt.predict(x, batch_size=256, verbose=0), -1)
    return bool(np.array_equal(a, b))


def run_tfmot(spec: RecipeSpec, model, feats, trainer: TrainSpec, seed: int, run_dir: Path, tracker,
              verbose: int = 0):
    """`qat_tfmot`: QAT through tfmot's `quantize_apply` with the project's n-bit QuantizeConfigs, for
    comparison with tfmot's own machinery. tfmot cannot quantize the recurrent state, learn step sizes
    or lower bits progressively (see qat.tfmot_config)."""
    from qat.tfmot_config import tfmot_quantize

    opts, epochs, lr, freeze_after, progressive, learned, distill = options(spec)
    unsupported = {"state_bits": spec.state_bits, "quant.progressive_bits": progressive or None,
                   "quant.learned": learned or None, "quant.freeze_ranges_after": freeze_after}
    for name, value in unsupported.items():
        if value is not None:
            raise ConfigError(f"{name}={value} is not allowed with quant.method=qat_tfmot: tfmot cannot do it "
                              "(use quant=qat or quant=qat_lsq)")
    set_seed(seed)
    qmodel = tfmot_quantize(model, spec.bits, spec.act_bits, per_channel=opts.granularity == "per_channel",
                            symmetric=opts.scheme == "symmetric", narrow_range=opts.narrow_range)
    train_data, steps, _ = training_data(None, None, trainer, feats, seed)
    result = fit(qmodel, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], trainer,
                 epochs=epochs, learning_rate=lr, verbose=verbose, train_data=train_data, steps_per_epoch=steps,
                 **distill.fit_kwargs(model),
                 on_epoch=lambda e, logs: tracker.log({f"qat/train/{k}": v for k, v in logs.items()} |
                                                      {"qat/epoch": e + 1}))
    summary: Dict[str, Any] = {"qat/epochs": result["epochs"], "qat/sec_per_epoch": result["sec_per_epoch"]}
    levels_ok, n_bits, n_float = True, 0, 0
    for layer in qmodel.layers:
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            wq = quantizer(weight, False, weights=qvars).numpy()
            levels = max_levels(wq, opts.granularity == "per_channel")
            name = weight.name.split(":")[0].replace("/lstm_cell", "")
            summary[f"quant/weights/{name}/levels"] = levels
            summary[f"quant/weights/{name}/mse"] = float(np.mean((wq - weight.numpy()) ** 2))
            levels_ok &= levels <= 2 ** spec.bits
            n_bits += wq.size
    n_float = sum(int(np.prod(w.shape)) for w in model.weights) - n_bits
    summary["quant/levels_ok"] = bool(levels_ok)
    # tfmot keeps float shadow weights: the deployable size is b bits per quantized weight, float32 biases.
    summary["quant/size_bytes"] = int(np.ceil(n_bits * spec.bits / 8) + 4 * n_float)
    return RecipeResult(qmodel, summary)
