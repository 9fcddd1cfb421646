"""The layer base shared by the quantized recurrent layers (QLSTM, QGRU): quantization points,
the forward pass around the time loop (qat.layers.loop) in float fake-quant or integer mode
(qat.layers.integer), calibration values, streaming steps and taking over a float Keras layer.

Each loop is traced once per layer and static configuration (`LoopCache`): a function shared by
every layer of a process would keep every model's traces alive, and one function traced for many
configurations retraces on every switch.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Tuple

import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.base import QuantizedLayer
from qat.layers.integer import input_grid, input_projection, weight_codes
from qat.layers.loop import time_loop
from qat.quant.quantizers import concat_params
from qat.quant.spec import QuantSpec

HIDDEN = "state_h"     # the hidden state's quantization point (every recurrent layer has one)


class LoopCache:
    """One traced function per static configuration of a layer's loop (`key` is passed to `fn`)."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._traced: Dict[Hashable, Callable] = {}

    def __call__(self, key: Hashable) -> Callable:
        traced = self._traced.get(key)
        if traced is None:
            fn = self._fn
            traced = tf.function(lambda *args: fn(*args, key), autograph=False, reduce_retracing=True)
            self._traced[key] = traced
        return traced


class QuantizedRNN(QuantizedLayer, keras.layers.Layer):
    """What the quantized recurrent layers (QLSTM, QGRU) share: the Keras-like constructor and config,
    the quantization points (weights `weight_names`; `input`; the gate activations `gate_names`, one
    spec "gate"; the states `state_names`, spec "state", with h at spec "hidden" where that is given),
    the forward pass around the traced time
    loop, calibration values and taking over a float Keras layer.

    A subclass sets the names and `n_states`, builds its weights and quantizers (`build`), and gives
    one time step (`_step_fn(kernel, recurrent_kernel, bias, rec_mask, params, cell)` -> a function
    (x_t, states) -> (new states, (h_t,)), states[0] being h) and the unquantized loop for calibration
    (`_intermediates(x, kernel, recurrent_kernel, bias, cell)`, every state and gate over time-major
    x, in `state_names + gate_names` order). `step` runs one frame with carried states: streaming."""

    gate_names: Tuple[str, ...] = ()
    state_names: Tuple[str, ...] = ()
    n_states: int = 1                        # carried state tensors, h first
    supports_fused: bool = False             # `_fused_hidden_states` runs Keras' own kernel
    float_type: type = keras.layers.RNN      # the Keras layer this one replaces

    def __init__(self, units: int, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 return_sequences: bool = False, go_backwards: bool = False, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", kernel_quant: Optional[QuantSpec] = None,
                 recurrent_kernel_quant: Optional[QuantSpec] = None, bias_quant: Optional[QuantSpec] = None,
                 input_quant: Optional[QuantSpec] = None, gate_quant: Optional[QuantSpec] = None,
                 state_quant: Optional[QuantSpec] = None, hidden_quant: Optional[QuantSpec] = None,
                 quantizer="range", integer=None,
                 fused: Optional[bool] = None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias, self.return_sequences = bool(use_bias), bool(return_sequences)
        self.fused = None if fused is None else bool(fused)   # Keras' fused kernel for a loop without quantizers
        # go_backwards as Keras: the clip is read last frame first and the sequence returned in that
        # order (what Bidirectional's backward layer needs); no state between calls, no state outputs
        self.go_backwards, self.stateful, self.return_state = bool(go_backwards), False, False
        self.dropout, self.recurrent_dropout = float(dropout), float(recurrent_dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._set_quantization({"kernel": kernel_quant, "recurrent_kernel": recurrent_kernel_quant,
                                "bias": bias_quant, "input": input_quant, "gate": gate_quant,
                                "state": state_quant, "hidden": hidden_quant}, quantizer, integer)
        # Traced loops, set past Keras' attribute tracking: they are code, not state to save.
        object.__setattr__(self, "_loops", LoopCache(type(self)._recurrence))
        object.__setattr__(self, "_traced_intermediates", tf.function(type(self)._intermediates, autograph=False,
                                                                      reduce_retracing=True))
        self.input_spec = keras.layers.InputSpec(ndim=3)

    # ------------------------------------------------------------------ for subclasses

    @staticmethod
    def _step_fn(kernel, rec_kernel, bias, rec_mask, params, cell) -> Callable:
        raise NotImplementedError

    @classmethod
    def _recurrence(cls, *args):
        """The layer over time-major x [T, B, F]: the h sequence [T, B, U] (a 1-tuple); the integer
        loop for an integer cell."""
        if getattr(args[-1], "integer", False):
            return cls._integer_recurrence(*args)
        return cls._float_recurrence(*args)

    @classmethod
    def _float_recurrence(cls, x, kernel, rec_kernel, bias, rec_mask, params, cell):
        step = cls._step_fn(kernel, rec_kernel, bias, rec_mask, params, cell)
        zeros = tf.zeros((tf.shape(x)[1], cell.units), x.dtype)
        return time_loop(x, (zeros,) * cls.n_states, step, 1)

    @staticmethod
    def _intermediates(x, kernel, rec_kernel, bias, cell):
        raise NotImplementedError

    # ------------------------------------------------------------------ integer mode (qat.layers.integer)

    integer_states: Tuple[str, ...] = ()      # states whose calibrated range integer mode uses

    def _integer_cell(self, features: int):
        """The static part of the integer loop (hashable: it keys the loop's trace)."""
        raise NotImplementedError

    def _integer_inputs(self, bias) -> tuple:
        """(the bias row of the input projection, the integer loop's extra tensor arguments)."""
        return bias, ()

    @staticmethod
    def _integer_recurrence(*args):
        """The integer loop: (x_hat, zx, kernel, recurrent kernel, bias, recurrent codes, their scale,
        *extra, cell) -> (hidden states [T, B, U],)."""
        raise NotImplementedError

    def _integer_hidden_states(self, x_hat):
        """The time-major hidden states in integer mode, from inputs on the input grid: the input
        projection of every step at once, then the integer loop."""
        kernel, rec_kernel, bias = self._weights()
        X, s_x = input_grid(self, x_hat)
        k_codes, k_scale = weight_codes(self, "kernel", kernel)
        r_codes, r_scale = weight_codes(self, "recurrent_kernel", rec_kernel)
        in_bias, extra = self._integer_inputs(bias)
        zx = input_projection(X, s_x, k_codes, k_scale, in_bias)
        (hs,) = self._loops(self._integer_cell(int(x_hat.shape[-1])))(x_hat, zx, kernel, rec_kernel, bias, r_codes,
                                                                       r_scale, *extra)
        return hs

    def _cell(self, kinds: tuple, gated: bool):
        """The static part of the loop (hashable: it keys the loop's trace)."""
        raise NotImplementedError

    def _build_activation_quantizers(self, features: int) -> None:
        if self.integer is None:
            # h takes the "hidden" spec where one is given, else "state" like the other states
            hidden = "hidden" if self.specs.get("hidden") is not None else "state"
            cells = tuple(n for n in self.state_names if n != HIDDEN)
            self._build_quantizers([(("input",), "input", features), (self.gate_names, "gate", self.units),
                                    (cells, "state", self.units), ((HIDDEN,), hidden, self.units)])
        else:   # the input (first layer) and `integer_states`' ranges; gates and h sit on fixed grids
            self._build_quantizers([(("input",), "input", features), (self.integer_states, "state", self.units)])

    # ------------------------------------------------------------------ forward pass

    def _weights(self):
        return (self.quantized_weight("kernel"), self.quantized_weight("recurrent_kernel"),
                self.quantized_weight("bias") if self.use_bias else None)

    def call(self, inputs, training=None):
        hs = self._hidden_states(inputs, bool(training))
        return tf.transpose(hs, [1, 0, 2]) if self.return_sequences else hs[-1]

    def sequence(self, inputs):
        """h at every step [B, T, U] at inference, in the order the layer reads the frames, whatever
        `return_sequences` says."""
        return tf.transpose(self._hidden_states(inputs, False), [1, 0, 2])

    def _hidden_states(self, inputs, training: bool):
        """The time-major hidden states [T, B, U] of a forward pass."""
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        q_in = self.activation_quantizers.get("input")
        x = inputs if q_in is None else q_in(inputs)
        if training and self.dropout > 0:
            # As Keras' fused recurrent kernels: a fresh mask for every time step, not one per sequence.
            x = tf.nn.dropout(x, rate=self.dropout)
        x = self._time_major(x)
        if self.integer is not None:
            return self._integer_hidden_states(x)
        rec_mask = None
        if training and self.recurrent_dropout > 0:
            rec_mask = tf.nn.dropout(tf.ones((tf.shape(x)[1], self.units), x.dtype), rate=self.recurrent_dropout)
        kinds, params = self._loop_quantizers()
        if not params and rec_mask is None and self._fused_kernel_runs():
            return self._fused_hidden_states(x, *self._weights())
        args = (x, *self._weights(), rec_mask, params)
        loop = lambda gated: self._loops(self._cell(kinds, gated))(*args)
        # Quantizers pass values through until calibrated, which costs a select per quantizer and time
        # step; once every quantizer in the loop is calibrated (training, evaluation) a loop without
        # the selects runs instead, with the same results.
        if params:
            calibrated = tf.reduce_all([tf.reduce_all(on) for on, _, _ in params.values()])
            (hs,) = tf.cond(calibrated, lambda: loop(False), lambda: loop(True))
        else:
            (hs,) = loop(False)
        return hs

    def _fused_kernel_runs(self) -> bool:
        """Whether a loop without quantizers runs through Keras' own fused kernel (`fused`: True,
        False, or None = where a GPU is visible, since on a CPU this project's loop is the faster)."""
        if not self.supports_fused or self.activation is not keras.activations.tanh or \
                self.recurrent_activation is not keras.activations.sigmoid:
            return False
        return bool(tf.config.list_logical_devices("GPU")) if self.fused is None else self.fused

    def _fused_hidden_states(self, x, kernel, rec_kernel, bias):
        """The time-major hidden states [T, B, U] from Keras' fused kernel (subclasses with
        `supports_fused`)."""
        raise NotImplementedError

    def _time_major(self, x):
        """[B, T, F] -> [T, B, F], in the order the layer reads the frames."""
        x = tf.transpose(x, [1, 0, 2])
        return tf.reverse(x, [0]) if self.go_backwards else x

    def _loop_quantizers(self):
        """The quantizers inside the time loop: their kinds (sorted pairs; they key the traced loop)
        and their (on, scale, zero point) parameters, the loop's inputs."""
        kinds, params = {}, {}
        gates = [self.activation_quantizers.get(g) for g in self.gate_names]
        if gates and gates[0] is not None:
            kinds["gate"], params["gate"] = gates[0].kind, concat_params(gates, self.units)
        for name in self.state_names:
            q = self.activation_quantizers.get(name)
            if q is not None:
                kinds[name], params[name] = q.kind, q.params()
        return tuple(sorted(kinds.items())), params

    def calibrated(self) -> bool:
        """Whether every quantizer inside the time loop has a range (evaluated eagerly)."""
        return all(bool(tf.reduce_all(on)) for on, _, _ in self._loop_quantizers()[1].values())

    def initial_states(self, batch: int) -> tuple:
        zeros = tf.zeros((batch, self.units), self.compute_dtype)
        return (zeros,) * self.n_states

    def step(self, x_t, states: tuple, gated: bool = True):
        """One frame [B, F] through the layer at inference, from carried `states` (initial_states
        first): (h_t, new states). Over a clip it computes what `call` computes; `gated=False` (all
        loop quantizers calibrated, see `calibrated`) is the loop `call` runs then."""
        if self.integer is not None:
            raise ConfigError(f"layer '{self.name}' runs in integer mode, which streams in the integer reference "
                              "(qat.export.integer) and the C kernel, not frame by frame in TensorFlow")
        x_t = tf.convert_to_tensor(x_t, self.compute_dtype)
        q_in = self.activation_quantizers.get("input")
        x_t = x_t if q_in is None else q_in(x_t)
        kinds, params = self._loop_quantizers()
        step = self._step_fn(*self._weights(), None, params, self._cell(kinds, gated))
        new_states, (h,) = step(x_t, tuple(states))
        return h, tuple(new_states)

    def calibration_values(self, inputs) -> dict:
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        out = self._traced_intermediates(self._time_major(inputs), *self._weights(), self._cell((), False))
        return {"input": inputs, **dict(zip(self.state_names + self.gate_names, out))}

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
            use_bias=self.use_bias, return_sequences=self.return_sequences, go_backwards=self.go_backwards,
            fused=self.fused,
            dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer), **self.quantization_config())
        return config

    @classmethod
    def _float_options(cls, layer) -> dict:
        """Constructor options of the float layer beyond the shared ones (e.g. GRU's reset_after)."""
        return {}

    @classmethod
    def from_float(cls, layer, specs: dict, quantizer="range"):
        """An unbuilt quantized layer configured like the float Keras layer `layer` (same name).
        `specs` maps kernel/recurrent_kernel/bias/input/gate/state/hidden to a QuantSpec or None."""
        unsupported = {"stateful": layer.stateful, "return_state": layer.return_state,
                       "time_major": layer.time_major}
        cell = layer.cell
        unsupported.update({f"{n}": getattr(cell, n) is not None for n in (
            "kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "kernel_constraint",
            "recurrent_constraint", "bias_constraint")})
        unsupported["activity_regularizer"] = layer.activity_regularizer is not None
        bad = [k for k, v in unsupported.items() if v]
        kind = cls.float_type.__name__
        if bad:
            raise ConfigError(f"{kind} layer '{layer.name}' uses {', '.join(bad)}, which quantization does not "
                              f"support: expected a plain {kind} (return_sequences, go_backwards and dropout are fine)")
        return cls(layer.units, activation=cell.activation, recurrent_activation=cell.recurrent_activation,
                   use_bias=cell.use_bias, return_sequences=layer.return_sequences,
                   go_backwards=layer.go_backwards, dropout=cell.dropout,
                   recurrent_dropout=cell.recurrent_dropout, quantizer=quantizer, name=layer.name,
                   **cls._float_options(layer), integer=specs.get("integer"),
                   **{f"{key}_quant": specs.get(key) for key in ("kernel", "recurrent_kernel", "bias", "input",
                                                                 "gate", "state", "hidden")})
