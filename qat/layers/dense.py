"""QDense: `tf_keras.layers.Dense` with fake quantization of its kernel, bias and input."""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tf_keras as keras

from qat.layers.base import FeedForwardQuantized
from qat.quant.spec import QuantSpec


@keras.saving.register_keras_serializable(package="qat")
class QDense(FeedForwardQuantized, keras.layers.Dense):
    """Dense with optional fake quantization of its kernel, bias and input (the quantizers of
    qat.quant.quantizers, as QLSTM)."""

    weight_names = ("kernel", "bias")

    def __init__(self, units, kernel_quant: Optional[QuantSpec] = None, bias_quant: Optional[QuantSpec] = None,
                 input_quant: Optional[QuantSpec] = None, quantizer="range", **kwargs):
        super().__init__(units, **kwargs)
        self._set_quantization({"kernel": kernel_quant, "bias": bias_quant, "input": input_quant}, quantizer)

    def _apply(self, inputs, kernel):
        return tf.matmul(inputs, kernel)
