"""What every quantized layer shares: its quantizers by name, its weights as the forward pass uses
them, and taking over the weights of the float layer it replaces."""
from __future__ import annotations

from typing import ClassVar, Dict, Iterable, Optional, Tuple

import tensorflow as tf

from qat.errors import ConfigError
from qat.quant.integer import IntegerMode
from qat.quant.quantizers import LSQ, ActivationQuantizer, Strategy, WeightQuantizer, strategy_named
from qat.quant.spec import QuantSpec


def float_source(layer):
    """The object that holds a float layer's weights (a Keras RNN keeps them on its cell)."""
    return getattr(layer, "cell", layer)


class QuantizedLayer:
    """Mixin of the quantized Keras layers (QDense, QLSTM).

    `weight_names`: the layer's quantizable weights, in the order they are copied and reported;
    `specs`: a QuantSpec (or None) per quantization point; `strategy`: the quantizer classes
    (qat.quant.quantizers.RANGE or LSQ)."""

    weight_names: ClassVar[Tuple[str, ...]] = ()
    supports_integer: ClassVar[bool] = False    # has an integer mode (qat.layers.integer)

    def _set_quantization(self, specs: Dict[str, Optional[QuantSpec]], quantizer, integer=None) -> None:
        self.specs = {name: QuantSpec.from_config(spec) for name, spec in specs.items()}
        if not self.use_bias and self.specs.get("bias") is not None:
            raise ConfigError("bias quantization is not allowed with use_bias=False: the layer has no bias")
        self.strategy: Strategy = quantizer if isinstance(quantizer, Strategy) else strategy_named(quantizer)
        self.integer: Optional[IntegerMode] = IntegerMode.of(integer)
        if self.integer is not None and not self.supports_integer:
            raise ConfigError(f"integer mode is not available for {type(self).__name__} layer '{self.name}': "
                              "expected LSTM, GRU and Dense layers")
        if self.integer is not None and self.strategy is LSQ:
            raise ConfigError(f"integer mode is not allowed with learned step sizes (layer '{self.name}'): "
                              "expected the range strategy (quant=qat or ptq)")

    def _build_quantizers(self, activations: Iterable[Tuple[Tuple[str, ...], str, int]]) -> None:
        """One weight quantizer per quantized weight, and for each (names, spec key, channels) one
        activation quantizer per name."""
        self.weight_quantizers: Dict[str, WeightQuantizer] = {}
        for name in self.weight_names:
            spec, var = self.specs.get(name), getattr(self, name, None)
            if spec is not None and var is not None:
                q = self.strategy.weight(spec)
                q.build(self, name, var.shape)
                self.weight_quantizers[name] = q
        self.activation_quantizers: Dict[str, ActivationQuantizer] = {}
        for names, key, channels in activations:
            if self.specs.get(key) is not None:
                for name in names:
                    q = self.strategy.activation(self.specs[key])
                    q.build(self, name, channels)
                    self.activation_quantizers[name] = q

    def quantized_weight(self, name: str):
        """The weight as the forward pass uses it (fake-quantized if it has a quantizer)."""
        var = getattr(self, name)
        q = self.weight_quantizers.get(name)
        return var if q is None else q(var)

    def copy_float_weights(self, float_layer) -> None:
        """Take the weights of the float layer this one replaces and fit the weight ranges to them."""
        source = float_source(float_layer)
        for name in self.weight_names:
            var = getattr(self, name, None)
            if var is not None:
                var.assign(getattr(source, name))
        for name, q in self.weight_quantizers.items():
            q.init_from(getattr(self, name).numpy())

    def calibration_values(self, inputs) -> Dict[str, object]:
        """The values each activation quantizer sees for a batch of layer inputs, computed with every
        activation quantizer bypassed (weights stay quantized): what calibration estimates ranges from."""
        raise NotImplementedError

    def quantization_config(self) -> dict:
        """The quantization part of `get_config`."""
        integer = {} if self.integer is None else {"integer": self.integer.to_config()}
        return {"quantizer": self.strategy.name, **integer,
                **{f"{key}_quant": None if spec is None else spec.to_config() for key, spec in self.specs.items()}}


class FeedForwardQuantized(QuantizedLayer):
    """What QDense and the quantized convolutions share: input quantizer -> `_apply(inputs, kernel)`
    with the fake-quantized kernel (`kernel_name`) -> quantized bias -> activation."""

    kernel_name: ClassVar[str] = "kernel"

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers([(("input",), "input", int(input_shape[-1]))])

    def _apply(self, inputs, kernel):
        raise NotImplementedError

    def call(self, inputs):
        if "input" in self.activation_quantizers:
            inputs = self.activation_quantizers["input"](inputs)
        if self.integer is not None:
            return self.activation(self._integer_output(inputs))
        y = self._apply(inputs, self.quantized_weight(self.kernel_name))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.quantized_weight("bias"))
        return self.activation(y) if self.activation is not None else y

    def _integer_output(self, inputs):
        """The pre-activation output in integer mode (layers with `supports_integer`)."""
        raise NotImplementedError

    def calibration_values(self, inputs) -> dict:
        return {"input": tf.convert_to_tensor(inputs)}

    def get_config(self):
        return {**super().get_config(), **self.quantization_config()}

    @classmethod
    def from_float(cls, layer, specs: dict, quantizer="range"):
        """An unbuilt quantized layer configured like the float layer (same name and config)."""
        extra = {"integer": specs["integer"]} if specs.get("integer") is not None else {}
        return cls(kernel_quant=specs.get(cls.kernel_name), bias_quant=specs.get("bias"),
                   input_quant=specs.get("input"), quantizer=quantizer, **extra, **layer.get_config())
