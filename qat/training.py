"""Float training: Adam, early stopping on validation accuracy with best-weights restore, seeded."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

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
    # Augmentation of the training clips (qat.augment): a shift of the cached frames in whole hops, or,
    # with noise mixing, waveforms shifted, mixed and turned into features on the fly:
    time_shift_ms: float = 0.0         # random shift of each clip by up to +/- this, silence-filled; 0 = off
    noise_prob: float = 0.0            # share of training clips mixed with background noise; 0 = off
    noise_snr_db: Tuple[float, float] = (10.0, 30.0)  # uniform random SNR range of the mixing, in dB
    noise_dir: Optional[str] = None    # noise WAVs; null = the data's own _silence_ (train split only)
                                       # or _background_noise_ folder
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
        if isinstance(self.time_shift_ms, bool) or not isinstance(self.time_shift_ms, (int, float)) \
                or not 0 <= self.time_shift_ms < 1000:
            raise ConfigError(f"trainer.time_shift_ms={self.time_shift_ms!r} is not allowed: expected a number "
                              "of milliseconds in [0, 1000)")
        if isinstance(self.noise_prob, bool) or not isinstance(self.noise_prob, (int, float)) \
                or not 0 <= self.noise_prob <= 1:
            raise ConfigError(f"trainer.noise_prob={self.noise_prob!r} is not allowed: expected a probability "
                              "in [0, 1]")
        snr = self.noise_snr_db
        if isinstance(snr, (str, bytes)) or not hasattr(snr, "__len__") or len(snr) != 2 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in snr) \
                or not snr[0] <= snr[1]:
            raise ConfigError(f"trainer.noise_snr_db={snr!r} is not allowed: expected [low, high] in dB "
                              "with low <= high")
        object.__setattr__(self, "noise_snr_db", (float(snr[0]), float(snr[1])))
        if self.noise_dir is not None and not isinstance(self.noise_dir, str):
            raise ConfigError(f"trainer.noise_dir={self.noise_dir!r} is not allowed: expected null or a folder")

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


def fit(model, x_train, y_train, x_val, y_val, spec: TrainSpec, *, epochs: Optional[int] = None,
        learning_rate: Optional[float] = None, callbacks=(), verbose: int = 0,
        on_epoch: Optional[Callable[[int, dict], None]] = None, train_data=None,
        steps_per_epoch: Optional[int] = None, teacher=None, distill: float = 0.0,
        temperature: float = 1.0) -> dict:
    """Compile with Adam and train with early stopping on val_accuracy (best weights restored).

    Returns {"history": {metric: [per epoch]}, "epochs": run, "best_epoch": int, "sec_per_epoch": float}.
    `epochs` / `learning_rate` override the spec (QAT fine-tuning uses its own).
    `train_data`: a tf.data dataset of (features, labels) batches to train on instead of
    (x_train, y_train), e.g. the augmented pipeline of `qat.augment.training_data`, with its
    `steps_per_epoch`; `y_train` still gives the class weights (x_train may then be None).
    `teacher` with `distill` > 0: knowledge distillation from the teacher's outputs (qat.distill).
    """
    epochs = int(epochs or spec.epochs)
    lr = float(learning_rate or spec.learning_rate)
    if train_data is not None and not steps_per_epoch:
        raise ValueError("fit(train_data=...) needs steps_per_epoch")
    steps_per_epoch = int(steps_per_epoch) if train_data is not None else int(np.ceil(len(y_train) / spec.batch_size))
    if spec.lr_schedule == "cosine":
        steps = epochs * steps_per_epoch
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps, 1))
    weights = class_weights(y_train, model.output_shape[-1]) if spec.class_weight == "balanced" else None
    if teacher is not None and distill > 0:
        from qat.distill import Distiller

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
    if train_data is not None:
        hist = model.fit(train_data, steps_per_epoch=steps_per_epoch, validation_data=(x_val, y_val),
                         validation_batch_size=spec.batch_size, epochs=epochs, class_weight=weights,
                         verbose=verbose, callbacks=cbs)
    else:
        hist = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs,
                         batch_size=spec.batch_size, shuffle=True, class_weight=weights, verbose=verbose,
                         callbacks=cbs)
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return {"history": h, "epochs": len(timer.seconds),
            "best_epoch": int(np.argmax(h["val_accuracy"])) + 1 if h.get("val_accuracy") else len(timer.seconds),
            "sec_per_epoch": float(np.median(timer.seconds)) if timer.seconds else 0.0}
