"""Error-compensating rounding (GPTQ, Frantar et al. 2023): weights are rounded one input row at a
time and the rounding error is pushed onto the rows not yet rounded through the inverse Hessian of
the layer's inputs, H = X^T X. For the LSTM, X = [x_t, h_{t-1}] and the kernel and recurrent kernel
are rounded together, since both feed the same gate pre-activations. The GRU is rounded the same
way; for its candidate columns this is an approximation (there the recurrent product is scaled by
the reset gate, or, without reset_after, multiplies r * h_{t-1} instead of h_{t-1}). A Conv1D / Conv2D
kernel [..., in, out] is rounded as the matrix [kernel positions x in, out] with X its input patches
(im2col); a depthwise kernel (one small filter per channel) keeps round-to-nearest."""
from __future__ import annotations

import numpy as np
import tf_keras as keras
from scipy.linalg import lapack

from qat.algorithms.calibration import batches
from qat.layers.conv import QConv1D, QConv2D, QDepthwiseConv2D, conv_patches
from qat.layers.model import input_tap, quantized_layers


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
    # The upper Cholesky factor U of H^-1 (U^T U = H^-1) without forming H^-1: with J the reversal of
    # the rows, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular.
    lower = np.linalg.cholesky(h[::-1, ::-1])
    u = lapack.dtrtri(lower, lower=1)[0][::-1, ::-1]
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
    for layer in [l for l in quantized_layers(qmodel) if "kernel" in l.weight_quantizers
                  and not isinstance(l, QDepthwiseConv2D)]:
        tap = keras.Model(qmodel.inputs, input_tap(qmodel, layer))
        recurrent = "recurrent_kernel" in layer.weight_quantizers
        hessian = 0.0
        for batch in batches(x_calib):
            x = tap(batch, training=False)
            if recurrent:   # h_{t-1}: the layer's own output shifted one step, zeros at t = 0
                y = np.asarray(layer.sequence(x))   # every step, in the order the layer reads frames
                x = x[:, ::-1] if layer.go_backwards else x
                h_prev = np.concatenate([np.zeros_like(y[:, :1]), y[:, :-1]], axis=1)
                rows = np.concatenate([_rows(x), _rows(h_prev)], axis=1)
            else:
                rows = _rows(conv_patches(layer, x)) if isinstance(layer, (QConv1D, QConv2D)) else _rows(x)
            hessian = hessian + rows.T @ rows
        names = ["kernel", "recurrent_kernel"] if recurrent else ["kernel"]
        shapes = [getattr(layer, n).shape for n in names]
        weights = [_rows(getattr(layer, n).numpy()) for n in names]     # a conv kernel as [positions x in, out]
        grids = [[_rows(np.broadcast_to(t.numpy(), shape)) for t in layer.weight_quantizers[n].scale_zero_point(
            getattr(layer, n))] for n, shape in zip(names, shapes)]
        scale = np.concatenate([g[0] for g in grids])
        zp = np.concatenate([g[1] for g in grids])
        spec = layer.weight_quantizers["kernel"].spec
        rounded = gptq_round(np.concatenate(weights), hessian, scale, zp, spec.qmin, spec.qmax, damp)
        start = 0
        for n, w, shape in zip(names, weights, shapes):
            getattr(layer, n).assign(rounded[start:start + len(w)].reshape(shape))
            start += len(w)
