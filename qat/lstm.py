"""A fake-quantized LSTM layer: `tf_keras.layers.LSTM` math with quantizers on its weights,
input, gates and state.

With no quantizer configured it computes exactly what the Keras LSTM computes (same weight layout:
kernel (F, 4U), recurrent_kernel (U, 4U), bias (4U,), gates in the order i, f, c, o). Quantization
points, each optional with its own QuantSpec:

    kernel, recurrent_kernel, bias   weights (qat.quantizers.WeightQuantizer)
    input                            the layer input x_t
    gate_i, gate_f, gate_c, gate_o   the four gate activations (after sigmoid / tanh)
    state_c, state_h                 the cell state c_t and the hidden state h_t (also the output)

Speed (BENCHMARKS.md section 3): the weights are fake-quantized once per call, outside the time loop;
the loop is written as Keras' own CPU LSTM (its own traced function, input projection per step), so
the float twin trains as fast as `keras.layers.LSTM`; activation quantizers inside the loop are
single fused ops (`qat.quantizers.fused_fake_quant`), and quantized gates come from one sigmoid.
Not supported: stateful, go_backwards, return_state, time_major, regularizers and constraints
(ConfigError in `from_float`), and masking (Keras refuses a mask sent to this layer).
"""
from __future__ import annotations

from qat import ConfigError

from dataclasses import dataclass
from typing import Callable, Optional

import tensorflow as tf
import tf_keras as keras

from qat.quantizers import ActivationQuantizer, QuantSpec, WeightQuantizer, bound_quant, concat_params, fused_fake_quant

GATES = ("gate_i", "gate_f", "gate_c", "gate_o")
STATES = ("state_c", "state_h")


@keras.saving.register_keras_serializable(package="qat")
class QLSTM(keras.layers.Layer):
    """LSTM with optional fake quantization of weights, input, gates and state (see module doc)."""

    def __init__(self, units: int, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 return_sequences: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias: bool = True,
                 kernel_quant: Optional[QuantSpec] = None, recurrent_quant: Optional[QuantSpec] = None,
                 bias_quant: Optional[QuantSpec] = None, input_quant: Optional[QuantSpec] = None,
                 gate_quant: Optional[QuantSpec] = None, state_quant: Optional[QuantSpec] = None,
                 learned: bool = False, **kwargs):
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
        self.specs = {name: QuantSpec.from_config(spec) for name, spec in (
            ("kernel", kernel_quant), ("recurrent_kernel", recurrent_quant), ("bias", bias_quant),
            ("input", input_quant), ("gate", gate_quant), ("state", state_quant))}
        if not self.use_bias and self.specs["bias"] is not None:
            raise ConfigError("bias quantization is not allowed with use_bias=False: the layer has no bias")
        self.learned = bool(learned)
        # The time loop, traced per layer (a module-level function would keep every model's traces
        # alive for the whole process: a sweep slowed down run after run). Set past Keras' attribute
        # tracking: it is code, not state to save.
        object.__setattr__(self, "_recurrence", tf.function(_recurrence, autograph=False, reduce_retracing=True))
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

        self.weight_quantizers = {}
        for name in ("kernel", "recurrent_kernel", "bias"):
            spec, var = self.specs[name], getattr(self, name)
            if spec is not None:
                q = WeightQuantizer(spec, self.learned)
                q.build(self, name, var.shape)
                self.weight_quantizers[name] = q
        self.activation_quantizers = {}
        for names, spec_name, channels in ((("input",), "input", features), (GATES, "gate", u), (STATES, "state", u)):
            if self.specs[spec_name] is not None:
                for name in names:
                    q = ActivationQuantizer(self.specs[spec_name], self.learned)
                    q.build(self, name, channels)
                    self.activation_quantizers[name] = q
        super().build(input_shape)

    def quantized_weight(self, name: str):
        """The weight as the forward pass uses it (fake-quantized if it has a quantizer)."""
        var = getattr(self, name)
        q = self.weight_quantizers.get(name)
        return var if q is None else q(var)

    def copy_float_weights(self, lstm) -> None:
        """Take the weights of a float `keras.layers.LSTM` and fit the weight ranges to them."""
        for name in ("kernel", "recurrent_kernel", "bias"):
            if getattr(self, name) is not None:
                getattr(self, name).assign(getattr(lstm.cell, name))
        for name, q in self.weight_quantizers.items():
            q.init_from(getattr(self, name).numpy())

    # ------------------------------------------------------------------ forward pass

    def _run(self, inputs, training=None, record=False):
        """Returns (h sequence time-major, dict of recorded pre-quantization values if record)."""
        training = bool(training) and not record
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        recorded = {"input": inputs} if record else {}
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
        args = (x, self.quantized_weight("kernel"), self.quantized_weight("recurrent_kernel"),
                self.quantized_weight("bias") if self.use_bias else None, rec_mask, params)
        loop = lambda gated: self._recurrence(*args, _Cell(self.units, self.activation, self.recurrent_activation,
                                                     tuple(sorted(kinds.items())), gated, record))
        # Quantizers pass values through until calibrated, which costs a select per quantizer and time
        # step; once every quantizer in the loop is calibrated (training, evaluation) a loop without
        # the selects runs instead, with the same results.
        if params:
            calibrated = tf.reduce_all([tf.reduce_all(on) for on, _, _ in params.values()])
            out = tf.cond(calibrated, lambda: loop(False), lambda: loop(True))
        else:
            out = loop(False)
        if record:
            recorded.update(dict(zip(STATES + GATES, out[1:])))
        return out[0], recorded

    def call(self, inputs, training=None):
        hs, _ = self._run(inputs, training)
        return tf.transpose(hs, [1, 0, 2]) if self.return_sequences else hs[-1]

    def calibration_values(self, inputs) -> dict:
        """The values each activation quantizer sees for `inputs` (quantizers bypassed or not, as set)."""
        return self._run(inputs, record=True)[1]

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
            unit_forget_bias=self.unit_forget_bias, learned=self.learned,
            **{f"{'recurrent' if k == 'recurrent_kernel' else k}_quant": (None if s is None else s.to_config())
               for k, s in self.specs.items()})
        return config

    @classmethod
    def from_float(cls, lstm, specs: dict, learned: bool = False) -> "QLSTM":
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
                   recurrent_dropout=cell.recurrent_dropout, learned=learned, name=lstm.name,
                   kernel_quant=specs.get("kernel"), recurrent_quant=specs.get("recurrent_kernel"),
                   bias_quant=specs.get("bias"), input_quant=specs.get("input"),
                   gate_quant=specs.get("gate"), state_quant=specs.get("state"))


