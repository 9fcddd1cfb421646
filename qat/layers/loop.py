"""The time loop of the quantized recurrent layers, written as Keras' own CPU recurrent kernels are
(`tf.while_loop` over a TensorArray of time steps, `parallel_iterations=32`)."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import tensorflow as tf


def time_loop(x, initial_states: Sequence[tf.Tensor], step: Callable, n_outputs: int) -> Tuple[tf.Tensor, ...]:
    """Run `step(x_t, states) -> (new states, outputs)` over time-major x [T, B, F] from
    `initial_states`; returns each of the `n_outputs` per-step outputs stacked over time, [T, ...]."""
    steps = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    inputs = tf.TensorArray(x.dtype, size=steps).unstack(x)
    outputs = tuple(tf.TensorArray(x.dtype, size=steps) for _ in range(n_outputs))

    def body(t, states, outputs):
        states, values = step(inputs.read(t), states)
        return t + 1, tuple(states), tuple(ta.write(t, v) for ta, v in zip(outputs, values))

    *_, outputs = tf.while_loop(lambda t, *_: t < steps, body, (0, tuple(initial_states), outputs),
                                parallel_iterations=32, maximum_iterations=steps)
    return tuple(ta.stack() for ta in outputs)
