"""TFLite's full-integer LSTM as a fake-quant Keras model: what `UNIDIRECTIONAL_SEQUENCE_LSTM` with
int8 weights and activations computes (TFLite's 8x8->16 integer LSTM), in float on the same grids,
with straight-through gradients, so that QAT trains the model the interpreter will run and PTQ
calibrates it.

Sources: the quantization spec of the LSTM in TFLite's optimizer
(tensorflow/lite/tools/optimize/operator_property.cc, case LSTM / UNIDIRECTIONAL_SEQUENCE_LSTM) and
the integer kernel (tensorflow/lite/kernels/lstm.cc, PopulateQuantizedLstmParams8x8_16;
tensorflow/lite/kernels/lstm_eval.cc, EvalInteger8x8_16, CalculateLstmGateInteger8x8_16,
UpdateLstmCellInteger, CalculateLstmOutputInteger8x8_16). Per time step, with codes in brackets:

    x         int8 asymmetric per tensor [s_x, z_x]; the model input, Normalization folded into
              the LSTM's input weights
    W_g, R_g  one int8 symmetric matrix per gate g in (i, f, c, o), input-to-gate and recurrent-to-
              gate each with its own scale; `bits` <= 8 uses codes in [-(2^(b-1)-1), 2^(b-1)-1]
    b_g       int32 at s_x * s_W_g
    z_g       sat16(requant(W_g x + b_g) to Q3.12) + sat16(requant(R_g h) to Q3.12), saturated
              (no layer norm: the gate intermediates are fixed at 2^-12)
    i, f, o   sigmoid(z) in Q0.15; g = tanh(z_c) in Q0.15
    c         int16 at 2^E (E = ceil(log2 max|c|) - 15 from the calibrated range, kept in
              [-15, -9]: tanh(c) reads c with 15 + E integer bits, at most 6):
              sat16(round(f c) + round(i g)), each product rounded to 2^E
    h         int8 asymmetric per tensor [s_h, z_h]: round(o tanh(c) / s_h) + z_h, saturated; it is
              the output state, the output and the recurrent input

The Dense after it (TFLite's FULLY_CONNECTED): int8 weights symmetric per output channel, int32
bias at s_h * s_W, int8 logits per tensor [s_y, z_y]; softmax outputs on TFLite's int8 grid 1/256
at inference. The interpreter's fixed-point multipliers and its sigmoid / tanh approximations
differ from these float grids by at most a code or two, so predictions agree on nearly every clip
(measured: `tflite/agreement`), not bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.base import QuantizedLayer
from qat.layers.loop import time_loop
from qat.layers.lstm import float_states
from qat.layers.recurrent import LoopCache
from qat.quant import integer as iq
from qat.quant.quantizers import RANGE, CalibratedActivationQuantizer, GateBlockWeightQuantizer, Strategy
from qat.quant.spec import QuantSpec

MAX_BITS = 8                      # weights are held in int8
GATE_STEP = 2.0 ** -12            # gate pre-activations: int16 Q3.12
UNIT_STEP = 2.0 ** -15            # gate outputs and tanh(c): int16 Q0.15
CELL_EXPONENTS = (-15, -9)        # 2^E of the int16 cell state: tanh(c) has 15 + E in [0, 6] integer bits
SOFTMAX_STEP = 1.0 / 256          # TFLite's int8 softmax output: scale 1/256, zero point -128
INT16 = iq.INT16
# the LSTM's quantizers: one symmetric range per gate matrix, calibrated activation ranges
PER_GATE = Strategy("per_gate", GateBlockWeightQuantizer, CalibratedActivationQuantizer)
TFLITE_TOPOLOGY = ("Input -> [Normalization] -> LSTM (tanh / sigmoid) -> [Flatten] -> Dense (softmax or linear), "
                   "Dropout anywhere")


@dataclass(frozen=True)
class TfliteScheme:
    """The free choices of the TFLite int8 scheme: weight bits (<= 8, held in int8), how weight ranges
    are estimated (minmax is the converter's own rule), and the range estimator of the model input,
    hidden state, cell state and logits (calibrated on training clips)."""

    bits: int = 8
    estimator: str = "minmax"
    act_estimator: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self):
        if not 2 <= int(self.bits) <= MAX_BITS:
            raise ConfigError(f"bits={self.bits} is not allowed for the TFLite int8 scheme: expected 2..{MAX_BITS} "
                              "(weights are held in int8)")

    def weight_spec(self, per_channel: bool) -> QuantSpec:
        return QuantSpec(self.bits, "symmetric", "per_channel" if per_channel else "per_tensor", -1, self.estimator,
                         self.percentile, narrow_range=True)

    def activation_spec(self, bits: int = 8, scheme: str = "asymmetric") -> QuantSpec:
        return QuantSpec(bits, scheme, "per_tensor", -1, self.act_estimator, self.percentile)


def round_half_away(x):
    """Rounding half away from zero, as TFLite's kernels round."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def on_grid(x, step: float, lo: int, hi: int):
    """x rounded to multiples of `step` with codes saturated to [lo, hi]; the gradient passes where
    the code is inside [lo, hi] (straight through) and is zero where it saturates."""
    @tf.custom_gradient
    def _grid(x):
        v = x / step
        y = step * tf.clip_by_value(round_half_away(v), float(lo), float(hi))

        def grad(dy):
            return tf.where((v >= lo) & (v <= hi), dy, tf.zeros_like(dy))

        return y, grad

    return _grid(x)


def gate_sum(a, b):
    """The saturating int16 add of two Q3.12 gate parts."""
    return tf.clip_by_value(a + b, INT16[0] * GATE_STEP, INT16[1] * GATE_STEP)


def cell_step(c_lo, c_hi):
    """2^E of the int16 cell state from its calibrated range (a float32 scalar tensor)."""
    c_max = tf.maximum(-tf.minimum(c_lo, 0.0), tf.maximum(c_hi, 0.0))
    e = tf.clip_by_value(iq.cell_exponent_tf(tf.reshape(c_max, []), 16), *CELL_EXPONENTS)
    return iq.power_of_two_tf(e)


def bias_on_grid(bias, acc_scale):
    """The bias as int32 at the accumulator's scale (straight through)."""
    return bias + tf.stop_gradient(acc_scale * round_half_away(bias / acc_scale) - bias)


@keras.saving.register_keras_serializable(package="qat")
class TfliteLSTM(QuantizedLayer, keras.layers.Layer):
    """An LSTM computing what TFLite's int8 LSTM computes (module doc); Keras' weight layout (kernel
    [F, 4U], recurrent_kernel [U, 4U], bias [4U], gates i, f, c, o). Quantization points: `kernel`,
    `recurrent_kernel` (per gate), `input`, `state_h` (int8), `state_c` (its range gives the cell
    state's power-of-two scale)."""

    weight_names = ("kernel", "recurrent_kernel")

    def __init__(self, units: int, return_sequences: bool = False, bits: int = 8, estimator: str = "minmax",
                 act_estimator: str = "minmax", percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.units, self.return_sequences = int(units), bool(return_sequences)
        self.scheme = TfliteScheme(bits, estimator, act_estimator, percentile)
        self.use_bias = True
        self._set_quantization({"kernel": self.scheme.weight_spec(False),
                                "recurrent_kernel": self.scheme.weight_spec(False),
                                "input": self.scheme.activation_spec(), "state_h": self.scheme.activation_spec(),
                                "state_c": self.scheme.activation_spec(16, "symmetric")}, PER_GATE)
        # Traced loops, one per static configuration (qat.layers.recurrent.LoopCache), past Keras' tracking.
        object.__setattr__(self, "_loops", LoopCache(_recurrence))
        object.__setattr__(self, "_float_loops", LoopCache(float_states))

    def build(self, input_shape):
        features, u = int(input_shape[-1]), self.units
        self.kernel = self.add_weight("kernel", shape=(features, 4 * u), initializer="glorot_uniform")
        self.recurrent_kernel = self.add_weight("recurrent_kernel", shape=(u, 4 * u), initializer="orthogonal")
        self.bias = self.add_weight("bias", shape=(4 * u,), initializer="zeros")
        self._build_quantizers([(("input",), "input", features), (("state_h",), "state_h", u),
                                (("state_c",), "state_c", u)])
        super().build(input_shape)

    def _weights(self):
        """(kernel, recurrent kernel, bias) as the file holds them."""
        _, s_x, _ = self.activation_quantizers["input"].params()
        kernel = self.quantized_weight("kernel")
        k_scale, _ = self.weight_quantizers["kernel"].scale_zero_point(self.kernel)
        bias = bias_on_grid(self.bias, tf.reshape(s_x * k_scale, [-1]))
        return kernel, self.quantized_weight("recurrent_kernel"), bias

    def _hidden_states(self, inputs):
        x = self.activation_quantizers["input"](tf.convert_to_tensor(inputs, tf.float32))
        kernel, rec_kernel, bias = self._weights()
        zx = on_grid(tf.tensordot(tf.transpose(x, [1, 0, 2]), kernel, axes=1) + bias, GATE_STEP, *INT16)
        qh, qc = self.activation_quantizers["state_h"], self.activation_quantizers["state_c"]
        on, s_h, z_h = qh.params()
        (hs,) = self._loops(_LoopKind(self.units, qh.kind))(zx, rec_kernel, on, s_h, z_h, cell_step(qc.lo, qc.hi))
        return hs

    def call(self, inputs):
        hs = self._hidden_states(inputs)
        return tf.transpose(hs, [1, 0, 2]) if self.return_sequences else hs[-1]

    def calibration_values(self, inputs) -> dict:
        """The input, h and c the quantizers see, from the float recurrence on the quantized weights."""
        inputs = tf.convert_to_tensor(inputs, tf.float32)
        kernel, rec_kernel = self.quantized_weight("kernel"), self.quantized_weight("recurrent_kernel")
        cs, hs = self._float_loops(self.units)(tf.transpose(inputs, [1, 0, 2]), kernel, rec_kernel, self.bias)
        return {"input": inputs, "state_h": hs, "state_c": cs}

    def cell_exponent(self) -> int:
        """E of the cell state's scale 2^E."""
        qc = self.activation_quantizers["state_c"]
        return int(np.round(np.log2(float(cell_step(qc.lo, qc.hi).numpy()))))

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return input_shape[:2 if self.return_sequences else 1].concatenate([self.units])

    def get_config(self):
        s = self.scheme
        return {**super().get_config(), "units": self.units, "return_sequences": self.return_sequences,
                "bits": s.bits, "estimator": s.estimator, "act_estimator": s.act_estimator, "percentile": s.percentile}


@dataclass(frozen=True)
class _LoopKind:
    """The static part of the traced loop."""

    units: int
    h_kind: object


def _recurrence(zx, rec_kernel, on, s_h, z_h, c_step, kind: _LoopKind):
    """The TFLite LSTM over the input projections zx [T, B, 4U] (Q3.12 values): h at every step."""
    quant_h = kind.h_kind.bind(on, s_h, z_h, gated=True)
    c_lim = (INT16[0] * c_step, INT16[1] * c_step)

    def step(zx_t, states):
        h, c = states
        z = gate_sum(zx_t, on_grid(tf.matmul(h, rec_kernel), GATE_STEP, *INT16))
        zi, zf, zc, zo = tf.split(z, 4, axis=1)
        i, f, o = (on_grid(tf.sigmoid(v), UNIT_STEP, 0, INT16[1]) for v in (zi, zf, zo))
        g = on_grid(tf.tanh(zc), UNIT_STEP, *INT16)
        c_new = tf.clip_by_value(on_grid(f * c, c_step, *INT16) + on_grid(i * g, c_step, *INT16), *c_lim)
        h_new = quant_h(o * on_grid(tf.tanh(c_new), UNIT_STEP, *INT16))
        return (h_new, c_new), (h_new,)

    zeros = tf.zeros((tf.shape(zx)[1], kind.units), zx.dtype)
    return time_loop(zx, (zeros, zeros), step, 1)


@keras.saving.register_keras_serializable(package="qat")
class TfliteDense(QuantizedLayer, keras.layers.Layer):
    """TFLite's int8 FULLY_CONNECTED (+ SOFTMAX): weights symmetric per output channel, int32 bias at
    the input's scale times each channel's, int8 logits per tensor (quantization point `output`);
    with softmax, probabilities on the int8 grid 1/256 at inference. Its input is already on the
    int8 grid of the quantizer `reads` (the hidden state of the TfliteLSTM below), set by
    `tflite_twin`."""

    weight_names = ("kernel",)

    def __init__(self, units: int, activation="softmax", bits: int = 8, estimator: str = "minmax",
                 act_estimator: str = "minmax", percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.scheme = TfliteScheme(bits, estimator, act_estimator, percentile)
        self.use_bias = True
        self._set_quantization({"kernel": self.scheme.weight_spec(True), "output": self.scheme.activation_spec()}, RANGE)
        object.__setattr__(self, "reads", None)

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", shape=(int(input_shape[-1]), self.units), initializer="glorot_uniform")
        self.bias = self.add_weight("bias", shape=(self.units,), initializer="zeros")
        self._build_quantizers([(("output",), "output", self.units)])
        super().build(input_shape)

    def input_scale(self):
        if self.reads is None:
            raise ConfigError(f"layer '{self.name}' does not know the grid of its input: build it with tflite_twin")
        return self.reads.params()[1]

    def _logits(self, inputs):
        scale, _ = self.weight_quantizers["kernel"].scale_zero_point(self.kernel)
        bias = bias_on_grid(self.bias, tf.reshape(self.input_scale() * scale, [-1]))
        return tf.matmul(tf.convert_to_tensor(inputs, tf.float32), self.quantized_weight("kernel")) + bias

    def call(self, inputs, training=None):
        y = self.activation(self.activation_quantizers["output"](self._logits(inputs)))
        if self.activation is keras.activations.softmax and not training:
            y = on_grid(y, SOFTMAX_STEP, 0, 255)
        return y

    def calibration_values(self, inputs) -> dict:
        return {"output": self._logits(inputs)}

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self):
        s = self.scheme
        return {**super().get_config(), "units": self.units, "activation": keras.activations.serialize(self.activation),
                "bits": s.bits, "estimator": s.estimator, "act_estimator": s.act_estimator, "percentile": s.percentile}


class _TfliteLogits(keras.layers.Layer):
    """A TfliteDense's int8 logits (before its softmax and the 1/256 probability grid)."""

    def __init__(self, dense: "TfliteDense", **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "dense", dense)

    def call(self, inputs):
        return self.dense.activation_quantizers["output"](self.dense._logits(inputs))


def logits_model(twin) -> keras.Model:
    """The twin up to its int8 logits, sharing its layers: the margins its decisions come from (its
    probabilities on the 1/256 grid are 0 for every clearly wrong class, which carries no margin)."""
    _, dense = twin_layers(twin)
    return keras.Model(twin.input, _TfliteLogits(dense, name=f"{dense.name}_logits")(dense.input),
                       name=f"{twin.name}_logits")


def twin_layers(twin):
    """(the TfliteLSTM, the TfliteDense) of a `tflite_twin` model."""
    lstm = [layer for layer in twin.layers if isinstance(layer, TfliteLSTM)]
    dense = [layer for layer in twin.layers if isinstance(layer, TfliteDense)]
    if len(lstm) != 1 or len(dense) != 1:
        raise ConfigError(f"model '{twin.name}' is not a TFLite int8 twin: expected {TFLITE_TOPOLOGY}")
    return lstm[0], dense[0]


def _tflite_parts(model):
    """(Normalization or None, LSTM, Flatten or None, Dense) of a float model, or a one-line
    ConfigError naming the first layer outside TFLITE_TOPOLOGY."""
    layers = [layer for layer in model.layers if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout))]
    expected = [(keras.layers.Normalization, True), (keras.layers.LSTM, False), (keras.layers.Flatten, True),
                (keras.layers.Dense, False)]
    parts, k = [], 0
    for kind, optional in expected:
        if k < len(layers) and type(layers[k]) is kind:
            parts.append(layers[k])
            k += 1
        elif optional:
            parts.append(None)
        else:
            found = layers[k] if k < len(layers) else None
            what = "nothing" if found is None else f"layer '{found.name}' ({type(found).__name__})"
            raise ConfigError(f"model '{model.name}' cannot run as TFLite's int8 LSTM: {what} where a {kind.__name__} "
                              f"was expected ({TFLITE_TOPOLOGY})")
    if k < len(layers):
        raise ConfigError(f"model '{model.name}' cannot run as TFLite's int8 LSTM: layer '{layers[k].name}' "
                          f"({type(layers[k]).__name__}) after the Dense ({TFLITE_TOPOLOGY})")
    norm, lstm, flatten, dense = parts
    cell = lstm.cell
    if (keras.activations.serialize(cell.activation) != "tanh"
            or keras.activations.serialize(cell.recurrent_activation) != "sigmoid"):
        raise ConfigError(f"layer '{lstm.name}' cannot run as TFLite's int8 LSTM: expected tanh / sigmoid activations")
    if lstm.go_backwards or lstm.stateful or not cell.use_bias:
        raise ConfigError(f"layer '{lstm.name}' cannot run as TFLite's int8 LSTM: expected a forward, stateless "
                          "LSTM with a bias")
    if keras.activations.serialize(dense.activation) not in ("softmax", "linear") or not dense.use_bias:
        raise ConfigError(f"layer '{dense.name}' cannot run as TFLite's int8 LSTM model: expected a Dense with a "
                          "bias and a softmax or linear activation")
    if flatten is None and lstm.return_sequences:
        raise ConfigError(f"layer '{lstm.name}' returns its sequence with no Flatten after it: expected "
                          f"{TFLITE_TOPOLOGY}")
    return norm, lstm, flatten, dense