@dataclass(frozen=True)
class _Cell:
    """The static part of a QLSTM time loop (it keys the loop's trace): sizes, activations, the kind of
    each quantizer inside the loop, whether uncalibrated quantizers pass through (`gated`) and whether
    the pre-quantization values are returned (`record`, for calibration)."""

    units: int
    activation: Callable
    recurrent_activation: Callable
    kinds: tuple        # ((name, ActivationQuantizer.kind), ...) for "gate", "state_c", "state_h"
    gated: bool
    record: bool


def _recurrence(x, kernel, rec_kernel, bias, rec_mask, params, cell: _Cell):
    """The LSTM time loop over time-major x [T, B, F]: (h sequence, and with cell.record the c and h
    before quantization and the four gates before quantization), each [T, B, U].

    Written as Keras' own CPU LSTM (`standard_lstm`): the input projection inside the loop and the
    loop in a function of its own, which trains faster on CPU than projecting all time steps at
    once outside the loop (BENCHMARKS.md section 3)."""
    kinds = dict(cell.kinds)
    act, rec_act = cell.activation, cell.recurrent_activation
    u = cell.units
    # Quantized fixed-range gates with the standard activations: all four gates from one sigmoid, as
    # tanh(z) = 2 sigmoid(2z) - 1 (the c-gate columns of the weights doubled, exactly, before the loop),
    # and that affine map folded into the gates' fake-quant: 3 ops per step instead of 7.
    one_sigmoid = ("gate" in kinds and not cell.gated and not cell.record and not kinds["gate"][1]
                   and act is keras.activations.tanh and rec_act is keras.activations.sigmoid)
    quant = {name: bound_quant(kind, *params[name], gated=cell.gated) for name, kind in kinds.items()
             if not (one_sigmoid and name == "gate")}
    if one_sigmoid:
        ones = tf.ones((u,), x.dtype)
        double = tf.concat([ones, ones, 2 * ones, ones], 0)
        kernel, rec_kernel = kernel * double, rec_kernel * double
        bias = None if bias is None else bias * double
        _, scale, zp = params["gate"]
        quant["gate"] = fused_fake_quant(scale, zp, kinds["gate"][0],
                                         pre=(double, tf.concat([0 * ones, 0 * ones, -ones, 0 * ones], 0)))
    identity = lambda v: v
    cq, hq = quant.get("state_c", identity), quant.get("state_h", identity)
    gq = quant.get("gate")
    steps = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    inputs = tf.TensorArray(x.dtype, size=steps).unstack(x)
    outputs = tuple(tf.TensorArray(x.dtype, size=steps) for _ in range(7 if cell.record else 1))
    zeros = tf.zeros((tf.shape(x)[1], u), x.dtype)

    def step(t, h, c, outputs):
        z = tf.matmul(inputs.read(t), kernel)
        z += tf.matmul(h if rec_mask is None else h * rec_mask, rec_kernel)
        if bias is not None:
            z = tf.nn.bias_add(z, bias)
        if one_sigmoid:
            i, f, g, o = tf.split(gq(tf.sigmoid(z)), 4, axis=1)
        else:
            zi, zf, zc, zo = tf.split(z, 4, axis=1)
            gates = (rec_act(zi), rec_act(zf), act(zc), rec_act(zo))
            i, f, g, o = gates if gq is None else tf.split(gq(tf.concat(gates, axis=1)), 4, axis=1)
        c_raw = f * c + i * g
        c_new = cq(c_raw)
        h_raw = o * act(c_new)
        h_new = hq(h_raw)
        values = (h_new, c_raw, h_raw) + gates if cell.record else (h_new,)
        return t + 1, h_new, c_new, tuple(ta.write(t, v) for ta, v in zip(outputs, values))

    *_, outputs = tf.while_loop(lambda t, *_: t < steps, step, (0, zeros, zeros, outputs),
                                parallel_iterations=32, maximum_iterations=steps)
    return tuple(ta.stack() for ta in outputs)

