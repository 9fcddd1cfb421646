"""QDense: `tf_keras.layers.Dense` with fake quantization of its kernel, bias and input."""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tf_keras as keras

from qat.layers.base import QuantizedLayer
from qat.quant.spec import QuantSpec


@keras.saving.register_keras_serializable(package="qat")
class QDense(QuantizedLayer, keras.layers.Dense):
    """Dense with optional fake quantization of its kernel, bias and input (the quantizers of
    qat.quant.quantizers, as QLSTM)."""

    weight_names = ("kernel", "bias")

    def __init__(self, units, kernel_quant: Optional[QuantSpec] = None, bias_quant: Optional[QuantSpec] = None,
                 input_quant: Optional[QuantSpec] = None, quantizer="range", **kwargs):
        super().__init__(units, **kwargs)
        self._set_quantization({"kernel": kernel_quant, "bias": bias_quant, "input": input_quant}, quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers([(("input",), "input", int(input_shape[-1]))])

    def call(self, inputs):
        if "input" in self.activation_quantizers:
            inputs = self.activation_quantizers["input"](inputs)
        y = tf.matmul(inputs, self.quantized_weight("kernel"))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.quantized_weight("bias"))
        return self.activation(y) if self.activation is not None else y

    def calibration_values(self, inputs) -> dict:
        return {"input": tf.convert_to_tensor(inputs)}

    def get_config(self):
        return {**super().get_config(), **self.quantization_config()}

    @classmethod
    def from_float(cls, dense, specs: dict, quantizer="range") -> "QDense":
        """An unbuilt QDense configured like the float Dense `dense` (same name and config)."""
        return cls(kernel_quant=specs.get("kernel"), bias_quant=specs.get("bias"), input_quant=specs.get("input"),
                   quantizer=quantizer, **dense.get_config())
