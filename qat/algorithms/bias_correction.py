"""Bias correction: the mean shift that weight rounding leaves in every pre-activation is removed
from the bias, with the mean inputs measured on calibration clips in the float model."""
from __future__ import annotations

from typing import Dict

import numpy as np
import tf_keras as keras

from qat.algorithms.calibration import batches
from qat.layers.model import float_weight, quantized_weights
from qat.metrics import predict


def layer_input_means(model, layer_names, x: np.ndarray) -> Dict[str, np.ndarray]:
    """Mean over clips (and time) of each named layer's input vector, in the float model."""
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
    b <- b - E[x] (W_q - W) [- E[h] (R_q - R) for the LSTM and GRU], with E[x] (E[h]: the mean hidden
    state) measured on calibration clips in the float model. A GRU with reset_after has an input and a
    recurrent bias row: each takes the shift of its own product (the recurrent one inside the reset
    gate's product, where it belongs). Returns the size of each correction (L2)."""
    q = quantized_weights(qmodel)
    layers = sorted({name.split("/")[0] for name in q if name.endswith("/kernel")})
    layers = [n for n in layers if getattr(float_model.get_layer(n), "use_bias", False)]
    if not layers:
        return {}
    means = layer_input_means(float_model, layers, x_calib)
    h_means = {}
    recurrent = [n for n in layers if f"{n}/recurrent_kernel" in q]
    if recurrent:
        taps = keras.Model(float_model.inputs, [float_model.get_layer(n).output for n in recurrent])
        outs = predict(taps, x_calib, batch_size=64)
        outs = outs if isinstance(outs, list) else [outs]
        h_means = {n: o.reshape(-1, o.shape[-1]).astype(np.float64).mean(0) for n, o in zip(recurrent, outs)}
    sizes = {}
    for name in layers:
        shift = means[name] @ (q[f"{name}/kernel"].values - float_weight(float_model, f"{name}/kernel"))
        rec_shift = 0.0
        if name in h_means:
            rec_shift = h_means[name] @ (q[f"{name}/recurrent_kernel"].values
                                         - float_weight(float_model, f"{name}/recurrent_kernel"))
        bias = float_weight(float_model, f"{name}/bias")
        shift = np.stack([shift, rec_shift * np.ones_like(shift)]) if bias.ndim == 2 else shift + rec_shift
        qmodel.get_layer(name).bias.assign(bias - shift.astype(np.float32))
        sizes[name] = float(np.linalg.norm(shift))
    return sizes
