"""The keyword-spotting model: [Normalization] -> [Conv2D front end] -> LSTM or GRU (units), optionally
Bidirectional, x layers -> Flatten -> Dense(softmax); the study's is one LSTM(80). Or the user's own
saved tf_keras model (`model.path`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import tf_keras as keras

from qat.checks import Checked, ExistingFile, Flag, Integer, ListOf, Nullable, Number, OneOf, setting
from qat.errors import ConfigError, DataError

# model.cell -> the Keras recurrent layer
CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}
MODEL_FILE = ExistingFile((".keras", ".h5"), "tf_keras model")


@dataclass(frozen=True)
class ModelSpec(Checked):
    """The model (conf/model/*.yaml; the study's is LSTM(80)): built from these settings, or the
    user's saved model at `path` (then the architecture settings are not used)."""

    section = "model"

    cell: str = setting(OneOf(tuple(CELLS)))                          # the recurrent layer type
    bidirectional: bool = setting(Flag())                             # each recurrent layer both ways, concatenated

    units: int = setting(Integer(1))
    layers: int = setting(Integer(1))
    dropout: float = setting(Number(0, 1, high_open=True))            # on the recurrent inputs and before the classifier
    recurrent_dropout: float = setting(Number(0, 1, high_open=True))  # on the recurrent state (Keras semantics)

    conv_filters: int = setting(Integer(0))                           # > 0: a Conv2D -> BN -> ReLU front end (crnn)
    conv_kernel: Tuple[int, int] = setting(ListOf(Integer(1), 2))     # [time, frequency]
    conv_strides: Tuple[int, int] = setting(ListOf(Integer(1), 2))    # [time, frequency]

    path: Optional[str] = setting(Nullable(MODEL_FILE))               # the user's saved tf_keras model (model=keras)
    trained: bool = setting(Flag())                                   # path's weights are the float model (no training)
    keep_float: bool = setting(Flag())                                # layers that cannot be quantized stay float

    def check(self) -> None:
        if self.trained and self.path is None:
            raise ConfigError("model.trained=true is not allowed without model.path: expected model.path=<file.keras>")


def conv_front_end(x, n_freq: int, n_frames: int, spec: ModelSpec):
    """[frames, bins] -> Conv2D (valid padding, no bias) -> BatchNormalization -> ReLU -> [frames', bins' x filters]."""
    kt, kf = spec.conv_kernel
    if kt > n_frames or kf > n_freq:
        raise ConfigError(f"model.conv_kernel={list(spec.conv_kernel)} is not allowed for {n_frames} x {n_freq} "
                          f"features: expected at most [{n_frames}, {n_freq}]")
    st, sf = spec.conv_strides
    x = keras.layers.Reshape((-1, n_freq, 1), name="expand")(x)
    x = keras.layers.Conv2D(spec.conv_filters, (kt, kf), strides=(st, sf), use_bias=False, name="conv2d")(x)
    x = keras.layers.BatchNormalization(name="conv2d_bn")(x)
    x = keras.layers.ReLU(name="conv2d_relu")(x)
    return keras.layers.Reshape((-1, ((n_freq - kf) // sf + 1) * spec.conv_filters), name="frames")(x)


def build_model(input_shape: Sequence[int], n_classes: int, spec: ModelSpec,
                norm_mean: Optional[np.ndarray] = None, norm_var: Optional[np.ndarray] = None):
    """Build the float model. With `norm_mean`/`norm_var` (per-frequency, fitted on training
    features) a fixed `Normalization` layer named "normalize" comes first, so the statistics are
    saved with the model and travel to evaluation and export.

    Layer names are a contract used by quantization: "<cell>", "<cell>_1", ... (e.g. "lstm", "gru_1"),
    "flatten", "dense"; with `bidirectional` the wrappers are "bi<cell>", "bi<cell>_1", ... and their
    layers "forward_<cell>", "backward_<cell>", ...; the conv front end is "conv2d" (its batch norm
    "conv2d_bn", folded into it before quantization).
    """
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = inputs
    if norm_mean is not None:
        x = keras.layers.Normalization(axis=-1, mean=np.asarray(norm_mean), variance=np.asarray(norm_var),
                                       name="normalize")(x)
    if spec.conv_filters:
        x = conv_front_end(x, int(input_shape[-1]), int(input_shape[0]), spec)
    for i in range(spec.layers):
        name = spec.cell if i == 0 else f"{spec.cell}_{i}"
        layer = CELLS[spec.cell](spec.units, return_sequences=True, dropout=spec.dropout,
                                 recurrent_dropout=spec.recurrent_dropout, name=name)
        x = (keras.layers.Bidirectional(layer, name=f"bi{name}") if spec.bidirectional else layer)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if spec.dropout > 0:
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    prefix = "c" if spec.conv_filters else ""
    return keras.Model(inputs, outputs, name=f"kws_{prefix}{'bi' if spec.bidirectional else ''}{spec.cell}")


def load_user_model(path: str):
    """The user's saved tf_keras model (not compiled); a one-line DataError if it cannot be read."""
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:   # a damaged file, Keras 3 file, unknown custom layer ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"model.path={path!r} cannot be loaded as a tf_keras model ({type(e).__name__}: {first[:200]})")


def _softmax_output(model) -> bool:
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return activation is not None and keras.activations.serialize(activation) == "softmax"


def check_user_model(model, path: str, input_shape: Sequence[int], n_classes: int) -> None:
    """The user's model must take the front end's features and give the task's class probabilities."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"model.path={path!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs: "
                          "expected one input (the features) and one output (class probabilities)")
    got = tuple(model.inputs[0].shape[1:])
    if got != tuple(input_shape):
        raise ConfigError(f"model.path={path!r} takes input {list(got)}: expected {list(input_shape)}, "
                          "the features of the chosen front end")
    if tuple(model.outputs[0].shape[1:]) != (n_classes,):
        raise ConfigError(f"model.path={path!r} gives output {list(model.outputs[0].shape[1:])}: expected "
                          f"[{n_classes}], one probability per class of the task")
    if not _softmax_output(model):
        raise ConfigError(f"model.path={path!r} ends in '{model.layers[-1].name}' without softmax: expected a "
                          "softmax output (training uses the cross-entropy of probabilities)")


def fresh_copy(model):
    """The same architecture with freshly initialised weights (the global seed decides them); layers
    without trainable weights (e.g. an adapted Normalization) keep their values."""
    copy = keras.models.clone_model(model)
    for old, new in zip(model.layers, copy.layers):
        if old.weights and not old.trainable_weights:
            new.set_weights(old.get_weights())
    return copy
