"""QLSTM: `tf_keras.layers.LSTM` math with quantizers on its weights, input, gates and state.

With no quantizer configured it computes exactly what the Keras LSTM computes (same weight layout:
kernel (F, 4U), recurrent_kernel (U, 4U), bias (4U,), gates in the order i, f, c, o). Quantization
points, each optional with its own QuantSpec:

    kernel, recurrent_kernel, bias   weights (weight quantizers)
    input                            the layer input x_t
    gate_i, gate_f, gate_c, gate_o   the four gate activations (after sigmoid / tanh)
    state_c, state_h                 the cell state c_t and the hidden state h_t (also the output)

Speed: the weights are fake-quantized once per call, outside the time loop
(qat.layers.recurrent.time_loop, written as Keras' CPU LSTM); activation quantizers inside the loop
are single fused ops (qat.quant.ops.fused_fake_quant), and quantized fixed-range gates come from
one sigmoid: tanh(z) = 2 sigmoid(2z) - 1, with the c-gate weight columns doubled exactly before the
loop and the affine map folded into the gates' fake-quant (3 ops per step instead of 7).
Not supported: stateful, go_backwards, return_state, time_major, regularizers and constraints
(ConfigError in `from_float`), and masking (Keras refuses a mask sent to this layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.base import QuantizedLayer
from qat.layers.recurrent import LoopCache, time_loop
from qat.quant.ops import fused_fake_quant
from qat.quant.quantizers import concat_params
from qat.quant.spec import QuantSpec

GATES = ("gate_i", "gate_f", "gate_c", "gate_o")
STATES = ("state_c", "state_h")


@keras.saving.register_keras_serializable(package="qat")
class QLSTM(QuantizedLayer, keras.layers.Layer):
    """LSTM with optional fake quantization of weights, input, gates and state (see module doc)."""

    weight_names = ("kernel", "recurrent_kernel", "bias")

    def __init__(self, units: int, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 return_sequences: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias: bool = True,
                 kernel_quant: Optional[QuantSpec] = None, recurrent_kernel_quant: Optional[QuantSpec] = None,
                 bias_quant: Optional[QuantSpec] = None, input_quant: Optional[QuantSpec] = None,
                 gate_quant: Optional[QuantSpec] = None, state_quant: Optional[QuantSpec] = None,
                 quantizer="range", **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias, self.return_sequences = bool(use_bias), bool(return_sequences)
        self.dropout, self.recurrent_dropout = float(dropout), float(recurrent_dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.unit_forget_bias = bool(unit_forget_bias)
        self._set_quantization({"kernel": kernel_quant, "recurrent_kernel": recurrent_kernel_quant,
                                "bias": bias_quant, "input": input_quant, "gate": gate_quant,
                                "state": state_quant}, quantizer)
        # Traced loops, set past Keras' attribute tracking: they are code, not state to save.
        object.__setattr__(self, "_loops", LoopCache(_recurrence))
        object.__setattr__(self, "_intermediates", tf.function(_intermediates, autograph=False,
                                                               reduce_retracing=True))
        self.input_spec = keras.layers.InputSpec(ndim=3)

    # ------------------------------------------------------------------ weights and quantizers

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
        self._build_quantizers([(("input",), "input", features), (GATES, "gate", u), (STATES, "state", u)])
        super().build(input_shape)

    def _weights(self):
        return (self.quantized_weight("kernel"), self.quantized_weight("recurrent_kernel"),
                self.quantized_weight("bias") if self.use_bias else None)

    # ------------------------------------------------------------------ forward pass

    def call(self, inputs, training=None):
        training = bool(training)
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        q_in = self.activation_quantizers.get("input")
        x = inputs if q_in is None else q_in(inputs)
        if training and self.dropout > 0:
            # As Keras' LSTM (its fused path): a fresh mask for every time step, not one per sequence.
            x = tf.nn.dropout(x, rate=self.dropout)
        x = tf.transpose(x, [1, 0, 2])
        rec_mask = None
        if training and self.recurrent_dropout > 0:
            rec_mask = tf.nn.dropout(tf.ones((tf.shape(x)[1], self.units), x.dtype), rate=self.recurrent_dropout)
        # the quantizers inside the time loop: their kinds key the traced loop, their ranges are inputs
        kinds, params = {}, {}
        gates = [self.activation_quantizers.get(g) for g in GATES]
        if gates[0] is not None:
            kinds["gate"], params["gate"] = gates[0].kind, concat_params(gates, self.units)
        for name in STATES:
            q = self.activation_quantizers.get(name)
            if q is not None:
                kinds[name], params[name] = q.kind, q.params()
        args = (x, *self._weights(), rec_mask, params)
        loop = lambda gated: self._loops(_Cell(self.units, self.activation, self.recurrent_activation,
                                               tuple(sorted(kinds.items())), gated))(*args)
        # Quantizers pass values through until calibrated, which costs a select per quantizer and time
        # step; once every quantizer in the loop is calibrated (training, evaluation) a loop without
        # the selects runs instead, with the same results.
        if params:
            calibrated = tf.reduce_all([tf.reduce_all(on) for on, _, _ in params.values()])
            (hs,) = tf.cond(calibrated, lambda: loop(False), lambda: loop(True))
        else:
            (hs,) = loop(False)
        return tf.transpose(hs, [1, 0, 2]) if self.return_sequences else hs[-1]

    def calibration_values(self, inputs) -> dict:
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        out = self._intermediates(tf.transpose(inputs, [1, 0, 2]), *self._weights(), self.units,
                                  self.activation, self.recurrent_activation)
        return {"input": inputs, **dict(zip(STATES + GATES, out))}

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if self.return_sequences:
            return input_shape[:2].concatenate([self.units])
        return input_shape[:1].concatenate([self.units])

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, activation=keras.activations.serialize(self.activation),
            recurrent_activation=keras.activations.serialize(self.recurrent_activation),
            use_bias=self.use_bias, return_sequences=self.return_sequences, dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            unit_forget_bias=self.unit_forget_bias, **self.quantization_config())
        return config

    @classmethod
    def from_float(cls, lstm, specs: dict, quantizer="range") -> "QLSTM":
        """An unbuilt QLSTM configured like the float `keras.layers.LSTM` `lstm` (same name).
        `specs` maps kernel/recurrent_kernel/bias/input/gate/state to a QuantSpec or None."""
        unsupported = {"stateful": lstm.stateful, "go_backwards": lstm.go_backwards,
                       "return_state": lstm.return_state, "time_major": lstm.time_major}
        cell = lstm.cell
        unsupported.update({f"{n}": getattr(cell, n) is not None for n in (
            "kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "kernel_constraint",
            "recurrent_constraint", "bias_constraint")})
        unsupported["activity_regularizer"] = lstm.activity_regularizer is not None
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"LSTM layer '{lstm.name}' uses {', '.join(bad)}, which quantization does not "
                              "support: expected a plain LSTM (return_sequences and dropout are fine)")
        return cls(lstm.units, activation=cell.activation, recurrent_activation=cell.recurrent_activation,
                   use_bias=cell.use_bias, return_sequences=lstm.return_sequences, dropout=cell.dropout,
                   recurrent_dropout=cell.recurrent_dropout, quantizer=quantizer, name=lstm.name,
                   **{f"{key}_quant": specs.get(key) for key in ("kernel", "recurrent_kernel", "bias", "input",
                                                                 "gate", "state")})


@dataclass(frozen=True)
class _Cell:
    """The static part of a QLSTM time loop (it keys the loop's trace): sizes, activations, the kind of
    each quantizer inside the loop and whether uncalibrated quantizers pass through (`gated`)."""

    units: int
    activation: Callable
    recurrent_activation: Callable
    kinds: tuple        # ((name, QuantKind), ...) for "gate", "state_c", "state_h"
    gated: bool


def _recurrence(x, kernel, rec_kernel, bias, rec_mask, params, cell: _Cell):
    """The quantized LSTM over time-major x [T, B, F]: the h sequence [T, B, U] (a 1-tuple)."""
    kinds = dict(cell.kinds)
    act, rec_act = cell.activation, cell.recurrent_activation
    u = cell.units
    one_sigmoid = ("gate" in kinds and not cell.gated and kinds["gate"].quantizer.folds_affine
                   and act is keras.activations.tanh and rec_act is keras.activations.sigmoid)
    quant = {name: kind.bind(*params[name], gated=cell.gated) for name, kind in kinds.items()
             if not (one_sigmoid and name == "gate")}
    if one_sigmoid:
        ones = tf.ones((u,), x.dtype)
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

    zeros = tf.zeros((tf.shape(x)[1], u), x.dtype)
    return time_loop(x, (zeros, zeros), step, 1)


def _intermediates(x, kernel, rec_kernel, bias, units: int, act, rec_act):
    """The LSTM over time-major x with no activation quantization: c, h and the four gates at every
    step, each [T, B, U] (what calibration estimates the activation ranges from)."""

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

    zeros = tf.zeros((tf.shape(x)[1], units), x.dtype)
    return time_loop(x, (zeros, zeros), step, 6)
