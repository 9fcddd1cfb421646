"""Low-bit quantization of LSTM speech models (tf_keras + tfmot).

Importing the package selects Keras 2 (tf_keras) for TensorFlow, which tfmot needs;
this must happen before TensorFlow itself is imported anywhere.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class ConfigError(ValueError):
    """Bad user input (config value, path, file): the message is one line naming the value and what is allowed."""
