"""Whole-model quantization: turn a float model into its fake-quant twin, calibrate its activation
ranges from data, and export its quantized weights.

`quantize_model` swaps every `LSTM` for `qat.lstm.QLSTM` and every `Dense` for `QDense` (same names,
float weights copied, weight ranges fitted with each spec's estimator) and copies all other layers as
they are. The twin trains with `model.fit` (straight-through gradients) and saves/loads as .keras.

Weight ranges while training (non-learned): the live min/max of each weight, recomputed in-graph at
every step, times clip ratios fitted once from the float weights (1 for minmax) -- cheap, and the
range can never fall behind the weights. With `learned=True` the ranges are LSQ scales/offsets
trained with the weights. Activation ranges come from `calibrate` (and are then fixed, or trained
with LSQ); before calibration the activation quantizers pass data through.
"""
from __future__ import annotations

from qat import ConfigError

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.lstm import QLSTM
from qat.quantizers import ActivationQuantizer, QuantSpec, WeightQuantizer, estimate_range


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized at which bits (None = keep float)."""

    weights: Optional[QuantSpec] = None   # LSTM kernel + recurrent kernel + Dense kernel
    bias: Optional[QuantSpec] = None      # LSTM and Dense biases
    inputs: Optional[QuantSpec] = None    # layer inputs (act_bits); a Dense input is always per tensor:
                                          # per-feature ranges of a flattened LSTM sequence would cost
                                          # two floats per input, more than the weights they serve
    gates: Optional[QuantSpec] = None     # the four LSTM gate activations (act_bits)
    state: Optional[QuantSpec] = None     # LSTM cell state c and hidden state h (state_bits)
    learned: bool = False                 # LSQ: trainable scales (and offsets for asymmetric)
    overrides: Mapping[str, QuantSpec] = field(default_factory=dict)  # e.g. {"lstm/kernel": QuantSpec(3)}

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("learned", "overrides") and v is not None and not isinstance(v, QuantSpec):
                raise ConfigError(f"QuantConfig.{f.name}={v!r} is not allowed: expected a QuantSpec or None")
        if not isinstance(self.learned, bool):
            raise ConfigError(f"QuantConfig.learned={self.learned!r} is not allowed: expected true or false")
        for name, spec in dict(self.overrides).items():
            if not isinstance(spec, QuantSpec):
                raise ConfigError(f"QuantConfig.overrides[{name!r}]={spec!r} is not allowed: expected a QuantSpec")


@keras.saving.register_keras_serializable(package="qat")
class QDense(keras.layers.Dense):
    """Dense with optional fake quantization of its kernel, bias and input (same quantizers as QLSTM)."""

    def __init__(self, units, kernel_quant: Optional[QuantSpec] = None, bias_quant: Optional[QuantSpec] = None,
                 input_quant: Optional[QuantSpec] = None, learned: bool = False, **kwargs):
        super().__init__(units, **kwargs)
        self.specs = {"kernel": QuantSpec.from_config(kernel_quant), "bias": QuantSpec.from_config(bias_quant),
                      "input": QuantSpec.from_config(input_quant)}
        if not self.use_bias and self.specs["bias"] is not None:
            raise ConfigError("bias quantization is not allowed with use_bias=False: the layer has no bias")
        self.learned = bool(learned)

    def build(self, input_shape):
        super().build(input_shape)
        self.weight_quantizers, self.activation_quantizers = {}, {}
        for name in ("kernel", "bias"):
            if self.specs[name] is not None:
                q = WeightQuantizer(self.specs[name], self.learned)
                q.build(self, name, getattr(self, name).shape)
                self.weight_quantizers[name] = q
        if self.specs["input"] is not None:
            q = ActivationQuantizer(self.specs["input"], self.learned)
            q.build(self, "input", int(input_shape[-1]))
            self.activation_quantizers["input"] = q

    def quantized_weight(self, name: str):
        """The weight as the forward pass uses it (fake-quantized if it has a quantizer)."""
        var = getattr(self, name)
        q = self.weight_quantizers.get(name)
        return var if q is None else q(var)

    def call(self, inputs):
        if "input" in self.activation_quantizers:
            inputs = self.activation_quantizers["input"](inputs)
        y = tf.matmul(inputs, self.quantized_weight("kernel"))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.quantized_weight("bias"))
        return self.activation(y) if self.activation is not None else y

    def calibration_values(self, inputs) -> dict:
        return {"input": tf.convert_to_tensor(inputs)}

    def copy_float_weights(self, dense) -> None:
        """Take the weights of a float Dense and fit the weight ranges to them."""
        self.kernel.assign(dense.kernel)
        if self.use_bias:
            self.bias.assign(dense.bias)
        for name, q in self.weight_quantizers.items():
            q.init_from(getattr(self, name).numpy())

    def get_config(self):
        config = super().get_config()
        config.update(learned=self.learned, **{f"{k}_quant": None if s is None else s.to_config()
                                               for k, s in self.specs.items()})
        return config

    @classmethod
    def from_float(cls, dense, specs: dict, learned: bool = False) -> "QDense":
        """An unbuilt QDense configured like the float Dense `dense` (same name and config)."""
        return cls(kernel_quant=specs.get("kernel"), bias_quant=specs.get("bias"), input_quant=specs.get("input"),
                   learned=learned, **dense.get_config())


QUANTIZED_LAYERS = (QLSTM, QDense)


@dataclass(frozen=True)
class QuantizedTensor:
    """One exported weight tensor: integer codes plus what is needed to read them back."""

    codes: np.ndarray        # int32, same shape as the weight
    scale: np.ndarray        # float32, broadcastable to the weight (one per quantization group)
    zero_point: np.ndarray   # float32 holding integers, same shape as scale
    spec: QuantSpec
    values: np.ndarray       # float32 dequantized weight = scale * (codes - zero_point), as the model uses it


def _weight_names(layer) -> list[str]:
    if isinstance(layer, (keras.layers.LSTM, QLSTM)):
        names = ["kernel", "recurrent_kernel"] + (["bias"] if layer.use_bias else [])
    elif type(layer) in (keras.layers.Dense, QDense):
        names = ["kernel"] + (["bias"] if layer.use_bias else [])
    else:
        return []
    return [f"{layer.name}/{n}" for n in names]


def weight_tensor_names(model) -> list[str]:
    """Names of the quantizable weight tensors ("<layer>/<weight>"), in layer order; the keys of
    QuantConfig.overrides and of `quantized_weights`."""
    return [n for layer in model.layers for n in _weight_names(layer)]


def _layer_specs(layer, cfg: QuantConfig) -> dict:
    names = {n.split("/")[-1]: n for n in _weight_names(layer)}
    specs = {w: cfg.overrides.get(full, cfg.bias if w == "bias" else cfg.weights) for w, full in names.items()}
    specs["input"] = cfg.inputs
    if isinstance(layer, keras.layers.LSTM):
        specs.update(gate=cfg.gates, state=cfg.state)
    elif cfg.inputs is not None and cfg.inputs.granularity == "per_channel":
        specs["input"] = replace(cfg.inputs, granularity="per_tensor")
    return specs


def _clone(layer, cfg: QuantConfig):
    if isinstance(layer, keras.layers.LSTM):
        return QLSTM.from_float(layer, _layer_specs(layer, cfg), cfg.learned)
    if type(layer) is keras.layers.Dense:
        return QDense.from_float(layer, _layer_specs(layer, cfg), cfg.learned)
    if isinstance(layer, (keras.layers.RNN, keras.layers.Wrapper)):
        raise ConfigError(f"layer '{layer.name}' ({type(layer).__name__}) is not supported by quantize_model: "
                          "expected plain LSTM and Dense layers (other layers are copied as float)")
    return layer.__class__.from_config(layer.get_config())


def quantize_model(float_model, cfg: QuantConfig):
    """The fake-quant twin of `float_model`: LSTM -> QLSTM, Dense -> QDense with the quantizers `cfg`
    asks for, float weights copied, weight ranges initialised from the float weights with each
    spec's estimator; other layers (Normalization, Flatten, Dropout, ...) copied as they are."""
    if not isinstance(cfg, QuantConfig):
        raise ConfigError(f"cfg={cfg!r} is not allowed: expected a qat.quantize.QuantConfig")
    valid = weight_tensor_names(float_model)
    unknown = sorted(set(cfg.overrides) - set(valid))
    if unknown:
        raise ConfigError(f"override name(s) {unknown} are not allowed: expected names among {valid}")
    qmodel = keras.models.clone_model(float_model, clone_function=lambda layer: _clone(layer, cfg))
    for layer in float_model.layers:
        twin = qmodel.get_layer(layer.name)
        if isinstance(twin, QUANTIZED_LAYERS):
            twin.copy_float_weights(layer)
        elif layer.weights:
            twin.set_weights(layer.get_weights())
    return qmodel


