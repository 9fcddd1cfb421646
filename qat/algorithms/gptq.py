"""Error-compensating rounding (GPTQ, Frantar et al. 2023): weights are rounded one input row at a
time and the rounding error is pushed onto the rows not yet rounded through the inverse Hessian of
the layer's inputs, H = X^T X. For the LSTM, X = [x_t, h_{t-1}] and the kernel and recurrent kernel
are rounded together, since both feed the same gate pre-activations. The GRU is rounded the same
way; for its candidate columns this is an approximation (there the recurrent product is scaled by
the reset gate, or, without reset_after, multiplies r * h_{t-1} instead of h_{t-1})."""
from __future__ import annotations

import numpy as np
import tf_keras as keras

from qat.algorithms.calibration import batches
from qat.layers.model import output_taps, quantized_layers


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
    for layer in [l for l in quantized_layers(qmodel) if "kernel" in l.weight_quantizers]:
        taps = keras.Model(qmodel.inputs, output_taps(qmodel, layer))
        recurrent = "recurrent_kernel" in layer.weight_quantizers
        hessian = 0.0
        for batch in batches(x_calib):
            outs = taps(batch, training=False)
            x, *y = outs if isinstance(outs, list) else [outs]
            if recurrent:   # h_{t-1}: the layer's own output shifted one step, zeros at t = 0
                y = np.asarray(y[0] if y else layer(x, training=False))   # in the order the layer reads frames
                x = x[:, ::-1] if layer.go_backwards else x
                h_prev = np.concatenate([np.zeros_like(y[:, :1]), y[:, :-1]], axis=1)
                rows = np.concatenate([_rows(x), _rows(h_prev)], axis=1)
            else:
                rows = _rows(x)
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
