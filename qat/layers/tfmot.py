"""tfmot integration: QuantizeConfigs that let `quantize_annotate_layer` + `quantize_apply` take the
Keras LSTM and GRU (which tfmot's default registry rejects) and an n-bit Dense, at any bit-width 2..16.

Weights use tfmot's own `LastValueQuantizer` (range = min/max of the current weights, per output
column with per_channel), activations its `MovingAverageQuantizer` (EMA of batch min/max during
training); both are TF's `fake_quant_with_min_max_vars*` with a straight-through gradient.

What tfmot cannot do for an LSTM (verified in tests/test_tfmot.py):
- Quantize the recurrent state. tfmot only swaps weight attributes and *activation functions* of
  the wrapped layer. With `act_bits`, the cell's `recurrent_activation` (sigmoid) and `activation`
  (tanh) are wrapped; tfmot quantizes the *input* of sigmoid/tanh, so what gets quantized is the
  gate pre-activations z_i, z_f, z_o (one shared range), the candidate pre-activation z_c and the
  cell state as it enters tanh(c) (one shared range for both). The carried cell state c_t
  (f*c + i*g) and the hidden state h_t = o*tanh(c_t), which feeds the next step, stay float; only
  the layer's output sequence can be quantized, after the loop, via the output quantizer.
- Keep the fast LSTM kernel with activation quantization. Keras decides at construction whether
  the fused kernel (which hard-codes sigmoid/tanh and would silently skip tfmot's activation
  wrappers) is used, so this config switches the wrapped LSTM to its generic per-step path when
  act_bits is set (a private Keras attribute, `_could_use_gpu_kernel`).
- Separate ranges per gate, LSQ/learned ranges, percentile or MSE range estimators, asymmetric
  weights per channel other than the last axis: use `qat.layers.model.quantize_model` for those.
"""
from __future__ import annotations

from typing import Optional

import tensorflow_model_optimization as tfmot
import tf_keras as keras

from qat.checks import Bits, Nullable
from qat.errors import ConfigError

_tq = tfmot.quantization.keras


class _NBitConfig(_tq.QuantizeConfig):
    """Shared parts: weight attributes quantized at `bits`, activation attributes at `act_bits`."""

    def __init__(self, bits: int, act_bits: Optional[int] = None, per_channel: bool = True,
                 symmetric: bool = True, narrow_range: bool = False, quantize_output: bool = False):
        Bits()("bits", bits)
        Nullable(Bits())("act_bits", act_bits)
        if quantize_output and act_bits is None:
            raise ConfigError("quantize_output=True is not allowed without act_bits: set act_bits=2..16")
        self.bits, self.act_bits, self.per_channel = bits, act_bits, bool(per_channel)
        self.symmetric, self.narrow_range, self.quantize_output = bool(symmetric), bool(narrow_range), quantize_output

    def _weight_quantizer(self):
        return _tq.quantizers.LastValueQuantizer(num_bits=self.bits, per_axis=self.per_channel,
                                                 symmetric=self.symmetric, narrow_range=self.narrow_range)

    def _act_quantizer(self):
        return _tq.quantizers.MovingAverageQuantizer(num_bits=self.act_bits, per_axis=False, symmetric=False,
                                                     narrow_range=False)

    def get_output_quantizers(self, layer):
        return [self._act_quantizer()] if self.quantize_output else []

    def get_config(self):
        return {"bits": self.bits, "act_bits": self.act_bits, "per_channel": self.per_channel,
                "symmetric": self.symmetric, "narrow_range": self.narrow_range,
                "quantize_output": self.quantize_output}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="qat")
class LSTMQuantizeConfig(_NBitConfig):
    """`bits`-bit kernel and recurrent kernel of a Keras LSTM (bias float, as in TFLite);
    with `act_bits`, the gate/cell inputs of sigmoid and tanh (see the module doc for exactly which);
    with `quantize_output`, the output sequence."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.cell.kernel, self._weight_quantizer()), (layer.cell.recurrent_kernel, self._weight_quantizer())]

    def get_activations_and_quantizers(self, layer):
        if self.act_bits is None:
            return []
        return [(layer.cell.activation, self._act_quantizer()), (layer.cell.recurrent_activation, self._act_quantizer())]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.cell.kernel, layer.cell.recurrent_kernel = quantize_weights

    def set_quantize_activations(self, layer, quantize_activations):
        if quantize_activations:
            layer.cell.activation, layer.cell.recurrent_activation = quantize_activations
            layer._could_use_gpu_kernel = False   # the fused kernel would ignore the wrapped activations


@keras.saving.register_keras_serializable(package="qat")
class GRUQuantizeConfig(LSTMQuantizeConfig):
    """The same for a Keras GRU: `bits`-bit kernel and recurrent kernel (bias float); with `act_bits`,
    the inputs of its sigmoid (z, r pre-activations) and tanh (the candidate's); the state h stays
    float inside the loop, as the LSTM's."""


@keras.saving.register_keras_serializable(package="qat")
class DenseQuantizeConfig(_NBitConfig):
    """`bits`-bit Dense kernel (bias float); with `act_bits`, the activation's input (softmax logits)."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, self._weight_quantizer())]

    def get_activations_and_quantizers(self, layer):
        return [] if self.act_bits is None else [(layer.activation, self._act_quantizer())]

    def set_quantize_weights(self, layer, quantize_weights):
        (layer.kernel,) = quantize_weights

    def set_quantize_activations(self, layer, quantize_activations):
        if quantize_activations:
            (layer.activation,) = quantize_activations


CUSTOM_OBJECTS = {"LSTMQuantizeConfig": LSTMQuantizeConfig, "GRUQuantizeConfig": GRUQuantizeConfig,
                  "DenseQuantizeConfig": DenseQuantizeConfig}
RECURRENT_CONFIGS = {keras.layers.LSTM: LSTMQuantizeConfig, keras.layers.GRU: GRUQuantizeConfig}


def tfmot_quantize(float_model, bits: int, act_bits: Optional[int] = None, per_channel: bool = True,
                   symmetric: bool = True, narrow_range: bool = False):
    """tfmot QAT model of `float_model`: every LSTM, GRU and Dense annotated with the n-bit configs above,
    then `quantize_apply` (inside `quantize_scope`); float weights are kept. tfmot starts every weight
    range at [-6, 6] and updates it only in training steps, so the ranges are set here from the float
    weights: the returned model is a valid quantized model before its first training step."""
    kwargs = dict(bits=bits, act_bits=act_bits, per_channel=per_channel, symmetric=symmetric,
                  narrow_range=narrow_range)

    def annotate(layer):
        if isinstance(layer, keras.layers.Wrapper):
            raise ConfigError(f"layer '{layer.name}' ({type(layer).__name__}) cannot be quantized through tfmot: "
                              "it has no QuantizeConfig for wrappers (use quant=qat)")
        if type(layer) in RECURRENT_CONFIGS:
            return _tq.quantize_annotate_layer(layer, RECURRENT_CONFIGS[type(layer)](**kwargs))
        if type(layer) is keras.layers.Dense:
            return _tq.quantize_annotate_layer(layer, DenseQuantizeConfig(**kwargs))
        return layer

    annotated = keras.models.clone_model(float_model, clone_function=annotate)
    with _tq.quantize_scope(CUSTOM_OBJECTS):
        qmodel = _tq.quantize_apply(annotated)
    for layer in qmodel.layers:
        for weight, quantizer, quantizer_vars in getattr(layer, "_weight_vars", []):
            quantizer(weight, True, weights=quantizer_vars)   # training mode stores the weight's range
    return qmodel
