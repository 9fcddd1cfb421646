"""Calibration shared by every quantized layer: which training clips calibrate, and setting every
activation range (layer inputs, gates, states) from the values the layers see on them."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import tf_keras as keras

from qat.errors import DataError
from qat.layers.model import input_tap, quantized_layers
from qat.quant.reference import estimate_range


def calibration_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of `n` of `n_total` clips (all of them if fewer)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[: min(int(n), n_total)])


def calibration_clips(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of `n` clips of x (give it training or validation clips, never test)."""
    return x[calibration_indices(len(x), n, seed)]


def batches(x: np.ndarray, size: int = 64) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


def calibrate(qmodel, batches: Iterable[np.ndarray]) -> None:
    """Set every activation range of a fake-quant model from data, with each quantizer's estimator.

    The values come from each layer's `calibration_values` on its inputs with every activation
    quantizer bypassed (weights stay quantized), so one pass over `batches` suffices and each range
    sees every value of every batch."""
    layers = [layer for layer in quantized_layers(qmodel) if layer.activation_quantizers]
    if not layers:
        return
    for layer in layers:
        for q in layer.activation_quantizers.values():
            q.reset()
    taps = keras.Model(qmodel.inputs, [input_tap(qmodel, layer) for layer in layers])
    seen = {(layer.name, key): [] for layer in layers for key in layer.activation_quantizers}
    for batch in batches:
        xs = taps(np.asarray(batch, np.float32), training=False)
        xs = xs if isinstance(xs, (list, tuple)) else [xs]
        for layer, x in zip(layers, xs):
            for key, values in layer.calibration_values(x).items():
                if key in layer.activation_quantizers:
                    seen[(layer.name, key)].append(np.asarray(values))
    if not any(seen.values()):
        raise DataError("calibration got no batches: expected at least one batch of model inputs")
    for layer in layers:
        _set_ranges(layer, {key: seen[(layer.name, key)] for key in layer.activation_quantizers})


def values_per_clip(qmodel, clip: np.ndarray) -> dict:
    """{(layer name, quantizer name): how many values that activation quantizer rounds for one clip
    (every time step of a recurrent layer's gates and states)}."""
    layers = [layer for layer in quantized_layers(qmodel) if layer.activation_quantizers]
    if not layers:
        return {}
    taps = keras.Model(qmodel.inputs, [input_tap(qmodel, layer) for layer in layers])
    xs = taps(np.asarray(clip[None], np.float32), training=False)
    xs = xs if isinstance(xs, (list, tuple)) else [xs]
    return {(layer.name, key): int(np.size(values)) for layer, x in zip(layers, xs)
            for key, values in layer.calibration_values(x).items() if key in layer.activation_quantizers}


def calibrate_in_order(qmodel, clips: np.ndarray, size: int = 64) -> None:
    """`calibrate` one layer after another from the input: each layer's ranges come from what the
    layers below it feed it once they are calibrated (where a layer's grid depends on the grids below
    it, as in TFLite's int8 model, qat.layers.tflite_int8). One pass over `clips` per layer."""
    layers = [layer for layer in quantized_layers(qmodel) if layer.activation_quantizers]
    for layer in layers:
        for q in layer.activation_quantizers.values():
            q.reset()
    for layer in layers:
        tap = keras.Model(qmodel.inputs, input_tap(qmodel, layer))
        seen = {key: [] for key in layer.activation_quantizers}
        for batch in batches(clips, size):
            for key, values in layer.calibration_values(tap(np.asarray(batch, np.float32), training=False)).items():
                seen[key].append(np.asarray(values))
        if not all(seen.values()):
            raise DataError("calibration got no clips: expected at least one model input")
        _set_ranges(layer, seen)


def _set_ranges(layer, seen) -> None:
    """Each activation range of `layer` from the values its quantizer saw, with its estimator."""
    for key, q in layer.activation_quantizers.items():
        data = np.concatenate([v.reshape(-1, v.shape[-1]) for v in seen[key]])
        lo, hi = estimate_range(data if q.spec.granularity == "per_channel" else data.ravel(), q.spec)
        q.set_range(lo, hi)
