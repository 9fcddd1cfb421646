"""QDense: `tf_keras.layers.Dense` with fake quantization of its kernel, bias and input."""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tf_keras as keras

from qat.layers.base import FeedForwardQuantized
from qat.layers.integer import dense_logits, input_grid, straight_through, weight_codes
from qat.quant.spec import QuantSpec


@keras.saving.register_keras_serializable(package="qat")
class QDense(FeedForwardQuantized, keras.layers.Dense):
    """Dense with optional fake quantization of its kernel, bias and input (the quantizers of
    qat.quant.quantizers, as QLSTM)."""

    weight_names = ("kernel", "bias")
    supports_integer = True

    def __init__(self, units, kernel_quant: Optional[QuantSpec] = None, bias_quant: Optional[QuantSpec] = None,
                 input_quant: Optional[QuantSpec] = None, quantizer="range", integer=None, **kwargs):
        super().__init__(units, **kwargs)
        self._set_quantization({"kernel": kernel_quant, "bias": bias_quant, "input": input_quant}, quantizer,
                               integer)

    def _apply(self, inputs, kernel):
        return tf.matmul(inputs, kernel)

    def _integer_parts(self, x_hat):
        kernel = self.quantized_weight("kernel")
        bias = self.quantized_weight("bias") if self.use_bias else None
        X, s_x = input_grid(self, x_hat)
        codes, scale = weight_codes(self, "kernel", kernel)
        return kernel, bias, dense_logits(X, s_x, codes, scale, bias)

    def _integer_output(self, inputs):
        """Integer mode (qat.layers.integer): the int32 logits times their scale, with the float
        product's gradient."""
        kernel, bias, (logits, scale) = self._integer_parts(inputs)
        y = tf.matmul(inputs, kernel)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        return straight_through(tf.cast(logits, tf.float32) * scale, y)

    def integer_logits(self, inputs):
        """The int32 logits (int64 tensor) of an integer-mode Dense for inputs [B, F] on its input grid."""
        if "input" in self.activation_quantizers:
            inputs = self.activation_quantizers["input"](inputs)
        return self._integer_parts(tf.convert_to_tensor(inputs, tf.float32))[2][0]
