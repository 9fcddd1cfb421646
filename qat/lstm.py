"""A fake-quantized LSTM layer: `tf_keras.layers.LSTM` math with quantizers on its weights,
input, gates and state.

With no quantizer configured it computes exactly what the Keras LSTM computes (same weight layout:
kernel (F, 4U), recurrent_kernel (U, 4U), bias (4U,), gates in the order i, f, c, o). Quantization
points, each optional with its own QuantSpec:

    kernel, recurrent_kernel, bias   weights (qat.quantizers.WeightQuantizer)
    input                            the layer input x_t
    gate_i, gate_f, gate_c, gate_o   the four gate activations (after sigmoid / tanh)
    state_c, state_h                 the cell state c_t and the hidden state h_t (also the output)

Speed: the weights are fake-quantized once per call, outside the time loop, and the input projection
x @ W + b is one matmul for all time steps; only h @ U and the gate math run per step.
Not supported: stateful, go_backwards, return_state, time_major, regularizers and constraints
(ConfigError in `from_float`), and masking (Keras refuses a mask sent to this layer).
"""
from __future__ import annotations

from qat import ConfigError

from typing import Optional

import tensorflow as tf
import tf_keras as keras

from qat.quantizers import ActivationQuantizer, QuantSpec, WeightQuantizer, bind_concat

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

    def _quant(self, name, gated: bool = True):
        q = self.activation_quantizers.get(name)
        return (lambda x: x) if q is None else q.bind(gated)

    def _gates_quant(self, gated: bool = True):
        """One fake-quant for the four concatenated gates (each with its own range), or None."""
        qs = [self.activation_quantizers.get(g) for g in GATES]
        return None if qs[0] is None else bind_concat(qs, self.units, gated)

    def _run(self, inputs, training=None, record=False):
        """Returns (h sequence time-major, dict of recorded pre-quantization values if record)."""
        training = bool(training) and not record
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        recorded = {"input": inputs} if record else {}
        x = self._quant("input")(inputs)
        if training and self.dropout > 0:
            # As Keras' LSTM (its fused path): a fresh mask for every time step, not one per sequence.
            x = tf.nn.dropout(x, rate=self.dropout)
        kernel, rec_kernel = self.quantized_weight("kernel"), self.quantized_weight("recurrent_kernel")
        batch = tf.shape(inputs)[0]
        # input projection for all time steps at once, time-major (faster on CPU than an einsum)
        xz = tf.matmul(tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, kernel.shape[0]]), kernel)
        if self.use_bias:
            xz = tf.nn.bias_add(xz, self.quantized_weight("bias"))
        steps = inputs.shape[1] if inputs.shape[1] is not None else tf.shape(inputs)[1]
        xz = tf.reshape(xz, [steps, batch, 4 * self.units])

        zeros = tf.zeros((batch, self.units), xz.dtype)
        rec_mask = None
        if training and self.recurrent_dropout > 0:
            rec_mask = tf.nn.dropout(tf.ones_like(zeros), rate=self.recurrent_dropout)
        act, rec_act = self.activation, self.recurrent_activation
        init = (zeros, zeros) + ((zeros,) * 6 if record else ())

        def scan(gated: bool):
            gq = self._gates_quant(gated)
            cq, hq = self._quant("state_c", gated), self._quant("state_h", gated)

            def step(carry, xz_t):
                h, c = carry[0], carry[1]
                z = xz_t + tf.matmul(h if rec_mask is None else h * rec_mask, rec_kernel)
                zi, zf, zc, zo = tf.split(z, 4, axis=1)
                gates = (rec_act(zi), rec_act(zf), act(zc), rec_act(zo))
                i, f, g, o = gates if gq is None else tf.split(gq(tf.concat(gates, axis=1)), 4, axis=1)
                c_raw = f * c + i * g
                c_new = cq(c_raw)
                h_raw = o * act(c_new)
                return (hq(h_raw), c_new) + ((c_raw, h_raw) + gates if record else ())

            return tf.scan(step, xz, initializer=init)

        # Quantizers pass values through until calibrated, which costs a select per quantizer and time
        # step; once every quantizer in the loop is calibrated (training, evaluation) a loop without
        # the selects runs instead, with the same results.
        in_loop = [q for name, q in self.activation_quantizers.items() if name != "input"]
        if in_loop:
            calibrated = tf.reduce_all(tf.stack([q.calibrated > 0 for q in in_loop]))
            out = tf.cond(calibrated, lambda: scan(False), lambda: scan(True))
        else:
            out = scan(True)
        if record:
            recorded.update(dict(zip(STATES + GATES, out[2:])))
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
