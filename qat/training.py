"""Float training: Adam, early stopping on validation accuracy with best-weights restore, seeded."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat import ConfigError

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class TrainSpec:
    """How the float model is trained (and, for QAT, fine-tuned)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 5                  # early stopping on val_accuracy, best weights restored
    lr_schedule: str = "constant"      # constant | cosine (decay to 0 over `epochs`)
    class_weight: str = "none"         # none | balanced (inverse class frequency)
    reuse_float: bool = True           # reuse a cached float checkpoint of the same data/model/seed

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"trainer.{name}={v!r} is not allowed: expected a positive integer")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"trainer.patience={self.patience!r} is not allowed: expected an integer >= 0")
        if not float(self.learning_rate) > 0:
            raise ConfigError(f"trainer.learning_rate={self.learning_rate!r} is not allowed: expected > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"trainer.lr_schedule={self.lr_schedule!r} is not allowed: expected one of "
                              f"{', '.join(LR_SCHEDULES)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ConfigError(f"trainer.class_weight={self.class_weight!r} is not allowed: expected one of "
                              f"{', '.join(CLASS_WEIGHTS)}")


def set_seed(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic: same seed, same machine,
    same weights."""
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def class_weights(y: np.ndarray, n_classes: int) -> Dict[int, float]:
    """Inverse-frequency weights normalised to mean 1 over the samples."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = len(y) / (n_classes * np.maximum(counts, 1))
    return {i: float(w[i]) for i in range(n_classes)}


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch."""

    def __init__(self):
        super().__init__()
        self.seconds: List[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def fit(model, x_train, y_train, x_val, y_val, spec: TrainSpec, *, epochs: Optional[int] = None,
        learning_rate: Optional[float] = None, callbacks=(), verbose: int = 0,
        on_epoch: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Compile with Adam and train with early stopping on val_accuracy (best weights restored).

    Returns {"history": {metric: [per epoch]}, "epochs": run, "best_epoch": int, "sec_per_epoch": float}.
    `epochs` / `learning_rate` override the spec (QAT fine-tuning uses its own).
    """
    epochs = int(epochs or spec.epochs)
    lr = float(learning_rate or spec.learning_rate)
    if spec.lr_schedule == "cosine":
        steps = epochs * int(np.ceil(len(x_train) / spec.batch_size))
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps, 1))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    cbs = [timer, *callbacks]
    if spec.patience > 0:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=spec.patience,
                                                 restore_best_weights=True))
    if on_epoch is not None:
        cbs.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: on_epoch(e, dict(logs or {}))))
    weights = class_weights(y_train, model.output_shape[-1]) if spec.class_weight == "balanced" else None
    hist = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs,
                     batch_size=spec.batch_size, shuffle=True, class_weight=weights, verbose=verbose,
                     callbacks=cbs)
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return {"history": h, "epochs": len(timer.seconds),
            "best_epoch": int(np.argmax(h["val_accuracy"])) + 1 if h.get("val_accuracy") else len(timer.seconds),
            "sec_per_epoch": float(np.median(timer.seconds)) if timer.seconds else 0.0}
