"""TFLite-exact recipes (`ptq_tflite`, `qat_tflite`): the float model's fake-quant twin computes what
TFLite's full-integer int8 LSTM computes (qat.layers.tflite_int8: per-gate int8 weights at `bits`
<= 8, int8 input and hidden state, int16 gates and cell state, int32 biases), calibrated on
training clips (PTQ) and then fine-tuned through it (QAT), and written into .tflite files that the
stock interpreter runs with the trained weights (qat.export.tflite_trained): the whole clip in one
invoke, and a streaming pair (one frame per invoke, state in variable tensors, then the head).

Besides the usual keys: `tflite/test_acc` (LiteRT's interpreter on every test clip, state reset
per clip), `tflite/agreement` (fraction of test clips where its class equals the fake-quant
model's), `tflite/size_bytes`, `tflite/latency_ms` (median per clip), `tflite/stream_matches`
(whether the streaming pair's outputs equal the whole-clip file's on `stream_clips` test clips).
A file that computes in float anywhere fails the run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict

import numpy as np

from qat.algorithms.calibration import calibrate_in_order, calibration_clips
from qat.algorithms.predict import PREDICT_MARGINS_FILE, PTQ_TFLITE_VALIDATED, ValidatedRange, predict_run_model
from qat.algorithms.report import REPORT_COLUMNS, report_rows, report_summary, weight_report
from qat.checks import Checked, Flag, Integer, Number, setting
from qat.data.augment import training_data
from qat.errors import ConfigError
from qat.export.tflite import TFLiteModel
from qat.export.tflite_trained import TFLiteStream, streaming_tflite, trained_tflite
from qat.io import write_bytes
from qat.layers.model import QuantConfig, freeze_ranges
from qat.layers.tflite_int8 import MAX_BITS, TFLITE_TOPOLOGY, TfliteScheme, check_tflite_model, folded_float_model, \
    logits_model, tflite_twin, twin_layers
from qat.metrics import predict_classes
from qat.quant.spec import ESTIMATOR, PERCENTILE
from qat.recipes.base import BitWidths, Recipe, RecipeContext, RecipeResult, register
from qat.training.distill import distillation
from qat.training.fit import fit, set_seed


@dataclasses.dataclass(frozen=True)
class TfliteTrainedOptions(Checked):
    """Options of `ptq_tflite` (and the base of `qat_tflite`'s)."""

    section = "quant"

    estimator: str = setting(ESTIMATOR)           # weights, per gate matrix: minmax (the converter's rule) | mse | ...
    act_estimator: str = setting(ESTIMATOR)       # input, hidden state, cell state and logits ranges
    percentile: float = setting(PERCENTILE)       # of the percentile estimator
    calibration_size: int = setting(Integer(1))   # training clips that calibrate the ranges
    representative_size: int = setting(Integer(1))   # of them, clips the converter sees (its ranges are replaced)
    stream_clips: int = setting(Integer(0))       # test clips the streaming pair is checked on (0 = no streaming files)
    int8_io: bool = setting(Flag())               # the whole-clip file takes int8 features and gives int8 outputs

    def scheme(self, bits: BitWidths) -> TfliteScheme:
        return TfliteScheme(bits.bits, self.estimator, self.act_estimator, self.percentile)


@dataclasses.dataclass(frozen=True)
class QatTfliteOptions(TfliteTrainedOptions):
    """`qat_tflite`: fine-tuning through the TFLite twin, with distillation from the float model."""

    epochs: int = setting(Integer(1))
    learning_rate: float = setting(Number(0, low_open=True))
    distill: float = setting(Number(0, 1, expected="a weight in [0, 1] (0 = labels only, 1 = the float model's "
                                                   "outputs only)"))
    temperature: float = setting(Number(0, low_open=True))


def tflite_result(ctx: RecipeContext, twin, calib: np.ndarray, opts: TfliteTrainedOptions,
                  summary: Dict[str, Any], validated: ValidatedRange) -> RecipeResult:
    """Freeze the twin, predict its drop (`validated`: where the recipe's predictions were measured),
    report its weights against the folded float model, write the .tflite files and evaluate them
    through the interpreter (module doc)."""
    freeze_ranges(twin)
    # the noise model's shape: the scheme's per-gate weight grids, seen as per-tensor grids of the
    # float model's weights (normalisation unfolded)
    summary.update(predict_run_model(ctx.float_model, logits_model(twin), ctx.feats,
                                     QuantConfig(weights=opts.scheme(ctx.bits).weight_spec(per_channel=False)),
                                     ctx.predict, ctx.seed, validated, str(ctx.run_dir / PREDICT_MARGINS_FILE)))
    report = weight_report(folded_float_model(ctx.float_model), twin)
    summary.update(report_summary(report, twin))
    ctx.tracker.table("quant/weight_error", REPORT_COLUMNS, report_rows(report))
    lstm, _ = twin_layers(twin)
    representative = calib[:opts.representative_size]
    start = time.perf_counter()
    flat = trained_tflite(twin, representative, opts.int8_io)
    path = ctx.run_dir / f"model_tflite_int8_b{ctx.bits.bits}.tflite"
    write_bytes(path, flat)
    x, y = ctx.feats.x["test"], ctx.feats.y["test"]
    runner = TFLiteModel(flat)
    classes = np.argmax(runner.predict(x), axis=1)
    summary.update({"bits": ctx.bits.bits, "quant/size_bytes": len(flat), "tflite/size_bytes": len(flat),
                    "tflite/test_acc": float(np.mean(classes == y)),
                    "tflite/agreement": float(np.mean(classes == predict_classes(twin, x))),
                    "tflite/latency_ms": float(np.median(runner.latencies_ms)),
                    "tflite/cell_exponent": lstm.cell_exponent(), "tflite/int8_io": opts.int8_io})
    exports = {"tflite": path}
    if opts.stream_clips:
        stream, head = streaming_tflite(twin, representative)
        for name, data in (("stream", stream), ("head", head)):
            write_bytes(ctx.run_dir / f"model_tflite_int8_b{ctx.bits.bits}_{name}.tflite", data)
        clips = x[:opts.stream_clips]
        streamed = TFLiteStream(stream, head, lstm.return_sequences).predict(clips)
        whole = TFLiteModel(trained_tflite(twin, representative)).predict(clips) if opts.int8_io else runner.predict(clips)
        summary.update({"tflite/stream_matches": bool(np.array_equal(streamed, whole)),
                        "tflite/stream_clips": len(clips), "tflite/stream_size_bytes": len(stream),
                        "tflite/head_size_bytes": len(head)})
    summary["tflite/export_s"] = time.perf_counter() - start
    return RecipeResult(twin, summary, exports)


class PtqTflite(Recipe):
    options_type = TfliteTrainedOptions

    def check(self, opts, bits: BitWidths) -> None:
        if bits.bits > MAX_BITS:
            raise ConfigError(f"bits={bits.bits} is not allowed with quant.method={self.name}: expected 2..{MAX_BITS} "
                              "(TFLite's LSTM holds weights in int8)")
        for name in ("act_bits", "state_bits"):
            if getattr(bits, name) is not None:
                raise ConfigError(f"{name}={getattr(bits, name)} is not allowed with quant.method={self.name}: expected "
                                  f"null (TFLite's int8 LSTM fixes them: int8 input and hidden state, int16 gates and "
                                  f"cell state)")
        if opts.representative_size > opts.calibration_size:
            raise ConfigError(f"quant.representative_size={opts.representative_size} is not allowed: expected at most "
                              f"quant.calibration_size={opts.calibration_size}")
        opts.scheme(bits)

    def check_model(self, model, options) -> None:
        if model.path is None and (model.cell != "lstm" or model.bidirectional or model.conv_filters or model.layers != 1):
            raise ConfigError(f"quant.method={self.name} is not allowed with model.cell={model.cell}, model.layers="
                              f"{model.layers}, model.bidirectional={str(model.bidirectional).lower()}, "
                              f"model.conv_filters={model.conv_filters}: expected {TFLITE_TOPOLOGY} (model=lstm)")

    def check_float_model(self, float_model, bits: BitWidths, options) -> None:
        check_tflite_model(float_model)

    def twin(self, ctx: RecipeContext, opts: TfliteTrainedOptions):
        """The calibrated TFLite twin of the float model and its calibration clips."""
        calib = calibration_clips(ctx.feats.x["train"], opts.calibration_size, ctx.seed)
        twin = tflite_twin(ctx.float_model, opts.scheme(ctx.bits))
        calibrate_in_order(twin, calib)
        return twin, calib

    def run(self, ctx: RecipeContext, opts: TfliteTrainedOptions) -> RecipeResult:
        twin, calib = self.twin(ctx, opts)
        return tflite_result(ctx, twin, calib, opts, {"quant/calibration_clips": len(calib)}, self.validated)


class QatTflite(PtqTflite):
    options_type = QatTfliteOptions

    def run(self, ctx: RecipeContext, opts: QatTfliteOptions) -> RecipeResult:
        set_seed(ctx.seed)
        twin, calib = self.twin(ctx, opts)
        feats = ctx.feats
        train_data, steps, _ = training_data(None, None, ctx.trainer, feats, ctx.seed)
        result = fit(twin, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], ctx.trainer,
                     epochs=opts.epochs, learning_rate=opts.learning_rate, what="QAT fine-tuning for TFLite",
                     learning_rate_key="quant.learning_rate", verbose=ctx.verbose, train_data=train_data,
                     steps_per_epoch=steps, **distillation(ctx.float_model, opts.distill, opts.temperature),
                     on_epoch=lambda e, logs: ctx.tracker.log({f"qat/train/{k}": v for k, v in logs.items()}
                                                              | {"qat/epoch": e + 1, "qat/bits": ctx.bits.bits}))
        summary = {"quant/calibration_clips": len(calib), "qat/epochs": result["epochs"], "qat/max_epochs": opts.epochs,
                   "qat/learning_rate": opts.learning_rate, "qat/sec_per_epoch": result["sec_per_epoch"],
                   "qat/best_epoch": result["best_epoch"]}
        return tflite_result(ctx, twin, calib, opts, summary, self.validated)


register(PtqTflite("ptq_tflite", PTQ_TFLITE_VALIDATED))
register(QatTflite("qat_tflite"))
