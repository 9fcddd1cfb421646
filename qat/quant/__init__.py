"""Quantization math: specs (`spec`), the numpy reference (`reference`), TensorFlow ops (`ops`) and
the quantizer strategies that layers hold (`quantizers`)."""
