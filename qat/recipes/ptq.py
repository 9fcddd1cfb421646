"""Post-training quantization: quantize the trained float model's weights (and, with `act_bits` /
`state_bits`, its activations and recurrent state, calibrated on training clips) without retraining.

- `ptq_seed`: the study's scheme, per-tensor asymmetric min-max on every weight tensor.
- `ptq`: per-channel weights and data-aware corrections measured on calibration (training) clips:
  GPTQ rounding (qat.algorithms.gptq), bias correction (qat.algorithms.bias_correction), a search
  over the range estimator (minmax / mse) and the rounding (nearest / GPTQ) by validation loss, and
  rounding refinement against the float model's outputs (qat.algorithms.rounding).

Both are this one recipe with different options (conf/quant/ptq.yaml, ptq_seed.yaml).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import numpy as np

from qat.algorithms.bias_correction import bias_correct
from qat.algorithms.calibration import batches, calibrate, calibration_clips
from qat.algorithms.gptq import gptq
from qat.algorithms.predict import PREDICT_MARGINS_FILE, PTQ_SEED_VALIDATED, PTQ_VALIDATED, predict_run_model
from qat.algorithms.rounding import refine_rounding
from qat.checks import Flag, Integer, Number, setting
from qat.layers.model import freeze_ranges, quantize_model
from qat.metrics import predict
from qat.recipes.base import (BitWidths, QuantOptions, Recipe, RecipeContext, RecipeResult, quantized_result,
                              register)

ESTIMATOR_CANDIDATES = ("minmax", "mse")


@dataclasses.dataclass(frozen=True)
class PtqOptions(QuantOptions):
    """Options of `ptq` / `ptq_seed` (see the module doc)."""

    bias_correction: bool = setting(Flag())     # remove the mean pre-activation shift left by rounding
    gptq: bool = setting(Flag())                # error-compensating rounding (used when search is false)
    gptq_damp: float = setting(Number(0, low_open=True))
    search: bool = setting(Flag())              # pick estimator (minmax | mse) x rounding (nearest | GPTQ)
    refine_epochs: int = setting(Integer(0, expected="an integer >= 0 (0 = no rounding refinement)"))
    refine_learning_rate: float = setting(Number(0, low_open=True))


def validation_loss(model, feats) -> float:
    """Mean cross-entropy of the model on the validation split (selection signal of `search`)."""
    p = predict(model, feats.x["val"])
    picked = p[np.arange(len(p)), feats.y["val"]]
    return float(-np.mean(np.log(np.maximum(picked, 1e-7))))


def quantize_weights(model, opts: QuantOptions, bits: BitWidths, calib: np.ndarray, use_gptq: bool,
                     damp: float, bias_correction: bool):
    """The fake-quant twin with its weights rounded (nearest, or GPTQ) and optionally bias-corrected.
    Returns (qmodel, bias-correction sizes)."""
    cfg = opts.quant_config(bits)
    qmodel = quantize_model(model, cfg)
    if cfg.integer:    # the integer forward pass GPTQ and bias correction see needs the input grid
        calibrate(qmodel, batches(calib))
    if use_gptq:
        freeze_ranges(qmodel)
        gptq(model, qmodel, calib, damp)
    return qmodel, (bias_correct(model, qmodel, calib) if bias_correction else {})


class Ptq(Recipe):
    options_type = PtqOptions

    def run(self, ctx: RecipeContext, opts: PtqOptions) -> RecipeResult:
        """Quantize, optionally bias-correct and calibrate, report, export packed. With `search`, the
        weight range estimator and the rounding are chosen among their four combinations by the
        quantized model's validation loss (which wins depends on the bit-width and the model)."""
        model, feats, bits = ctx.float_model, ctx.feats, ctx.bits
        calib = calibration_clips(feats.x["train"], opts.calibration_size, ctx.seed)
        summary: Dict[str, Any] = {"quant/calibration_clips": len(calib)}
        candidates = [(e, g) for e in ESTIMATOR_CANDIDATES for g in (False, True)] if opts.search \
            else [(opts.estimator, opts.gptq)]
        best = None
        for estimator, g in candidates:
            qmodel, sizes = quantize_weights(model, dataclasses.replace(opts, estimator=estimator), bits, calib, g,
                                             opts.gptq_damp, opts.bias_correction)
            loss = validation_loss(qmodel, feats) if opts.search else 0.0
            if opts.search:
                summary[f"ptq/search/{estimator}{'+gptq' if g else ''}/val_loss"] = loss
            if best is None or loss < best[0]:
                best = (loss, qmodel, sizes, estimator, g)
        _, qmodel, sizes, estimator, g = best
        summary.update({"ptq/estimator": estimator, "ptq/gptq": g})
        summary.update({f"quant/bias_correction/{k}": v for k, v in sizes.items()})
        if opts.refine_epochs:
            refined = refine_rounding(model, qmodel, calib, opts.refine_epochs, opts.refine_learning_rate, ctx.seed)
            summary.update({f"ptq/refine/{k}": v for k, v in refined.items()})
        cfg = opts.quant_config(bits)
        if cfg.quantizes_activations:
            calibrate(qmodel, batches(calib))
        freeze_ranges(qmodel)          # the evaluated model is the deployable one (see export)
        # The predicted drop (float and quantized model on calibration clips, never test) sits next
        # to the measured one.
        summary.update(predict_run_model(model, qmodel, feats, cfg, ctx.predict, ctx.seed,
                                         self.validated, str(ctx.run_dir / PREDICT_MARGINS_FILE)))
        return quantized_result(ctx, qmodel, opts.integer, summary)


register(Ptq("ptq", PTQ_VALIDATED))
register(Ptq("ptq_seed", PTQ_SEED_VALIDATED))