def check_tflite_model(model) -> None:
    """A one-line ConfigError for a float model the TFLite int8 scheme cannot run."""
    _tflite_parts(model)


def folded_weights(model):
    """The float weights of the TFLite model, Normalization folded into the LSTM's input weights:
    (kernel, recurrent_kernel, bias, dense kernel, dense bias) as numpy float32. With
    x_n = (x - m) / d: W' = W / d (per input row) and b' = b - (m / d) W."""
    norm, lstm, _, dense = _tflite_parts(model)
    kernel, rec, bias = (np.asarray(w, np.float32) for w in lstm.get_weights())
    if norm is not None:
        mean = np.asarray(norm.mean, np.float32).reshape(-1)
        d = np.maximum(np.sqrt(np.asarray(norm.variance, np.float32).reshape(-1)), keras.backend.epsilon())
        bias = (bias - (mean / d) @ kernel).astype(np.float32)
        kernel = (kernel / d[:, None]).astype(np.float32)
    dk, db = (np.asarray(w, np.float32) for w in dense.get_weights())
    return kernel, rec, bias, dk, db


def folded_float_model(model):
    """The float model as TFLite will hold it: Normalization folded into the LSTM, same layer names
    (what the twin's weights are compared with)."""
    _, lstm, flatten, dense = _tflite_parts(model)
    inp = keras.Input(shape=model.input_shape[1:])
    x = keras.layers.LSTM(lstm.units, return_sequences=lstm.return_sequences, name=lstm.name)(inp)
    if flatten is not None:
        x = keras.layers.Flatten(name=flatten.name)(x)
    out = keras.layers.Dense(dense.units, activation=dense.activation, name=dense.name)(x)
    folded = keras.Model(inp, out, name=model.name)
    kernel, rec, bias, dk, db = folded_weights(model)
    folded.get_layer(lstm.name).set_weights([kernel, rec, bias])
    folded.get_layer(dense.name).set_weights([dk, db])
    return folded


