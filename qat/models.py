"""The study's keyword-spotting model: [Normalization] -> LSTM(units) x layers -> Flatten -> Dense(softmax)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from qat import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Size of the LSTM stack; defaults are the study's LSTM(80)."""

    units: int = 80
    layers: int = 1
    dropout: float = 0.0            # dropout on the LSTM inputs and before the classifier
    recurrent_dropout: float = 0.0  # dropout on the recurrent state (Keras semantics)

    def __post_init__(self):
        if not isinstance(self.units, int) or self.units < 1:
            raise ConfigError(f"model.units={self.units!r} is not allowed: expected a positive integer")
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"model.layers={self.layers!r} is not allowed: expected a positive integer")
        for name in ("dropout", "recurrent_dropout"):
            v = getattr(self, name)
            if not (0.0 <= float(v) < 1.0):
                raise ConfigError(f"model.{name}={v!r} is not allowed: expected a float in [0, 1)")


def build_model(input_shape: Sequence[int], n_classes: int, spec: ModelSpec = ModelSpec(),
                norm_mean: Optional[np.ndarray] = None, norm_var: Optional[np.ndarray] = None):
    """Build the float model. With `norm_mean`/`norm_var` (per-frequency, fitted on training
    features) a fixed `Normalization` layer named "normalize" comes first, so the statistics are
    saved with the model and travel to evaluation and export.

    Layer names are a contract used by quantization: "lstm", "lstm_1", ..., "flatten", "dense".
    """
    import tf_keras as keras

    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = inputs
    if norm_mean is not None:
        x = keras.layers.Normalization(axis=-1, mean=np.asarray(norm_mean), variance=np.asarray(norm_var),
                                       name="normalize")(x)
    for i in range(spec.layers):
        x = keras.layers.LSTM(spec.units, return_sequences=True, dropout=spec.dropout,
                              recurrent_dropout=spec.recurrent_dropout,
                              name="lstm" if i == 0 else f"lstm_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if spec.dropout > 0:
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    return keras.Model(inputs, outputs, name="kws_lstm")
