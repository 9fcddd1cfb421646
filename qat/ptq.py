"""Post-training quantization recipes: quantize the trained float model's weights (and, with
`act_bits` / `state_bits`, its activations and LSTM state calibrated on training clips), without
retraining.

- `ptq_seed`: the study's scheme, per-tensor asymmetric min-max on every weight tensor.
- `ptq`: the project's PTQ; per-channel weights with a range estimator from config and two
  data-aware corrections measured on calibration clips (training data only):
  * `gptq`: error-compensating rounding (GPTQ, Frantar et al. 2023): weights are rounded one input
    row at a time and the rounding error is pushed onto the rows not yet rounded through the
    inverse Hessian of the layer's inputs, H = X^T X. For the LSTM, X = [x_t, h_{t-1}] and the
    kernel and recurrent kernel are rounded together, since both feed the same gate pre-activations.
  * `bias_correction`: the mean shift that rounding leaves in every pre-activation is removed from
    the bias.
  * `search`: estimator (minmax / mse) and rounding (nearest / GPTQ) chosen per run by validation loss.
  * `refine_epochs`: then each weight's rounding (down or up) is refined so that the model's outputs
    on the calibration clips match the float model's (`refine_rounding`, AdaRound's search space).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np

from qat.export import write_packed_model
from qat.predict import predict_summary
from qat.quantize import calibrate, freeze_ranges, quantize_model, quantized_weights
from qat.recipes import (QuantOptions, RecipeResult, RecipeSpec, check_flag, check_number, check_options,
                         float_weight, report_summary, weight_report)

PTQ_OPTIONS = ("bias_correction", "gptq", "gptq_damp", "search", "refine_epochs", "refine_learning_rate")


def calibration_clips(x_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of the training clips (never validation or test)."""
    rng = np.random.default_rng(seed)
    return x_train[np.sort(rng.permutation(len(x_train))[: min(n, len(x_train))])]


def batches(x: np.ndarray, size: int = 64) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


def layer_input_means(model, layer_names, x: np.ndarray) -> Dict[str, np.ndarray]:
    """Mean over clips (and time) of each named layer's input vector, in the float model."""
    import tf_keras as keras

    taps = keras.Model(model.inputs, [model.get_layer(n).input for n in layer_names])
    sums = {n: 0.0 for n in layer_names}
    counts = {n: 0 for n in layer_names}
    for batch in batches(x):
        outs = taps(batch, training=False)
        for name, out in zip(layer_names, outs if isinstance(outs, (list, tuple)) else [outs]):
            flat = np.asarray(out, np.float64).reshape(-1, out.shape[-1])   # clips (x time) rows
            sums[name] = sums[name] + flat.sum(0)
            counts[name] += flat.shape[0]
    return {n: sums[n] / counts[n] for n in layer_names}


def bias_correct(float_model, qmodel, x_calib: np.ndarray) -> Dict[str, float]:
    """Shift each quantized layer's float bias so that its pre-activations keep their float mean:
    b <- b - E[x] (W_q - W) [- E[h] (R_q - R) for the LSTM], with E[x] (E[h]: the mean hidden state)
    measured on calibration clips in the float model. Returns the size of each correction (L2)."""
    q = quantized_weights(qmodel)
    layers = sorted({name.split("/")[0] for name in q if name.endswith("/kernel")})
    layers = [n for n in layers if getattr(float_model.get_layer(n), "use_bias", False)]
    if not layers:
        return {}
    means = layer_input_means(float_model, layers, x_calib)
    h_means = {}
    recurrent = [n for n in layers if f"{n}/recurrent_kernel" in q]
    if recurrent:
        import tf_keras as keras

        taps = keras.Model(float_model.inputs, [float_model.get_layer(n).output for n in recurrent])
        outs = taps.predict(x_calib, batch_size=64, verbose=0)
        outs = outs if isinstance(outs, list) else [outs]
        h_means = {n: o.reshape(-1, o.shape[-1]).astype(np.float64).mean(0) for n, o in zip(recurrent, outs)}
    sizes = {}
    for name in layers:
        shift = means[name] @ (q[f"{name}/kernel"].values - float_weight(float_model, f"{name}/kernel"))
        if name in h_means:
            shift = shift + h_means[name] @ (q[f"{name}/recurrent_kernel"].values
                                             - float_weight(float_model, f"{name}/recurrent_kernel"))
        qmodel.get_layer(name).bias.assign(float_weight(float_model, f"{name}/bias") - shift.astype(np.float32))
        sizes[name] = float(np.linalg.norm(shift))
    return sizes