def tflite_twin(model, scheme: TfliteScheme):
    """The fake-quant TFLite int8 model of a float model (TFLITE_TOPOLOGY): Normalization folded into
    the LSTM, weights copied, weight ranges fitted with the scheme's estimator; activation ranges
    still to calibrate (qat.algorithms.calibration.calibrate_in_order)."""
    _, lstm, flatten, dense = _tflite_parts(model)
    options = dict(bits=scheme.bits, estimator=scheme.estimator, act_estimator=scheme.act_estimator,
                   percentile=scheme.percentile)
    inp = keras.Input(shape=model.input_shape[1:], name="features")
    q_lstm = TfliteLSTM(lstm.units, return_sequences=lstm.return_sequences, name=lstm.name, **options)
    x = q_lstm(inp)
    if flatten is not None:
        x = keras.layers.Flatten(name=flatten.name)(x)
    q_dense = TfliteDense(dense.units, activation=dense.activation, name=dense.name, **options)
    object.__setattr__(q_dense, "reads", q_lstm.activation_quantizers["state_h"])
    twin = keras.Model(inp, q_dense(x), name=model.name)
    kernel, rec, bias, dk, db = folded_weights(model)
    for var, value in ((q_lstm.kernel, kernel), (q_lstm.recurrent_kernel, rec), (q_lstm.bias, bias),
                       (q_dense.kernel, dk), (q_dense.bias, db)):
        var.assign(value)
    for layer in (q_lstm, q_dense):
        for name, q in layer.weight_quantizers.items():
            q.init_from(getattr(layer, name).numpy())
    return twin
