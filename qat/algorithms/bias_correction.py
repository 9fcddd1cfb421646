"""Bias correction: the mean shift that weight rounding leaves in every pre-activation is removed
from the bias, with the mean inputs measured on calibration clips in the float model."""
from __future__ import annotations

from typing import Dict

import numpy as np
import tf_keras as keras

from qat.algorithms.calibration import batches
from qat.layers.model import find_layer, float_weight, input_tap, output_taps, quantized_weights
from qat.memo import derived
from qat.metrics import predict


def layer_input_means(model, layer_names, x: np.ndarray) -> Dict[str, np.ndarray]:
    """Mean over clips (and time) of each named layer's input vector, in the float model."""
    taps = keras.Model(model.inputs, [input_tap(model, find_layer(model, n)) for n in layer_names])
    sums = {n: 0.0 for n in layer_names}
    counts = {n: 0 for n in layer_names}
    for batch in batches(x):
        outs = taps(batch, training=False)
        for name, out in zip(layer_names, outs if isinstance(outs, (list, tuple)) else [outs]):
            flat = np.asarray(out, np.float64).reshape(-1, out.shape[-1])   # clips (x time) rows
            sums[name] = sums[name] + flat.sum(0)
            counts[name] += flat.shape[0]
    return {n: sums[n] / counts[n] for n in layer_names}


def hidden_state_means(model, layer_names, x: np.ndarray) -> Dict[str, np.ndarray]:
    """Mean over clips and time of each named recurrent layer's hidden state, in the float model."""
    out = {}
    for name in layer_names:        # the layer's own output sequence
        layer = find_layer(model, name)
        taps = output_taps(model, layer)
        if len(taps) == 2:          # a top-level layer: its output in the model's graph
            outs = predict(keras.Model(model.inputs, taps[1]), x, batch_size=64)
        else:                       # inside a Bidirectional: called on its input
            tap = keras.Model(model.inputs, taps[0])
            outs = np.concatenate([np.asarray(layer(tap(b, training=False), training=False)) for b in batches(x)])
        out[name] = outs.reshape(-1, outs.shape[-1]).astype(np.float64).mean(0)
    return out


def float_means(model, layer_names, recurrent_names, x: np.ndarray):
    """(mean input of each named layer, mean hidden state of each named recurrent layer) on x."""
    return layer_input_means(model, layer_names, x), hidden_state_means(model, recurrent_names, x)


def mean_shift(mean_input: np.ndarray, delta: np.ndarray, depthwise: bool = False) -> np.ndarray:
    """The mean change of each output pre-activation when a kernel changes by `delta`, for inputs of
    mean `mean_input` (one per input channel): x @ delta for a matrix; for a convolution every kernel
    position sees the same mean (edges of 'same' padding aside); a depthwise kernel [kh, kw, C, M]
    maps channel c to outputs c * M ... c * M + M - 1."""
    if depthwise:
        return (mean_input[:, None] * delta.sum(axis=(0, 1))).reshape(-1)
    return mean_input @ delta.reshape(-1, *delta.shape[-2:]).sum(axis=0)


def bias_correct(float_model, qmodel, x_calib: np.ndarray) -> Dict[str, float]:
    """Shift each quantized layer's float bias so that its pre-activations keep their float mean:
    b <- b - E[x] (W_q - W) [- E[h] (R_q - R) for the LSTM and GRU] (`mean_shift` for convolutions), with E[x] (E[h]: the mean hidden
    state) measured on calibration clips in the float model. A GRU with reset_after has an input and a
    recurrent bias row: each takes the shift of its own product (the recurrent one inside the reset
    gate's product, where it belongs). Returns the size of each correction (L2)."""
    q = quantized_weights(qmodel)
    kernels = {name.split("/")[0]: name for name in q if name.endswith(("/kernel", "/depthwise_kernel"))}
    layers = sorted(kernels)
    layers = [n for n in layers if getattr(find_layer(float_model, n), "use_bias", False)]
    if not layers:
        return {}
    recurrent = [n for n in layers if f"{n}/recurrent_kernel" in q]
    # float-model statistics: the same for every candidate and bit-width (qat.memo)
    means, h_means = derived(float_model, "bias-correction means",
                             lambda: float_means(float_model, layers, recurrent, x_calib), x_calib, layers, recurrent)
    sizes = {}
    for name in layers:
        shift = mean_shift(means[name], q[kernels[name]].values - float_weight(float_model, kernels[name]),
                           kernels[name].endswith("/depthwise_kernel"))
        rec_shift = 0.0
        if name in h_means:
            rec_shift = h_means[name] @ (q[f"{name}/recurrent_kernel"].values
                                         - float_weight(float_model, f"{name}/recurrent_kernel"))
        bias = float_weight(float_model, f"{name}/bias")
        shift = np.stack([shift, rec_shift * np.ones_like(shift)]) if bias.ndim == 2 else shift + rec_shift
        find_layer(qmodel, name).bias.assign(bias - shift.astype(np.float32))
        sizes[name] = float(np.linalg.norm(shift))
    return sizes
