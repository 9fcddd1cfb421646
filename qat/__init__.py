"""Low-bit quantization of recurrent speech models (tf_keras + tfmot).

Importing the package selects Keras 2 (tf_keras) for TensorFlow, which tfmot needs; this must
happen before TensorFlow itself is imported anywhere.

Layers, bottom to top (a module imports only from its own layer or below):

    errors, checks, io, runtime, memo  the validation vocabulary, file helpers, values reused in a process
    quant/                             quantization math: specs, numpy reference, TF ops, quantizers
    data/, metrics, tracking           clips -> features; classification figures; W&B
    layers/, training/                 quantized Keras layers and whole-model quantization; float
                                       models, fitting, distillation, the float-model cache
    algorithms/, export/               calibration, GPTQ, bias correction, rounding refinement, the
                                       degradation predictor, weight reports; packed files, TFLite
    recipes/                           one module per recipe, a registry
    experiment, aggregate,             one run end to end; sweep tables and figures; the W&B
    sweep_report                       Report of a sweep
    config                             the Hydra edge: composed config -> typed specs
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from qat.errors import ConfigError, DataError, TrainingError, UserError  # noqa: E402

__all__ = ["ConfigError", "DataError", "TrainingError", "UserError"]
