"""Quantization-aware training (`qat`, `qat_lsq`): fine-tune the trained float model through its
fake-quant twin (qat.layers), with straight-through rounding, weight ranges following the weights
(or learned step sizes with `learned`: qat_lsq) and activation / state ranges calibrated on
training clips.

The fine-tuning schedule follows what is quantized: weights alone fine-tune with `epochs` and
`learning_rate`; with quantized activations or state (act_bits / state_bits) with `act_epochs` and
`act_learning_rate`, since quantized gates and a quantized cell state need a higher learning rate and
more epochs. Also what users of QAT expect: freezing the ranges after N epochs,
progressive lowering of bits (e.g. 8 -> 4 -> target), early stopping on the quantized model's
validation accuracy (trainer.patience) with its best weights restored, and knowledge distillation
from the float model (`distill`, `temperature`; qat.training.distill). Fine-tuning sees the
trainer's time shift (on the cached frames, qat.data.augment), not its noise mixing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import tf_keras as keras

from qat.algorithms.calibration import batches, calibrate, calibration_clips
from qat.algorithms.predict import PREDICT_MARGINS_FILE, QAT_VALIDATED, predict_run_model
from qat.checks import Bits, Flag, Integer, ListOf, Nullable, Number, rejected, setting
from qat.data.augment import training_data
from qat.export.packed import model_from_packed
from qat.layers.model import QuantConfig, find_layer, freeze_ranges, leaf_layers, quantize_model
from qat.metrics import predict_classes
from qat.quant.quantizers import LSQ, RANGE, Strategy
from qat.recipes.base import (BitWidths, QuantOptions, Recipe, RecipeContext, RecipeResult, quantized_result,
                              register)
from qat.training.distill import distillation
from qat.training.fit import fit, set_seed


@dataclasses.dataclass(frozen=True)
class QatOptions(QuantOptions):
    """Options of the QAT recipes (see the module doc)."""

    epochs: int = setting(Integer(1))                      # fine-tuning epochs (per stage with progressive_bits)
    learning_rate: float = setting(Number(0, low_open=True))
    act_epochs: int = setting(Integer(1))                  # the same two with act_bits / state_bits set
    act_learning_rate: float = setting(Number(0, low_open=True))
    freeze_ranges_after: int = setting(Nullable(Integer(1), expected="null or an epoch number >= 1"))
    progressive_bits: Tuple[int, ...] = setting(ListOf(Bits()))   # e.g. [8, 4]: fine-tune at 8, then 4, then `bits`
    learned: bool = setting(Flag())                        # learned step sizes (LSQ) instead of fixed-rule ranges
    distill: float = setting(Number(0, 1, expected="a weight in [0, 1] (0 = labels only, 1 = the float model's "
                                                   "outputs only)"))
    temperature: float = setting(Number(0, low_open=True))

    @property
    def strategy(self) -> Strategy:
        return LSQ if self.learned else RANGE

    def schedule(self, bits: BitWidths) -> Tuple[int, float, str]:
        """(epochs, learning rate, name of the learning-rate setting) for what `bits` quantizes:
        quantized activations or state need their own (`act_*`), weights alone the plain ones."""
        if self.quant_config(bits).quantizes_activations:
            return self.act_epochs, self.act_learning_rate, "quant.act_learning_rate"
        return self.epochs, self.learning_rate, "quant.learning_rate"

    def fit_kwargs(self, teacher) -> Dict[str, Any]:
        """The distillation arguments of qat.training.fit.fit (none when distill is 0)."""
        return distillation(teacher, self.distill, self.temperature)


class FreezeRangesAfter(keras.callbacks.Callback):
    """Freeze every quantization range of `qmodel` at the end of epoch N (1-based)."""

    def __init__(self, epochs: int, qmodel):
        super().__init__()
        self.epochs, self.qmodel = epochs, qmodel

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            freeze_ranges(self.qmodel)


def copy_shadow_weights(src, dst) -> None:
    """Carry the float (shadow) weights of one fake-quant model into another of the same layout."""
    for layer in leaf_layers(src):
        for name in ("kernel", "recurrent_kernel", "bias"):
            a, b = getattr(layer, name, None), getattr(find_layer(dst, layer.name), name, None)
            if a is not None and b is not None and hasattr(b, "assign"):
                b.assign(a)


def packed_predictions_match(qmodel, float_model, cfg: QuantConfig, path: Path, x: np.ndarray) -> bool:
    """Rebuild the model from the packed file alone and check it predicts exactly the classes the
    fake-quant graph predicts: the reported accuracy is that of the real b-bit model."""
    rebuilt = model_from_packed(float_model, cfg, str(path))
    return bool(np.array_equal(predict_classes(qmodel, x), predict_classes(rebuilt, x)))


class Qat(Recipe):
    options_type = QatOptions

    def check(self, opts: QatOptions, bits: BitWidths) -> None:
        super().check(opts, bits)
        opts.quant_config(bits, opts.strategy)      # the strategy's own rules (integer mode: not LSQ)
        progressive = list(opts.progressive_bits)
        if any(b <= bits.bits for b in progressive):
            raise rejected("quant.progressive_bits", progressive,
                           f"bit-widths above bits={bits.bits}, in decreasing order")
        if progressive != sorted(progressive, reverse=True):
            raise rejected("quant.progressive_bits", progressive, "decreasing order")

    def run(self, ctx: RecipeContext, opts: QatOptions) -> RecipeResult:
        """Fine-tune the fake-quant twin, stage by stage when bits are lowered progressively, then
        freeze the ranges, report and export packed weights."""
        model, feats, bits = ctx.float_model, ctx.feats, ctx.bits
        set_seed(ctx.seed)
        calib = calibration_clips(feats.x["train"], opts.calibration_size, ctx.seed)
        stages: List[int] = list(opts.progressive_bits) + [bits.bits]
        epochs, learning_rate, learning_rate_key = opts.schedule(bits)
        qmodel, history, seconds = None, [], []
        for stage_bits in stages:
            twin_cfg = opts.quant_config(dataclasses.replace(bits, bits=stage_bits), opts.strategy)
            twin = quantize_model(model, twin_cfg)
            if qmodel is not None:
                copy_shadow_weights(qmodel, twin)
            qmodel = twin
            if twin_cfg.quantizes_activations:
                calibrate(qmodel, batches(calib))
            callbacks = [FreezeRangesAfter(opts.freeze_ranges_after, qmodel)] \
                if opts.freeze_ranges_after and stage_bits == bits.bits else []
            train_data, steps, _ = training_data(None, None, ctx.trainer, feats, ctx.seed)
            result = fit(qmodel, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], ctx.trainer,
                         epochs=epochs, learning_rate=learning_rate, what="QAT fine-tuning",
                         learning_rate_key=learning_rate_key, callbacks=callbacks,
                         verbose=ctx.verbose, train_data=train_data, steps_per_epoch=steps,
                         **opts.fit_kwargs(model),
                         on_epoch=lambda e, logs, b=stage_bits: ctx.tracker.log(
                             {f"qat/train/{k}": v for k, v in logs.items()} | {"qat/epoch": e + 1, "qat/bits": b}))
            history.append({"bits": stage_bits, **result})
            seconds.append(result["sec_per_epoch"])
        freeze_ranges(qmodel)
        cfg = opts.quant_config(bits, opts.strategy)
        summary: Dict[str, Any] = {"qat/epochs": sum(h["epochs"] for h in history), "qat/max_epochs": epochs,
                                   "qat/learning_rate": learning_rate, "qat/sec_per_epoch": float(np.median(seconds)),
                                   "qat/stages": stages, "qat/learned": opts.learned,
                                   "qat/best_epoch": history[-1]["best_epoch"],
                                   **predict_run_model(model, qmodel, feats, cfg, ctx.predict, ctx.seed, self.validated,
                                                       str(ctx.run_dir / PREDICT_MARGINS_FILE))}
        return quantized_result(ctx, qmodel, opts.integer, summary, lambda path: {
            "qat/packed_matches": packed_predictions_match(qmodel, model, cfg, path, feats.x["test"])})


register(Qat("qat", QAT_VALIDATED))
register(Qat("qat_lsq"))