def gptq_round(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               qmin: int, qmax: int, damp: float = 0.01) -> np.ndarray:
    """Round `w` [inputs, outputs] onto the grid scale * (q - zero_point) (one scale per output column
    and input row block, broadcast to w's shape) minimising ||X w - X w_q||^2 for H = X^T X, by
    rounding one input row at a time and compensating the rest (GPTQ). Returns grid values."""
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    scale = np.broadcast_to(scale, w.shape).astype(np.float64)
    zero_point = np.broadcast_to(zero_point, w.shape).astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T          # upper Cholesky factor of H^-1
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        q = np.clip(np.round(w[i] / scale[i] + zero_point[i]), qmin, qmax)
        out[i] = scale[i] * (q - zero_point[i])
        err = (w[i] - out[i]) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return out.astype(np.float32)


def _rows(tensor) -> np.ndarray:
    return np.asarray(tensor, np.float64).reshape(-1, tensor.shape[-1])


def gptq(float_model, qmodel, x_calib: np.ndarray, damp: float = 0.01) -> None:
    """Re-round every quantized kernel of `qmodel` (ranges already frozen) with `gptq_round`, layer by
    layer in model order; each layer's inputs come from `qmodel` with the layers before it already
    rounded, so later layers compensate earlier errors."""
    import tf_keras as keras

    from qat.quantize import QUANTIZED_LAYERS

    for layer in [l for l in qmodel.layers if isinstance(l, QUANTIZED_LAYERS) and "kernel" in l.weight_quantizers]:
        taps = keras.Model(qmodel.inputs, [layer.input, layer.output])
        recurrent = "recurrent_kernel" in layer.weight_quantizers
        hessian = 0.0
        for batch in batches(x_calib):
            x, y = taps(batch, training=False)
            rows = _rows(x)
            if recurrent:   # h_{t-1}: the layer's own output shifted one step, zeros at t = 0
                h_prev = np.concatenate([np.zeros_like(y[:, :1]), np.asarray(y)[:, :-1]], axis=1)
                rows = np.concatenate([rows, _rows(h_prev)], axis=1)
            hessian = hessian + rows.T @ rows
        names = ["kernel", "recurrent_kernel"] if recurrent else ["kernel"]
        weights = [getattr(layer, n).numpy() for n in names]
        grids = [layer.weight_quantizers[n].scale_zero_point(getattr(layer, n)) for n in names]
        scale = np.concatenate([np.broadcast_to(g[0].numpy(), w.shape) for g, w in zip(grids, weights)])
        zp = np.concatenate([np.broadcast_to(g[1].numpy(), w.shape) for g, w in zip(grids, weights)])
        spec = layer.weight_quantizers["kernel"].spec
        rounded = gptq_round(np.concatenate(weights), hessian, scale, zp, spec.qmin, spec.qmax, damp)
        start = 0
        for n, w in zip(names, weights):
            getattr(layer, n).assign(rounded[start:start + len(w)])
            start += len(w)


