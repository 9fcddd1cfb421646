"""The keyword-spotting model: [Normalization] -> LSTM or GRU (units), optionally Bidirectional, x layers
-> Flatten -> Dense(softmax); the study's is one LSTM(80)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import tf_keras as keras

from qat.checks import Checked, Flag, Integer, Number, OneOf, setting

# model.cell -> the Keras recurrent layer
CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


@dataclass(frozen=True)
class ModelSpec(Checked):
    """The recurrent stack (conf/model/*.yaml; the study's is LSTM(80))."""

    section = "model"

    cell: str = setting(OneOf(tuple(CELLS)))                          # the recurrent layer type
    bidirectional: bool = setting(Flag())                             # each recurrent layer both ways, concatenated

    units: int = setting(Integer(1))
    layers: int = setting(Integer(1))
    dropout: float = setting(Number(0, 1, high_open=True))            # on the recurrent inputs and before the classifier
    recurrent_dropout: float = setting(Number(0, 1, high_open=True))  # on the recurrent state (Keras semantics)


def build_model(input_shape: Sequence[int], n_classes: int, spec: ModelSpec,
                norm_mean: Optional[np.ndarray] = None, norm_var: Optional[np.ndarray] = None):
    """Build the float model. With `norm_mean`/`norm_var` (per-frequency, fitted on training
    features) a fixed `Normalization` layer named "normalize" comes first, so the statistics are
    saved with the model and travel to evaluation and export.

    Layer names are a contract used by quantization: "<cell>", "<cell>_1", ... (e.g. "lstm", "gru_1"),
    "flatten", "dense"; with `bidirectional` the wrappers are "bi<cell>", "bi<cell>_1", ... and their
    layers "forward_<cell>", "backward_<cell>", ...
    """
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = inputs
    if norm_mean is not None:
        x = keras.layers.Normalization(axis=-1, mean=np.asarray(norm_mean), variance=np.asarray(norm_var),
                                       name="normalize")(x)
    for i in range(spec.layers):
        name = spec.cell if i == 0 else f"{spec.cell}_{i}"
        layer = CELLS[spec.cell](spec.units, return_sequences=True, dropout=spec.dropout,
                                 recurrent_dropout=spec.recurrent_dropout, name=name)
        x = (keras.layers.Bidirectional(layer, name=f"bi{name}") if spec.bidirectional else layer)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if spec.dropout > 0:
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    return keras.Model(inputs, outputs, name=f"kws_{'bi' if spec.bidirectional else ''}{spec.cell}")
