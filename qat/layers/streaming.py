"""Frame-by-frame inference with the recurrent state carried between calls: what a device runs.

`Streamer` takes a float model of `build_model` or its fake-quant twin (`quantize_model`), i.e.
front (Normalization, Dropout, and convolutions / pooling with valid padding over time, reshapes
that keep time free, batch norm, activations) -> recurrent layers (LSTM, GRU, QLSTM, QGRU) -> head
(Flatten, Dropout, Dense, ...), and runs it one frame at a time. The front keeps the last R frames
(R: its receptive field over time, 1 without convolutions) and runs on them every S frames (S: the
product of its time strides), which gives one time step of the recurrent input, as the whole-clip
front computes it; every recurrent layer then steps from its carried state (`QuantizedRNN.step`, or
the Keras cell of a float layer). The head runs on what the last recurrent layer has produced so
far: its whole output sequence (a Flatten head needs every step) or its latest output. Over a clip
this equals the whole-clip model (tests/test_streaming.py).

    streamer = Streamer(qmodel)
    streamer.reset(batch=1)
    for frame in clip:                  # [F] features of one frame
        h = streamer.push(frame[None])  # the top recurrent layer's output (None if the front waits for frames)
    probabilities = streamer.output()
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.model import RECURRENT
from qat.layers.recurrent import QuantizedRNN

TIME_LOCAL = (keras.layers.Normalization, keras.layers.Dropout, keras.layers.BatchNormalization, keras.layers.ReLU,
              keras.layers.Activation, keras.layers.Reshape)
WINDOWED = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.MaxPooling1D,
            keras.layers.MaxPooling2D, keras.layers.AveragePooling1D, keras.layers.AveragePooling2D)


def _recurrent(layer) -> bool:
    return isinstance(layer, QuantizedRNN) or type(layer) in RECURRENT


def time_window(front, model_name: str) -> tuple:
    """(receptive field R, stride S) over time of the layers before the recurrent stack; a ConfigError
    for a layer that is not time-local or windowed with valid padding."""
    field, stride = 1, 1
    for layer in front:
        if isinstance(layer, keras.layers.Reshape) and layer.target_shape[0] != -1:
            raise ConfigError(f"streaming needs reshapes that keep time free; '{layer.name}' of model '{model_name}' "
                              f"reshapes to {list(layer.target_shape)} (expected -1 first)")
        if isinstance(layer, TIME_LOCAL):
            continue
        if not isinstance(layer, WINDOWED) or layer.padding != "valid":
            raise ConfigError(f"streaming cannot run '{layer.name}' ({type(layer).__name__}) of model '{model_name}' "
                              "before the recurrent layers: expected Normalization, Dropout, BatchNormalization, "
                              "activations, reshapes and convolutions / pooling with padding='valid'")
        size = layer.kernel_size[0] * layer.dilation_rate[0] - layer.dilation_rate[0] + 1 \
            if hasattr(layer, "kernel_size") else layer.pool_size[0]
        field += (size - 1) * stride
        stride *= layer.strides[0]
    return field, stride


class Streamer:
    """A model run frame by frame (see the module doc)."""

    def __init__(self, model):
        layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        backwards = [l.name for l in layers if isinstance(l, keras.layers.Bidirectional) or getattr(l, "go_backwards", False)]
        if backwards:
            raise ConfigError(f"streaming cannot run {backwards} of model '{model.name}': a layer that reads the "
                              "clip backwards needs the whole clip before its first output")
        i = 0
        while i < len(layers) and not _recurrent(layers[i]) and not isinstance(layers[i], keras.layers.Wrapper):
            i += 1
        self.front = layers[:i]
        j = i
        while j < len(layers) and _recurrent(layers[j]):
            j += 1
        self.recurrent, self.head = layers[i:j], layers[j:]
        if not self.recurrent:
            where = layers[i].name if i < len(layers) else "the end"
            raise ConfigError(f"streaming needs a front then recurrent layers (LSTM, GRU or their quantized twins); "
                              f"model '{model.name}' has '{where}' there")
        self.field, self.stride = time_window(self.front, model.name)
        inner = [l.name for l in self.recurrent[:-1] if not l.return_sequences]
        later = [l.name for l in self.head if _recurrent(l) or isinstance(l, keras.layers.Wrapper)]
        if inner or later:
            raise ConfigError(f"streaming needs one stack of recurrent layers, each but the last returning "
                              f"sequences; model '{model.name}' has {inner + later}")
        self.sequence_head = self.recurrent[-1].return_sequences
        # calibrated quantized layers run the loop `call` runs (no pass-through selects)
        self._gated = [not l.calibrated() if isinstance(l, QuantizedRNN) else None for l in self.recurrent]
        self._frame = tf.function(self._frame_fn, reduce_retracing=True)
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Start a new clip (zero states) for `batch` streams."""
        self.states = tuple(self._initial(layer, batch) for layer in self.recurrent)
        self.outputs: List[tf.Tensor] = []
        self.window: List[np.ndarray] = []     # the last `field` frames
        self.frames = 0

    @staticmethod
    def _initial(layer, batch: int) -> tuple:
        if isinstance(layer, QuantizedRNN):
            return layer.initial_states(batch)
        return tuple(tf.zeros((batch, size), layer.compute_dtype) for size in tf.nest.flatten(layer.cell.state_size))

    def _frame_fn(self, window, states):
        h = window
        for layer in self.front:
            h = layer(h, training=False)
        h = h[:, 0]                      # the window gives one time step
        new = []
        for layer, state, gated in zip(self.recurrent, states, self._gated):
            if isinstance(layer, QuantizedRNN):
                h, state = layer.step(h, state, gated)
            else:
                h, state = layer.cell(h, list(state), training=False)
                state = tuple(tf.nest.flatten(state))
            new.append(state)
        return h, tuple(new)

    def push(self, frame) -> Optional[np.ndarray]:
        """One frame [batch, features]: the top recurrent layer's output for the step it completes
        [batch, units], or None while the front waits for more frames (its window or stride)."""
        self.window = (self.window + [np.asarray(frame, np.float32)])[-self.field:]
        self.frames += 1
        if self.frames < self.field or (self.frames - self.field) % self.stride:
            return None
        h, self.states = self._frame(tf.convert_to_tensor(np.stack(self.window, axis=1)), self.states)
        self.outputs.append(h)
        return h.numpy()

    def output(self) -> np.ndarray:
        """The model's output for the frames pushed since `reset`."""
        if not self.outputs:
            raise ConfigError("streaming output before any frame: push at least one frame after reset()")
        h = tf.stack(self.outputs, axis=1) if self.sequence_head else self.outputs[-1]
        for layer in self.head:
            h = layer(h, training=False)
        return h.numpy()

    def run(self, clips: np.ndarray) -> np.ndarray:
        """Whole clips [batch, frames, features] streamed frame by frame: the model's outputs."""
        clips = np.asarray(clips, np.float32)
        self.reset(len(clips))
        for t in range(clips.shape[1]):
            self.push(clips[:, t])
        return self.output()
