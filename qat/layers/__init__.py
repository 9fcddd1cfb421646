"""Quantized Keras layers (QDense, QLSTM, QGRU) and whole-model quantization (`model`); tfmot
QuantizeConfigs for the same layers (`tfmot`)."""
