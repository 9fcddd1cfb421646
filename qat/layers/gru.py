"""QGRU: `tf_keras.layers.GRU` math with quantizers on its weights, input, gates and state.

With no quantizer configured it computes exactly what the Keras GRU computes, in both of its
modes (same weight layout: kernel (F, 3U), recurrent_kernel (U, 3U), gates in the order z, r, h):

    reset_after=True (Keras' default, cuDNN's):  bias (2, 3U), an input and a recurrent row
        z = sigma(x Wz + bz + h Rz + b'z),  r = sigma(x Wr + br + h Rr + b'r)
        n = tanh(x Wh + bh + r * (h Rh + b'h))
    reset_after=False:  bias (3U,)
        z, r as above without b';  n = tanh(x Wh + bh + (r * h) Rh)
    h_new = z * h + (1 - z) * n

Quantization points, each optional with its own QuantSpec:

    kernel, recurrent_kernel, bias   weights (weight quantizers; a (2, 3U) bias per tensor or per unit)
    input                            the layer input x_t
    gate_z, gate_r, gate_h           the update and reset gates and the candidate n (after sigmoid / tanh)
    state_h                          the hidden state h_t (also the output)

The weights are fake-quantized once per call, outside the time loop (qat.layers.recurrent); z and r
are quantized as one op per step, then the candidate (it uses the quantized r). The step splits its
products with `tf.split` (strided slices and their gradients made the loop 1.5x slower) and computes
h_new = n + z (h - n), one op fewer than z h + (1 - z) n. Not supported: stateful, return_state,
time_major, regularizers and constraints (ConfigError in `from_float`), masking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.integer import IntegerGruCell, gru_recurrence
from qat.layers.loop import time_loop
from qat.layers.recurrent import QuantizedRNN

GATES = ("gate_z", "gate_r", "gate_h")
STATES = ("state_h",)


@keras.saving.register_keras_serializable(package="qat")
class QGRU(QuantizedRNN):
    """GRU with optional fake quantization of weights, input, gates and state (see module doc)."""

    weight_names = ("kernel", "recurrent_kernel", "bias")
    supports_integer = True
    gate_names = GATES
    state_names = STATES
    float_type = keras.layers.GRU

    def __init__(self, units: int, reset_after: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = bool(reset_after)
        if self.integer is not None and not self.reset_after:
            raise ConfigError(f"GRU layer '{self.name}' with reset_after=False cannot run in integer mode: "
                              "expected reset_after=True (Keras' default)")

    def build(self, input_shape):
        features, u = int(input_shape[-1]), self.units
        self.kernel = self.add_weight("kernel", shape=(features, 3 * u), initializer=self.kernel_initializer)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", shape=(u, 3 * u),
                                                initializer=self.recurrent_initializer)
        self.bias = None
        if self.use_bias:
            shape = (2, 3 * u) if self.reset_after else (3 * u,)
            self.bias = self.add_weight("bias", shape=shape, initializer=self.bias_initializer)
        self._build_activation_quantizers(features)
        super().build(input_shape)

    _integer_recurrence = staticmethod(gru_recurrence)

    def _integer_cell(self, features: int) -> IntegerGruCell:
        return IntegerGruCell(self.units, features, self.integer.act_bits)

    def _integer_inputs(self, bias) -> tuple:
        """The input row of the (2, 3U) bias; the recurrent row goes into the loop with the bias."""
        return (None if bias is None else bias[0]), ()

    def _cell(self, kinds: tuple, gated: bool) -> "_Cell":
        return _Cell(self.units, self.activation, self.recurrent_activation, self.reset_after, kinds, gated)

    n_states = 1     # (h,)

    @staticmethod
    def _step_fn(kernel, rec_kernel, bias, rec_mask, params, cell):
        kinds, u = dict(cell.kinds), cell.units
        zr_q = n_q = None
        if "gate" in kinds:   # z and r first (the candidate uses the quantized r), then n
            on, scale, zp = params["gate"]
            zr_q = kinds["gate"].bind(on[:2 * u], scale[:2 * u], zp[:2 * u], gated=cell.gated)
            n_q = kinds["gate"].bind(on[2 * u:], scale[2 * u:], zp[2 * u:], gated=cell.gated)
        hq = kinds["state_h"].bind(*params["state_h"], gated=cell.gated) if "state_h" in kinds else None
        return _step(kernel, rec_kernel, bias, rec_mask, cell, zr_q, n_q, hq, record=False)

    @staticmethod
    def _intermediates(x, kernel, rec_kernel, bias, cell):
        step = _step(kernel, rec_kernel, bias, None, cell, None, None, None, record=True)
        return time_loop(x, (tf.zeros((tf.shape(x)[1], cell.units), x.dtype),), step, 4)

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}

    @classmethod
    def _float_options(cls, layer) -> dict:
        return {"reset_after": layer.cell.reset_after}


@dataclass(frozen=True)
class _Cell:
    """The static part of a QGRU time loop (it keys the loop's trace)."""

    units: int
    activation: Callable
    recurrent_activation: Callable
    reset_after: bool
    kinds: tuple        # ((name, QuantKind), ...) for "gate", "state_h"
    gated: bool


def _step(kernel, rec_kernel, bias, rec_mask, cell: _Cell, zr_q, n_q, hq, record: bool):
    """One GRU time step (x_t, (h,)) -> ((h_new,), outputs): (h_new,), or with `record` the state and
    the three gates unquantized (h_new, z, r, n) for calibration. `zr_q`, `n_q`, `hq`: the fake-quant
    of z and r together, of n, of h (None: float)."""
    act, rec_act, u = cell.activation, cell.recurrent_activation, cell.units
    if bias is None:
        in_bias = rec_bias = None
    elif cell.reset_after:
        in_bias, rec_bias = bias[0], bias[1]
    else:
        in_bias, rec_bias = bias, None
    rec_zr, rec_h = rec_kernel[:, :2 * u], rec_kernel[:, 2 * u:]

    def step(x_t, states):
        (h,) = states
        h_in = h if rec_mask is None else h * rec_mask
        xz = tf.matmul(x_t, kernel)
        if in_bias is not None:
            xz = tf.nn.bias_add(xz, in_bias)
        x_zr, x_h = tf.split(xz, [2 * u, u], axis=1)
        if cell.reset_after:
            hz = tf.matmul(h_in, rec_kernel)
            if rec_bias is not None:
                hz = tf.nn.bias_add(hz, rec_bias)
            h_zr, h_h = tf.split(hz, [2 * u, u], axis=1)
        else:
            h_zr = tf.matmul(h_in, rec_zr)
        zr = rec_act(x_zr + h_zr)
        zr = zr if zr_q is None else zr_q(zr)
        z, r = tf.split(zr, 2, axis=1)
        n = act(x_h + (r * h_h if cell.reset_after else tf.matmul(r * h_in, rec_h)))
        n = n if n_q is None else n_q(n)
        h_new = n + z * (h - n)          # = z h + (1 - z) n, one op fewer
        h_new = h_new if hq is None else hq(h_new)
        return (h_new,), ((h_new, z, r, n) if record else (h_new,))

    return step
