"""Algorithms on quantized models: calibration (`calibration`), error-compensating rounding
(`gptq`), bias correction (`bias_correction`), rounding refinement (`rounding`), the degradation
predictor (`predict`) and the per-tensor error report (`report`)."""