def refine_rounding(float_model, qmodel, x_calib: np.ndarray, epochs: int, learning_rate: float,
                    seed: int, batch_size: int = 64) -> Dict[str, float]:
    """Choose, for every quantized weight, between the grid point below and the one above its float
    value so that the quantized model's outputs on calibration clips match the float model's: AdaRound's
    search space (Nagel et al. 2020), searched end to end by straight-through gradients of the KL to the
    float model's outputs (qat.distill.soft_cross_entropy) with each shadow weight kept inside the two grid
    cells around its float value. Label-free; ranges stay frozen. The refined rounding is kept only if
    it lowers the calibration KL (at 8 bits the grid is finer than the optimiser's steps and it does
    not). Weights already on the grid (GPTQ's output) stay where they are. Returns the share of
    weights whose code changed, the calibration KL before / after and whether the result was kept."""
    import tensorflow as tf
    import tf_keras as keras

    from qat.distill import soft_cross_entropy
    from qat.quantize import QUANTIZED_LAYERS
    from qat.training import set_seed

    freeze_ranges(qmodel)
    before = quantized_weights(qmodel)
    boxes = []
    for layer in [l for l in qmodel.layers if isinstance(l, QUANTIZED_LAYERS)]:
        for name, q in layer.weight_quantizers.items():
            var = getattr(layer, name)
            scale, zp = (t.numpy() for t in q.scale_zero_point(var))
            floor = np.floor(var.numpy() / scale + zp)
            margin = 1e-3      # stay strictly inside, so a shadow weight never sits on a rounding tie
            boxes.append((var, scale * (floor - zp - 0.5 + margin), scale * (floor + 1 - zp + 0.5 - margin)))

    class KeepInBoxes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for var, lo, hi in boxes:
                var.assign(tf.clip_by_value(var, lo, hi))

    teacher = float_model.predict(x_calib, batch_size=256, verbose=0)   # the targets, computed once
    kl = lambda: float(soft_cross_entropy(tf.constant(teacher), qmodel.predict(x_calib, batch_size=256, verbose=0),
                                          1.0))
    start, start_weights = kl(), qmodel.get_weights()
    set_seed(seed)
    qmodel.compile(optimizer=keras.optimizers.Adam(learning_rate),
                   loss=lambda target, probs: soft_cross_entropy(target, probs, 1.0))
    qmodel.fit(x_calib, teacher, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
               callbacks=[KeepInBoxes()])
    end = kl()
    if not end < start:
        qmodel.set_weights(start_weights)
    after = quantized_weights(qmodel)
    changed = sum(int(np.sum(after[k].codes != before[k].codes)) for k in before)
    total = sum(v.codes.size for v in before.values())
    return {"changed": changed / total, "kl_before": start, "kl_after": end, "kept": bool(end < start)}


def validation_loss(model, feats) -> float:
    """Mean cross-entropy of the model on the validation split (selection signal of `search`)."""
    p = model.predict(feats.x["val"], batch_size=256, verbose=0)
    picked = p[np.arange(len(p)), feats.y["val"]]
    return float(-np.mean(np.log(np.maximum(picked, 1e-7))))


def quantize_weights(model, opts: QuantOptions, spec: RecipeSpec, calib: np.ndarray, use_gptq: bool,
                     damp: float, bias_correction: bool):
    """The fake-quant twin with its weights rounded (nearest, or GPTQ) and optionally bias-corrected.
    Returns (qmodel, bias-correction sizes)."""
    qmodel = quantize_model(model, opts.quant_config(spec))
    if use_gptq:
        freeze_ranges(qmodel)
        gptq(model, qmodel, calib, damp)
    return qmodel, (bias_correct(model, qmodel, calib) if bias_correction else {})


def options(spec: RecipeSpec):
    """(QuantOptions, PtqSteps) from a `ptq` / `ptq_seed` spec, checked (one-line ConfigError naming
    the key)."""
    opts, rest = QuantOptions.pick(spec.options)
    switches = {name: rest.pop(name, False) for name in ("bias_correction", "gptq", "search")}
    numbers = {name: rest.pop(name, default) for name, default in (("gptq_damp", 0.01),
                                                                   ("refine_learning_rate", 1e-4))}
    refine_epochs = rest.pop("refine_epochs", 0)
    check_options(spec.method, rest, PTQ_OPTIONS)
    for name, value in switches.items():
        check_flag(name, value)
    for name, value in numbers.items():
        check_number(name, value, "a number > 0", lambda v: v > 0)
    check_number("refine_epochs", refine_epochs, "an integer >= 0 (0 = no rounding refinement)", lambda v: v >= 0,
                 integer=True)
    return opts, PtqSteps(switches["bias_correction"], switches["gptq"], switches["search"],
                          float(numbers["gptq_damp"]), refine_epochs, float(numbers["refine_learning_rate"]))


@dataclasses.dataclass(frozen=True)
class PtqSteps:
    """The data-aware steps of `ptq` (see the module doc)."""

    bias_correction: bool = False
    gptq: bool = False
    search: bool = False
    gptq_damp: float = 0.01
    refine_epochs: int = 0
    refine_learning_rate: float = 1e-4


