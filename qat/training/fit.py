"""Float training: Adam, early stopping on validation accuracy with best-weights restore, seeded."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.checks import Checked, Flag, Integer, ListOf, Nullable, Number, OneOf, Text, rejected, setting
from qat.errors import TrainingError
from qat.data.batches import batched, shuffled_batches
from qat.training.distill import Distiller

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class TrainSpec(Checked):
    """How the float model is trained and QAT fine-tunes (conf/trainer/*.yaml)."""

    section = "trainer"

    epochs: int = setting(Integer(1))
    batch_size: int = setting(Integer(1))
    learning_rate: float = setting(Number(0, low_open=True))
    patience: int = setting(Integer(0))                 # early stopping on val_accuracy, best weights restored
    lr_schedule: str = setting(OneOf(LR_SCHEDULES))     # constant | cosine (decay to 0 over `epochs`)
    class_weight: str = setting(OneOf(CLASS_WEIGHTS))   # none | balanced (inverse class frequency)
    # Augmentation of the training clips (qat.data.augment): a shift of the cached frames in whole hops,
    # or, with noise mixing, waveforms shifted, mixed and turned into features on the fly:
    time_shift_ms: float = setting(Number(0, 1000, high_open=True, expected="a number of milliseconds in [0, 1000)"))
    noise_prob: float = setting(Number(0, 1, expected="a probability in [0, 1]"))
    noise_snr_db: Tuple[float, float] = setting(ListOf(Number(), length=2, expected="[low, high] in dB with low <= high"))
    noise_dir: Optional[str] = setting(Nullable(Text(), expected="null or a folder"))  # null = the data's own noise
    reuse_float: bool = setting(Flag())                  # reuse a cached float checkpoint of the same data/model/seed

    def check(self) -> None:
        low, high = self.noise_snr_db
        if not low <= high:
            raise rejected("trainer.noise_snr_db", list(self.noise_snr_db), "[low, high] in dB with low <= high")
        object.__setattr__(self, "noise_snr_db", (float(low), float(high)))

    @property
    def augment(self) -> bool:
        """Whether training clips are augmented (and features computed on the fly)."""
        return self.time_shift_ms > 0 or self.noise_prob > 0


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


DIVERGED_LOSS = 100.0     # a training loss above this many times chance level (ln classes) has exploded


def check_converged(model, history: Dict[str, List[float]], n_classes: int, what: str, learning_rate_key: str,
                    learning_rate: float) -> None:
    """TrainingError if the training loss or any weight of `model` is not finite, or the last epoch's
    loss is above DIVERGED_LOSS x ln(classes) (a classifier at chance scores ln(classes))."""
    losses = history.get("loss", [])
    bad_epochs = [i + 1 for i, v in enumerate(losses) if not np.isfinite(v)]
    bad_weights = [w.name for w in model.weights if not np.all(np.isfinite(w.numpy()))]
    limit = DIVERGED_LOSS * math.log(max(n_classes, 2))
    if bad_epochs:
        where = f"the loss is not finite from epoch {bad_epochs[0]}"
    elif bad_weights:
        where = f"{len(bad_weights)} weight tensors hold NaN or Inf"
    elif losses and losses[-1] > limit:
        where = f"the loss is {losses[-1]:.3g} after epoch {len(losses)}, where chance level is {limit / DIVERGED_LOSS:.2f}"
    else:
        return
    raise TrainingError(f"{what} diverged ({where}) with {learning_rate_key}={learning_rate:g}: lower the learning rate")


def fit(model, x_train, y_train, x_val, y_val, spec: TrainSpec, *, epochs: Optional[int] = None,
        learning_rate: Optional[float] = None, callbacks=(), verbose: int = 0,
        on_epoch: Optional[Callable[[int, dict], None]] = None, train_data=None,
        steps_per_epoch: Optional[int] = None, teacher=None, distill: float = 0.0,
        temperature: float = 1.0, what: str = "float training",
        learning_rate_key: str = "trainer.learning_rate") -> dict:
    """Compile with Adam and train with early stopping on val_accuracy (best weights restored).

    Returns {"history": {metric: [per epoch]}, "epochs": run, "best_epoch": int, "sec_per_epoch": float}.
    `epochs` / `learning_rate` override the spec (QAT fine-tuning uses its own).
    `train_data`: a tf.data dataset of (features, labels) batches to train on instead of
    (x_train, y_train), e.g. the augmented pipeline of `qat.data.augment.training_data`, with its
    `steps_per_epoch`; `y_train` still gives the class weights (x_train may then be None).
    `teacher` with `distill` > 0: knowledge distillation from the teacher's outputs (qat.training.distill).
    A loss or weights that are not finite after training raise TrainingError naming `what` and the
    learning-rate setting (`learning_rate_key`), so a diverged model is never evaluated or cached.
    """
    epochs = int(epochs or spec.epochs)
    lr = float(learning_rate or spec.learning_rate)
    if train_data is not None and not steps_per_epoch:
        raise ValueError("fit(train_data=...) needs steps_per_epoch")
    steps_per_epoch = int(steps_per_epoch) if train_data is not None else int(np.ceil(len(y_train) / spec.batch_size))
    if spec.lr_schedule == "cosine":
        steps = epochs * steps_per_epoch
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps, 1))
    n_classes = int(model.output_shape[-1])
    weights = class_weights(y_train, n_classes) if spec.class_weight == "balanced" else None
    if teacher is not None and distill > 0:
        model = Distiller(model, teacher, distill, temperature)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    cbs = [timer, *callbacks]
    if spec.patience > 0:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=spec.patience,
                                                 restore_best_weights=True))
    if on_epoch is not None:
        cbs.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: on_epoch(e, dict(logs or {}))))
    if train_data is None:
        train_data, steps_per_epoch = shuffled_batches(x_train, y_train, spec.batch_size, epochs)
    hist = model.fit(train_data, steps_per_epoch=steps_per_epoch, validation_data=batched(x_val, y_val, spec.batch_size),
                     epochs=epochs, class_weight=weights, verbose=verbose, callbacks=cbs)
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    check_converged(model, h, n_classes, what, learning_rate_key, float(learning_rate or spec.learning_rate))
    return {"history": h, "epochs": len(timer.seconds),
            "best_epoch": int(np.argmax(h["val_accuracy"])) + 1 if h.get("val_accuracy") else len(timer.seconds),
            "sec_per_epoch": float(np.median(timer.seconds)) if timer.seconds else 0.0}
