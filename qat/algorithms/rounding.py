"""Rounding refinement: each weight's rounding (the grid point below or above it) is re-chosen so
that the quantized model's outputs on calibration clips match the float model's."""
from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.data.batches import shuffled_batches
from qat.layers.model import freeze_ranges, quantized_layers, quantized_weights
from qat.memo import derived
from qat.metrics import predict
from qat.training.distill import soft_cross_entropy
from qat.training.fit import set_seed


def refine_rounding(float_model, qmodel, x_calib: np.ndarray, epochs: int, learning_rate: float,
                    seed: int, batch_size: int = 64) -> Dict[str, float]:
    """Choose, for every quantized weight, between the grid point below and the one above its float
    value so that the quantized model's outputs on calibration clips match the float model's:
    AdaRound's search space (Nagel et al. 2020), searched end to end by straight-through gradients of
    the KL to the float model's outputs (qat.training.distill.soft_cross_entropy) with each shadow
    weight kept inside the two grid cells around its float value. Label-free; ranges stay frozen. The refined rounding is kept only if
    it lowers the calibration KL (at 8 bits the grid is finer than the optimiser's steps and it does
    not). Weights already on the grid (GPTQ's output) stay where they are. Returns the share of
    weights whose code changed, the calibration KL before / after and whether the result was kept."""
    freeze_ranges(qmodel)
    before = quantized_weights(qmodel)
    boxes = []
    for layer in quantized_layers(qmodel):
        for name, q in layer.weight_quantizers.items():
            var = getattr(layer, name)
            scale, zp = (t.numpy() for t in q.scale_zero_point(var))
            floor = np.floor(var.numpy() / scale + zp)
            margin = 1e-3      # stay strictly inside, so a shadow weight never sits on a rounding tie
            boxes.append((var, scale * (floor - zp - 0.5 + margin), scale * (floor + 1 - zp + 0.5 - margin)))

    class KeepInBoxes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for var, lo, hi in boxes:
                var.assign(tf.clip_by_value(var, lo, hi))

    teacher = derived(float_model, "outputs", lambda: predict(float_model, x_calib), x_calib)   # the targets
    kl = lambda: float(soft_cross_entropy(tf.constant(teacher), predict(qmodel, x_calib), 1.0))
    start, start_weights = kl(), qmodel.get_weights()
    set_seed(seed)
    qmodel.compile(optimizer=keras.optimizers.Adam(learning_rate),
                   loss=lambda target, probs: soft_cross_entropy(target, probs, 1.0))
    data, steps = shuffled_batches(x_calib, teacher, batch_size, epochs)
    qmodel.fit(data, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[KeepInBoxes()])
    end = kl()
    if not end < start:
        qmodel.set_weights(start_weights)
    after = quantized_weights(qmodel)
    changed = sum(int(np.sum(after[k].codes != before[k].codes)) for k in before)
    total = sum(v.codes.size for v in before.values())
    return {"changed": changed / total, "kl_before": start, "kl_after": end, "kept": bool(end < start)}
