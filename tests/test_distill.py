"""Knowledge distillation: the tempered KL against a numpy oracle, and a Distiller that trains only the
student, toward the teacher."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from qat.training.distill import Distiller, soft_cross_entropy


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_cross_entropy_matches_numpy_kl(temperature):
    rng = np.random.default_rng(0)
    t, s = _softmax(rng.normal(size=(16, 5)) * 3), _softmax(rng.normal(size=(16, 5)) * 3)
    tt, st = _softmax(np.log(t) / temperature), _softmax(np.log(s) / temperature)
    oracle = temperature ** 2 * np.mean(np.sum(tt * (np.log(tt) - np.log(st)), -1))
    got = float(soft_cross_entropy(tf.constant(t, tf.float32), tf.constant(s, tf.float32), temperature))
    assert got == pytest.approx(oracle, rel=1e-3, abs=1e-5)
    assert float(soft_cross_entropy(tf.constant(t, tf.float32), tf.constant(t, tf.float32), temperature)) \
        == pytest.approx(0.0, abs=1e-5)


def _mlp(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, "relu")(inputs)))


def test_distiller_trains_the_student_toward_the_teacher_and_leaves_the_teacher_alone():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    teacher, student = _mlp(0), _mlp(1)
    before = [w.copy() for w in teacher.get_weights()]
    gap = lambda: float(soft_cross_entropy(teacher(x), student(x), 1.0))
    start = gap()
    distiller = Distiller(student, teacher, alpha=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    hist = distiller.fit(x, y, epochs=20, batch_size=64, verbose=0, validation_data=(x, y))
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))
    assert gap() < 0.2 * start
    assert {"loss", "accuracy", "distill_loss", "val_accuracy"} <= set(hist.history)
    assert np.allclose(distiller.predict(x, verbose=0), student.predict(x, verbose=0))