def _quantized_layers(qmodel):
    return [layer for layer in qmodel.layers if isinstance(layer, QUANTIZED_LAYERS)]


def calibrate(qmodel, batches: Iterable[np.ndarray]) -> None:
    """Set every activation range (layer inputs, gates, states) from data with its spec's estimator.

    All activation quantizers are bypassed while the statistics are collected (weights stay
    quantized), so one pass over `batches` suffices; each range sees every value of every batch.
    """
    layers = [layer for layer in _quantized_layers(qmodel) if layer.activation_quantizers]
    if not layers:
        return
    for layer in layers:
        for q in layer.activation_quantizers.values():
            q.reset()
    taps = keras.Model(qmodel.inputs, [layer.input for layer in layers])
    seen = {(layer.name, key): [] for layer in layers for key in layer.activation_quantizers}
    for batch in batches:
        xs = taps(np.asarray(batch, np.float32), training=False)
        xs = xs if isinstance(xs, (list, tuple)) else [xs]
        for layer, x in zip(layers, xs):
            for key, values in layer.calibration_values(x).items():
                if key in layer.activation_quantizers:
                    seen[(layer.name, key)].append(np.asarray(values))
    if not any(seen.values()):
        raise ConfigError("calibrate got no batches: expected at least one batch of model inputs")
    for layer in layers:
        for key, q in layer.activation_quantizers.items():
            data = np.concatenate([v.reshape(-1, v.shape[-1]) for v in seen[(layer.name, key)]])
            lo, hi = estimate_range(data if q.spec.granularity == "per_channel" else data.ravel(), q.spec)
            q.set_range(lo, hi)


