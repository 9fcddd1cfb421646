"""Quantized Keras layers (QDense, QLSTM) and whole-model quantization (`model`); tfmot
QuantizeConfigs for the same layers (`tfmot`)."""