def run(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int = 0):
    """`ptq` / `ptq_seed`: quantize, optionally bias-correct and calibrate, report, export packed.

    With `search`, the weight range estimator (minmax / mse) and the rounding (nearest / GPTQ) are
    chosen per run among their four combinations by the quantized model's validation loss: which
    one wins depends on the bit-width and the model (GPTQ gains most at 2 bits, MSE clipping at 3-4)."""
    opts, steps = options(spec)
    search = steps.search
    calib = calibration_clips(feats.x["train"], opts.calibration_size, seed)
    summary: Dict[str, Any] = {"quant/calibration_clips": len(calib)}
    # The predicted drop (float model + validation clips only) sits next to the measured one.
    summary.update(predict_summary(model, feats, opts.quant_config(spec), seed))
    candidates = [(e, g) for e in ("minmax", "mse") for g in (False, True)] if search else [(opts.estimator, steps.gptq)]
    best = None
    for estimator, g in candidates:
        qmodel, sizes = quantize_weights(model, dataclasses.replace(opts, estimator=estimator), spec, calib, g,
                                         steps.gptq_damp, steps.bias_correction)
        loss = validation_loss(qmodel, feats) if search else 0.0
        if search:
            summary[f"ptq/search/{estimator}{'+gptq' if g else ''}/val_loss"] = loss
        if best is None or loss < best[0]:
            best = (loss, qmodel, sizes, estimator, g)
    _, qmodel, sizes, estimator, g = best
    summary.update({"ptq/estimator": estimator, "ptq/gptq": g})
    summary.update({f"quant/bias_correction/{k}": v for k, v in sizes.items()})
    if steps.refine_epochs:
        refined = refine_rounding(model, qmodel, calib, steps.refine_epochs, steps.refine_learning_rate, seed)
        summary.update({f"ptq/refine/{k}": v for k, v in refined.items()})
    if spec.act_bits is not None or spec.state_bits is not None:
        calibrate(qmodel, batches(calib))
    freeze_ranges(qmodel)          # the evaluated model is the deployable one (see export)
    report = weight_report(model, qmodel)
    summary.update(report_summary(report))
    summary["quant/size_bytes"] = write_packed_model(qmodel, Path(run_dir) / f"model_{spec.bits}bit.qlstm")
    tracker.table("quant/weight_error", ["tensor", "bits", "mae", "mse", "sqnr_db", "levels"],
                  [[n, r["bits"], r["mae"], r["mse"], r["sqnr_db"], r["levels"]] for n, r in report.items()])
    return RecipeResult(qmodel, summary)


TFLITE_OPTIONS = ("int8_io", "representative_size", "latency_clips")


def tflite_options(spec: RecipeSpec):
    """(int8_io, representative_size, latency_clips) from a `tflite_*` spec, checked."""
    rest = dict(spec.options)
    int8_io = rest.pop("int8_io", False)
    sizes = {name: rest.pop(name, default) for name, default in (("representative_size", 200),
                                                                 ("latency_clips", 100))}
    check_options(spec.method, rest, TFLITE_OPTIONS)
    check_flag("int8_io", int8_io)
    for name, value in sizes.items():
        check_number(name, value, "a positive integer", lambda v: v >= 1, integer=True)
    return int8_io, sizes["representative_size"], sizes["latency_clips"]


def run_tflite(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int = 0):
    """`tflite_dynamic` / `tflite_float16` / `tflite_int8`: TFLite's own post-training modes, evaluated
    through tf.lite.Interpreter. `bits` in the summary is what the mode stores weights in."""
    from qat.export import tflite_model

    int8_io, n_rep, n_lat = tflite_options(spec)
    mode = spec.method.removeprefix("tflite_")
    tflite, info = tflite_model(model, mode, calibration_clips(feats.x["train"], n_rep, seed), int8_io)
    path = Path(run_dir) / f"model_{mode}.tflite"
    path.write_bytes(tflite.flatbuffer)
    tflite.predict(feats.x["val"][:n_lat])
    return RecipeResult(tflite, {"bits": 16 if mode == "float16" else 8, "quant/size_bytes": info["size_bytes"],
                                 "quant/convert_s": info["convert_s"],
                                 "quant/latency_ms": float(np.median(tflite.latencies_ms)),
                                 "quant/int8_io": int8_io})
