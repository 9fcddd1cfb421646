"""The time loop shared by the quantized recurrent layers.

Written as Keras' own CPU recurrent kernels are (`tf.while_loop` over a TensorArray of time steps,
the input projection inside the step, `parallel_iterations=32`), and traced once per layer and
static configuration (`LoopCache`): a function shared by every layer of a process would keep every
model's traces alive, and one function traced for many configurations retraces on every switch.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Sequence, Tuple

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


class LoopCache:
    """One traced function per static configuration of a layer's loop (`key` is passed to `fn`)."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._traced: Dict[Hashable, Callable] = {}

    def __call__(self, key: Hashable) -> Callable:
        traced = self._traced.get(key)
        if traced is None:
            fn = self._fn
            traced = tf.function(lambda *args: fn(*args, key), autograph=False, reduce_retracing=True)
            self._traced[key] = traced
        return traced
