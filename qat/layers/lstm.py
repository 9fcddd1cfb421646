"""QLSTM: `tf_keras.layers.LSTM` math with quantizers on its weights, input, gates and state.

With no quantizer configured it computes exactly what the Keras LSTM computes (same weight layout:
kernel (F, 4U), recurrent_kernel (U, 4U), bias (4U,), gates in the order i, f, c, o). Quantization
points, each optional with its own QuantSpec:

    kernel, recurrent_kernel, bias   weights (weight quantizers)
    input                            the layer input x_t
    gate_i, gate_f, gate_c, gate_o   the four gate activations (after sigmoid / tanh)
    state_c, state_h                 the cell state c_t and the hidden state h_t (also the output)

Speed: the weights are fake-quantized once per call, outside the time loop
(qat.layers.recurrent.time_loop, written as Keras' CPU LSTM). With no quantizer inside the loop
(weights only) and a GPU visible, the loop is Keras' own fused LSTM kernel
(`lstm_with_backend_selection`: cuDNN on the GPU) on the fake-quantized weights; `fused=True` /
`False` forces one path (on a CPU the project's loop is the faster: BENCHMARKS.md, "Training-step
time"). Activation quantizers inside the loop
are single fused ops (qat.quant.ops.fused_fake_quant), and quantized fixed-range gates come from
one sigmoid: tanh(z) = 2 sigmoid(2z) - 1, with the c-gate weight columns doubled exactly before the
loop and the affine map folded into the gates' fake-quant (3 ops per step instead of 7).
Not supported: stateful, return_state, time_major, regularizers and constraints
(ConfigError in `from_float`), and masking (Keras refuses a mask sent to this layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf
import tf_keras as keras
from tf_keras.src.layers.rnn import lstm as keras_lstm   # Keras' fused LSTM kernel (cuDNN / CPU)

from qat.layers.integer import IntegerLstmCell, lstm_recurrence
from qat.layers.loop import time_loop
from qat.layers.recurrent import QuantizedRNN
from qat.quant.ops import fused_fake_quant

GATES = ("gate_i", "gate_f", "gate_c", "gate_o")
STATES = ("state_c", "state_h")


@keras.saving.register_keras_serializable(package="qat")
class QLSTM(QuantizedRNN):
    """LSTM with optional fake quantization of weights, input, gates and state (see module doc)."""

    weight_names = ("kernel", "recurrent_kernel", "bias")
    supports_integer = True
    gate_names = GATES
    state_names = STATES
    float_type = keras.layers.LSTM

    def __init__(self, units: int, unit_forget_bias: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = bool(unit_forget_bias)

    def build(self, input_shape):
        features, u = int(input_shape[-1]), self.units
        self.kernel = self.add_weight("kernel", shape=(features, 4 * u), initializer=self.kernel_initializer)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", shape=(u, 4 * u),
                                                initializer=self.recurrent_initializer)
        self.bias = None
        if self.use_bias:
            init = self.bias_initializer
            if self.unit_forget_bias:
                def init(shape, dtype=None, **kw):   # Keras LSTM: forget-gate bias starts at 1
                    b = self.bias_initializer((u,), dtype=dtype)
                    return tf.concat([b, tf.ones((u,), dtype=dtype), self.bias_initializer((2 * u,), dtype=dtype)], 0)
            self.bias = self.add_weight("bias", shape=(4 * u,), initializer=init)
        self._build_activation_quantizers(features)
        super().build(input_shape)

    integer_states = ("state_c",)
    _integer_recurrence = staticmethod(lstm_recurrence)

    def _integer_cell(self, features: int) -> IntegerLstmCell:
        return IntegerLstmCell(self.units, features, self.integer.act_bits, self.integer.state_bits)

    def _integer_inputs(self, bias) -> tuple:
        """The bias, and the largest calibrated cell-state magnitude (its power-of-two scale)."""
        qc = self.activation_quantizers["state_c"]
        return bias, (tf.reduce_max(tf.maximum(-tf.minimum(qc.lo, 0.0), tf.maximum(qc.hi, 0.0))),)

    def _cell(self, kinds: tuple, gated: bool) -> "_Cell":
        return _Cell(self.units, self.activation, self.recurrent_activation, kinds, gated)

    n_states = 2     # (h, c)
    supports_fused = True

    def _fused_hidden_states(self, x, kernel, rec_kernel, bias):
        """Keras' LSTM kernels as `tf_keras.layers.LSTM.call` picks them: eagerly cuDNN where a GPU
        is visible, else the CPU kernel; in a graph both, Grappler keeping the one of the device."""
        zeros = tf.zeros((tf.shape(x)[1], self.units), x.dtype)
        args = dict(inputs=x, init_h=zeros, init_c=zeros, kernel=kernel, recurrent_kernel=rec_kernel,
                    bias=tf.zeros((4 * self.units,), x.dtype) if bias is None else bias, mask=None,
                    time_major=True, go_backwards=False, sequence_lengths=None, return_sequences=True)
        if not tf.executing_eagerly():
            kernel_fn = keras_lstm.lstm_with_backend_selection
        elif tf.config.list_logical_devices("GPU"):
            kernel_fn = keras_lstm.gpu_lstm
        else:
            kernel_fn = keras_lstm.standard_lstm
        if kernel_fn is not keras_lstm.gpu_lstm:
            args["zero_output_for_mask"] = False
        _, outputs, *_ = kernel_fn(**args)
        return outputs

    @staticmethod
    def _step_fn(kernel, rec_kernel, bias, rec_mask, params, cell):
        return _lstm_step(kernel, rec_kernel, bias, rec_mask, params, cell)

    @staticmethod
    def _intermediates(x, kernel, rec_kernel, bias, cell):
        return _intermediates(x, kernel, rec_kernel, bias, cell)

    def get_config(self):
        return {**super().get_config(), "unit_forget_bias": self.unit_forget_bias}

    @classmethod
    def _float_options(cls, layer) -> dict:
        return {"unit_forget_bias": layer.cell.unit_forget_bias}


@dataclass(frozen=True)
class _Cell:
    """The static part of a QLSTM time loop (it keys the loop's trace): sizes, activations, the kind of
    each quantizer inside the loop and whether uncalibrated quantizers pass through (`gated`)."""

    units: int
    activation: Callable
    recurrent_activation: Callable
    kinds: tuple        # ((name, QuantKind), ...) for "gate", "state_c", "state_h"
    gated: bool


def _lstm_step(kernel, rec_kernel, bias, rec_mask, params, cell: _Cell):
    """One quantized LSTM time step, (x_t, (h, c)) -> ((h_new, c_new), (h_new,))."""
    kinds = dict(cell.kinds)
    act, rec_act = cell.activation, cell.recurrent_activation
    u = cell.units
    one_sigmoid = ("gate" in kinds and not cell.gated and kinds["gate"].quantizer.folds_affine
                   and act is keras.activations.tanh and rec_act is keras.activations.sigmoid)
    quant = {name: kind.bind(*params[name], gated=cell.gated) for name, kind in kinds.items()
             if not (one_sigmoid and name == "gate")}
    if one_sigmoid:
        ones = tf.ones((u,), kernel.dtype)
        double = tf.concat([ones, ones, 2 * ones, ones], 0)
        kernel, rec_kernel = kernel * double, rec_kernel * double
        bias = None if bias is None else bias * double
        _, scale, zp = params["gate"]
        quant["gate"] = fused_fake_quant(scale, zp, kinds["gate"].spec,
                                         pre=(double, tf.concat([0 * ones, 0 * ones, -ones, 0 * ones], 0)))
    identity = lambda v: v
    cq, hq = quant.get("state_c", identity), quant.get("state_h", identity)
    gq = quant.get("gate")

    def step(x_t, states):
        h, c = states
        z = tf.matmul(x_t, kernel)
        z += tf.matmul(h if rec_mask is None else h * rec_mask, rec_kernel)
        if bias is not None:
            z = tf.nn.bias_add(z, bias)
        if one_sigmoid:
            i, f, g, o = tf.split(gq(tf.sigmoid(z)), 4, axis=1)
        else:
            zi, zf, zc, zo = tf.split(z, 4, axis=1)
            gates = (rec_act(zi), rec_act(zf), act(zc), rec_act(zo))
            i, f, g, o = gates if gq is None else tf.split(gq(tf.concat(gates, axis=1)), 4, axis=1)
        c_new = cq(f * c + i * g)
        h_new = hq(o * act(c_new))
        return (h_new, c_new), (h_new,)

    return step


def _intermediates(x, kernel, rec_kernel, bias, cell: _Cell):
    """The LSTM over time-major x with no activation quantization: c, h and the four gates at every
    step, each [T, B, U] (what calibration estimates the activation ranges from)."""
    act, rec_act = cell.activation, cell.recurrent_activation

    def step(x_t, states):
        h, c = states
        z = tf.matmul(x_t, kernel) + tf.matmul(h, rec_kernel)
        if bias is not None:
            z = tf.nn.bias_add(z, bias)
        zi, zf, zc, zo = tf.split(z, 4, axis=1)
        i, f, g, o = rec_act(zi), rec_act(zf), act(zc), rec_act(zo)
        c_new = f * c + i * g
        h_new = o * act(c_new)
        return (h_new, c_new), (c_new, h_new, i, f, g, o)

    zeros = tf.zeros((tf.shape(x)[1], cell.units), x.dtype)
    return time_loop(x, (zeros, zeros), step, 6)


def float_states(x, kernel, rec_kernel, bias, units: int):
    """(c, h) at every step, each [T, B, U], of the float tanh / sigmoid LSTM over time-major x."""
    c, h, *_ = _intermediates(x, kernel, rec_kernel, bias,
                              _Cell(units, keras.activations.tanh, keras.activations.sigmoid, (), False))
    return c, h
