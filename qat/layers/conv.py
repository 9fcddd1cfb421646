"""QConv1D, QConv2D, QDepthwiseConv2D: Keras' convolutions with fake quantization of their kernel,
bias and input (the quantizers of qat.quant.quantizers, as QDense).

Per-channel kernels have one range per output channel (the kernel's last axis; for a depthwise
kernel [kh, kw, in, multiplier] the input-channel axis, i.e. per output channel at the usual
multiplier 1). The input is quantized per tensor, as a Dense input is. BatchNormalization after a
convolution is folded into it before quantization (qat.layers.fold).
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.base import FeedForwardQuantized
from qat.quant.spec import QuantSpec


class _QConv(FeedForwardQuantized):
    """What the quantized convolutions share: their checks and their quantization points."""

    def _init_quantization(self, kernel_quant, bias_quant, input_quant, quantizer) -> None:
        if self.data_format != "channels_last":
            raise ConfigError(f"data_format={self.data_format!r} is not allowed for the quantized convolution "
                              f"'{self.name}': expected 'channels_last'")
        if getattr(self, "groups", 1) != 1:
            raise ConfigError(f"groups={self.groups} is not allowed for the quantized convolution '{self.name}': "
                              "expected 1 (use DepthwiseConv2D for one group per channel)")
        self._set_quantization({self.kernel_name: kernel_quant, "bias": bias_quant, "input": input_quant}, quantizer)


class _QStandardConv(_QConv):
    """Conv1D / Conv2D: (filters, kernel_size) first, Keras' own convolution (causal padding too)."""

    weight_names = ("kernel", "bias")

    def __init__(self, filters, kernel_size, kernel_quant: Optional[QuantSpec] = None,
                 bias_quant: Optional[QuantSpec] = None, input_quant: Optional[QuantSpec] = None,
                 quantizer="range", **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantization(kernel_quant, bias_quant, input_quant, quantizer)

    def _apply(self, inputs, kernel):
        return convolve(self, inputs, kernel)


@keras.saving.register_keras_serializable(package="qat")
class QConv1D(_QStandardConv, keras.layers.Conv1D):
    """Conv1D with fake quantization of its kernel, bias and input."""


@keras.saving.register_keras_serializable(package="qat")
class QConv2D(_QStandardConv, keras.layers.Conv2D):
    """Conv2D with fake quantization of its kernel, bias and input."""


@keras.saving.register_keras_serializable(package="qat")
class QDepthwiseConv2D(_QConv, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D with fake quantization of its depthwise kernel, bias and input."""

    weight_names = ("depthwise_kernel", "bias")
    kernel_name = "depthwise_kernel"

    def __init__(self, kernel_size, kernel_quant: Optional[QuantSpec] = None,
                 bias_quant: Optional[QuantSpec] = None, input_quant: Optional[QuantSpec] = None,
                 quantizer="range", **kwargs):
        super().__init__(kernel_size, **kwargs)
        self._init_quantization(kernel_quant, bias_quant, input_quant, quantizer)

    def _apply(self, inputs, kernel):
        return keras.backend.depthwise_conv2d(inputs, kernel, strides=self.strides, padding=self.padding,
                                              dilation_rate=self.dilation_rate, data_format=self.data_format)


def kernel_name(layer) -> str:
    """The attribute holding a layer's kernel: "depthwise_kernel" for a depthwise convolution."""
    return "depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) else "kernel"


def _causal(layer, x):
    return tf.pad(x, layer._compute_causal_padding(x)) if layer.padding == "causal" else x


def convolve(layer, x, kernel):
    """What a Conv1D / Conv2D (float or quantized) computes from `x` with `kernel`, before its bias."""
    return layer.convolution_op(_causal(layer, x), kernel)


def conv_patches(layer, x):
    """The input patches a Conv1D / Conv2D (float or quantized) multiplies by its kernel: [batch,
    output positions, kernel positions x in] in the kernel's (positions..., in) order (im2col), so
    that patches @ kernel.reshape(-1, filters) is the convolution."""
    x = tf.convert_to_tensor(x)
    if layer.rank == 1:
        x = _causal(layer, x)[:, :, None, :]
        sizes, strides, rates = (layer.kernel_size[0], 1), (layer.strides[0], 1), (layer.dilation_rate[0], 1)
    else:
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    patches = tf.image.extract_patches(x, sizes=(1, *sizes, 1), strides=(1, *strides, 1), rates=(1, *rates, 1),
                                       padding="SAME" if layer.padding == "same" else "VALID")
    return tf.reshape(patches, (tf.shape(patches)[0], -1, patches.shape[-1]))


# float convolution type -> its quantized twin
CONVOLUTIONS = {keras.layers.Conv1D: QConv1D, keras.layers.Conv2D: QConv2D,
                keras.layers.DepthwiseConv2D: QDepthwiseConv2D}
