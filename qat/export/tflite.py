"""TFLite flatbuffers of a float model (dynamic range, float16, full integer int8), evaluated through
the stock interpreter clip by clip.

The converter and the interpreter print lines that say nothing about the result, and they are
silenced here: the converter's C++ summary line ("fully_quantize: 0, inference_type: ..."), the warning that float input statistics were not
given (the model has float input), and "Created TensorFlow Lite XNNPACK delegate for CPU". The
interpreter is LiteRT's (ai_edge_litert). Conversion errors are raised as
exceptions and are not affected."""
from __future__ import annotations

import time
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter

from qat.checks import OneOf
from qat.errors import DataError
from qat.runtime import stderr_silenced

TFLITE_MODES = ("dynamic", "float16", "int8")


def batch1_copy(model, unroll_gru: bool = False):
    """The same model with a fixed batch of 1: the batch-None LSTM needs Flex ops that the stock
    TFLite interpreter lacks, the batch-1 one converts to the builtin fused LSTM. TFLite has no GRU
    op: a GRU converts to a while loop of builtin ops, or with `unroll_gru` to its time steps
    written out (the full-integer converter of TF 2.21 crashes on the GRU's loop)."""
    def clone(layer):
        config = layer.get_config()
        if unroll_gru and type(layer) is keras.layers.GRU:
            config["unroll"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, input_tensors=keras.Input(batch_shape=(1, *model.input_shape[1:])),
                                    clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def to_tflite(model, mode: str, representative: Optional[np.ndarray] = None, int8_io: bool = False) -> bytes:
    """Convert a float Keras model: `dynamic` (int8 weights, float activations), `float16`, or `int8`
    (full integer with a representative dataset; `int8_io` makes input and output int8 too)."""
    OneOf(TFLITE_MODES)("mode", mode)
    converter = tf.lite.TFLiteConverter.from_keras_model(batch1_copy(model, unroll_gru=mode == "int8"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None or len(representative) == 0:
            raise DataError("TFLite int8 needs a representative dataset: expected some training clips")
        converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    with stderr_silenced(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def interpreter(flatbuffer: bytes):
    """LiteRT's interpreter (ai_edge_litert, the runtime TFLite moved to) for a flatbuffer, tensors
    allocated."""
    with stderr_silenced():
        runner = Interpreter(model_content=flatbuffer)
        runner.allocate_tensors()
    return runner


class TFLiteModel:
    """A TFLite flatbuffer behind a Keras-like `predict`, one clip at a time, with the interpreter's
    variables reset before every clip (otherwise the fused LSTM carries its state across clips)."""

    def __init__(self, flatbuffer: bytes):
        self.flatbuffer = flatbuffer
        self.interpreter = interpreter(flatbuffer)
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.latencies_ms = []

    @property
    def size_bytes(self) -> int:
        return len(self.flatbuffer)

    def _io(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        if self.inp["dtype"] == np.int8:
            x = np.clip(np.round(x / scale + zero), -128, 127)
        return x.astype(self.inp["dtype"])

    def predict(self, x: np.ndarray, batch_size: int = 1, verbose: int = 0) -> np.ndarray:
        outputs = []
        for clip in x:
            self.interpreter.reset_all_variables()
            start = time.perf_counter()
            self.interpreter.set_tensor(self.inp["index"], self._io(clip[None]))
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.out["index"])
            self.latencies_ms.append(1000 * (time.perf_counter() - start))
            if self.out["dtype"] == np.int8:
                scale, zero = self.out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            outputs.append(y[0])
        return np.stack(outputs)


def tflite_model(model, mode: str, representative: Optional[np.ndarray] = None,
                 int8_io: bool = False) -> Tuple[TFLiteModel, Dict[str, float]]:
    """Convert and wrap; returns the model and its facts (size, conversion time)."""
    start = time.perf_counter()
    flat = to_tflite(model, mode, representative, int8_io)
    return TFLiteModel(flat), {"size_bytes": len(flat), "convert_s": time.perf_counter() - start}
