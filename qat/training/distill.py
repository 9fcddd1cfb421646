"""Knowledge distillation for QAT: the quantized model learns from the float model's outputs as well
as from the labels.

Low-bit models lose most on the clips the float model is unsure of; the float model's soft outputs
say which classes those clips resemble, which hard labels do not (Hinton et al. 2015; Mishra & Marr,
"Apprentice", 2018, and Polino et al. 2018 for quantized students). The loss of a training batch is

    (1 - alpha) * CE(y, p_q) + alpha * T^2 * KL(softmax(log p_f / T) || softmax(log p_q / T))

with p_f, p_q the float (teacher) and quantized (student) class probabilities. The models end in a
softmax, so log-probabilities stand in for logits (they differ by a per-clip constant, which the
tempered softmax ignores). The teacher sees exactly the student's (augmented) batch.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


def soft_cross_entropy(teacher_probs: tf.Tensor, student_probs: tf.Tensor, temperature: float) -> tf.Tensor:
    """Mean over the batch of T^2 * KL(teacher_T || student_T), with both distributions softened by T."""
    eps = keras.backend.epsilon()
    t = tf.nn.softmax(tf.math.log(teacher_probs + eps) / temperature, axis=-1)
    log_s = tf.nn.log_softmax(tf.math.log(student_probs + eps) / temperature, axis=-1)
    kl = tf.reduce_sum(t * (tf.math.log(t + eps) - log_s), axis=-1)
    return temperature ** 2 * tf.reduce_mean(kl)


class Distiller(keras.Model):
    """Train `student` on (1 - alpha) * its compiled loss + alpha * the tempered KL to `teacher`.

    "loss" stays the student's cross-entropy with the labels (as in validation), "distill_loss" is the
    KL term. Validation, prediction and metrics are the student's; the teacher is never updated.
    Compile and fit this model in place of the student (its weights are the student's, then the
    teacher's). Class weights apply to the label term only."""

    def __init__(self, student: keras.Model, teacher: keras.Model, alpha: float, temperature: float = 1.0):
        super().__init__(name="distiller")
        self.student, self.teacher = student, teacher   # the teacher is run, never updated
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.distill_loss = keras.metrics.Mean(name="distill_loss")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_probs = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            probs = self.student(x, training=True)
            hard = self.compiled_loss(y, probs, sample_weight, regularization_losses=self.student.losses)
            soft = soft_cross_entropy(teacher_probs, probs, self.temperature)
            loss = (1.0 - self.alpha) * hard + self.alpha * soft
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.compiled_metrics.update_state(y, probs, sample_weight)
        self.distill_loss.update_state(soft)
        return {m.name: m.result() for m in self.metrics}


def distillation(teacher, alpha: float, temperature: float) -> dict:
    """The distillation arguments of qat.training.fit.fit: none when `alpha` is 0."""
    if alpha == 0:
        return {}
    return {"teacher": teacher, "distill": float(alpha), "temperature": float(temperature)}