def freeze_ranges(qmodel) -> None:
    """Fix every quantization range of a fake-quant model where it is now: weight quantizers keep
    their current scale / zero point instead of following the weights, learned scales stop training.
    After this the model computes exactly what its exported integer weights compute. Quantizers
    already frozen are left as they are, so this can be called again after changing other weights."""
    for layer in _quantized_layers(qmodel):
        for name, q in layer.weight_quantizers.items():
            if float(q.frozen.numpy()) == 0.0:
                q.freeze(getattr(layer, name))
        for q in layer.activation_quantizers.values():
            q.freeze()


def quantized_weights(qmodel) -> dict[str, QuantizedTensor]:
    """Every quantized weight tensor of a `quantize_model` twin, as integer codes + scale/zero point,
    computed exactly as the forward pass does (float weights left float are not included)."""
    out = {}
    for layer in _quantized_layers(qmodel):
        for name, q in layer.weight_quantizers.items():
            w = tf.convert_to_tensor(getattr(layer, name))
            scale, zp = q.scale_zero_point(w)
            codes = tf.clip_by_value(tf.round(w / scale + zp), q.spec.qmin, q.spec.qmax)
            out[f"{layer.name}/{name}"] = QuantizedTensor(codes.numpy().astype(np.int32), scale.numpy(),
                                                          zp.numpy(), q.spec, q(w).numpy())
    return out
