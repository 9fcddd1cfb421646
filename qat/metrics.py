"""A model's predictions on arrays of clips, the classification figures of one split, and the
confusion-matrix picture."""
from __future__ import annotations

from typing import Dict, List, Sequence

import matplotlib
import numpy as np
import tf_keras as keras

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

from qat.data.batches import batched  # noqa: E402


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's outputs for every clip of x, in order (a Keras model, or any object with a
    `predict(x)` such as qat.export.tflite.TFLiteModel)."""
    if isinstance(model, keras.Model):
        return model.predict(batched(x, batch_size=batch_size), verbose=0)
    return model.predict(x)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> Dict:
    """Accuracy, balanced accuracy (mean per-class recall), macro F1, per-class accuracy (None for a
    class with no clips in the split) and the confusion matrix. Balanced accuracy and macro F1 matter because the classes are unbalanced
    (the study's "unknown" is 6 of 8 words)."""
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    present = support > 0
    return {
        "acc": float(tp.sum() / max(cm.sum(), 1)),
        "balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_acc": {name: (float(r) if n else None) for name, r, n in zip(class_names, recall, support)},
        "confusion": cm.tolist(),
        "n": int(cm.sum()),
    }


def predict_classes(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max class of each input."""
    return np.argmax(predict(model, x, batch_size), axis=-1)


def evaluate(model, x: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> Dict:
    """`classification_report` of the model's predictions, with "correct": whether each clip was
    classified right (a boolean array)."""
    classes = predict_classes(model, x)
    return {**classification_report(y, classes, class_names), "correct": classes == np.asarray(y)}


def flip_noise(correct_a: np.ndarray, correct_b: np.ndarray) -> Dict[str, float]:
    """How much of the difference in accuracy between two models on the same clips is noise of the
    clip set: the clips only model a gets right (n10) and only b gets right (n01), and the standard
    deviation of the accuracy difference they imply, sqrt(n01 + n10 - (n01 - n10)^2 / n) / n, in
    points (a paired count: what a perfect predictor of the drop would still miss by)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n, n10, n01 = len(a), int(np.sum(a & ~b)), int(np.sum(~a & b))
    sd = 100.0 * float(np.sqrt(max(n01 + n10 - (n01 - n10) ** 2 / n, 0.0))) / n if n else float("nan")
    return {"flips_lost": n10, "flips_gained": n01, "noise_sd": sd}


MAX_FIGURE_INCHES = 14     # the confusion figure's side, whatever the number of classes
MAX_ANNOTATED = 30         # counts are written into the cells up to this many classes
MAX_TICK_LABELS = 60       # class names on the axes up to this many classes


def plot_confusion(cm: List[List[int]], class_names: Sequence[str], path: str, title: str) -> str:
    """Save the confusion matrix (row-normalised colours) as a PNG. The picture is bounded whatever the
    number of classes: at most MAX_FIGURE_INCHES a side, counts written in up to MAX_ANNOTATED classes,
    class names up to MAX_TICK_LABELS (the matrix itself is in the summary either way)."""
    cm = np.asarray(cm)
    n = len(class_names)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(2.0 + 0.5 * n, MAX_FIGURE_INCHES)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= MAX_ANNOTATED:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
