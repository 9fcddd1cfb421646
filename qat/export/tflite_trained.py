"""The trained TFLite int8 twin (qat.layers.tflite_int8) written as full-integer .tflite files that the
stock interpreter runs, holding the trained weights and ranges.

How: the TFLite converter converts a float Keras model of the twin's topology (batch 1, the twin's
dequantized weights) to full integer int8 with a few calibration clips. That gives the builtin ops
(QUANTIZE, UNIDIRECTIONAL_SEQUENCE_LSTM, RESHAPE, FULLY_CONNECTED, SOFTMAX, DEQUANTIZE) and their
tensors. Then every number the model's arithmetic reads is overwritten in the flatbuffer (TFLite's
own schema objects, tensorflow.lite.tools.flatbuffer_utils): the weight buffers become the trained
int8 codes with the trained per-gate (LSTM) and per-channel (Dense) scales, the biases int32 codes at
input scale x weight scale, and the quantization parameters of the input, the hidden / output state
(and the LSTM's hidden intermediate, which the kernel reads for it), the cell state (2^E) and the
logits become the twin's calibrated ones. The converter's own calibration is thereby discarded.

Two layouts: the whole clip in one invoke (`trained_tflite`), and streaming (`streaming_tflite`):
a file that takes one frame per invoke and keeps h and c in the LSTM's variable tensors between
invokes (reset them for a new clip), plus the head (Flatten -> Dense -> softmax) run once per clip on
the int8 hidden states it returned. `TFLiteStream` runs the pair; its predictions over a clip equal
the whole-clip file's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from qat.export.tflite import interpreter
from qat.layers.model import quantized_weights
from qat.layers.tflite_int8 import round_half_away, twin_layers
from qat.runtime import stderr_silenced

OPS = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
TYPES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
PASS_THROUGH = {"RESHAPE", "STRIDED_SLICE", "SQUEEZE", "SLICE"}   # int8 ops that keep their input's grid
EDGES = {"QUANTIZE", "DEQUANTIZE"}                              # float <-> int8 at the model's input / output
# UNIDIRECTIONAL_SEQUENCE_LSTM operands (tensorflow/lite/kernels/lstm_shared.h)
LSTM_INPUT_WEIGHTS, LSTM_RECURRENT_WEIGHTS, LSTM_BIASES = (1, 2, 3, 4), (5, 6, 7, 8), (12, 13, 14, 15)
LSTM_OUTPUT_STATE, LSTM_CELL_STATE, LSTM_HIDDEN_INTERMEDIATE = 18, 19, 4


@dataclass(frozen=True)
class Grid:
    """An int8 (or int16) tensor's quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass
class TfliteWeights:
    """What the file holds, read from a calibrated, frozen twin: codes and scales as TFLite stores
    them (LSTM gate matrices [U, F] and [U, U], FULLY_CONNECTED [out, in])."""

    x: Grid
    h: Grid
    cell_exponent: int
    y: Grid
    input_codes: List[np.ndarray]        # per gate i, f, c, o: int8 [U, F]
    input_scales: List[float]
    recurrent_codes: List[np.ndarray]    # int8 [U, U]
    recurrent_scales: List[float]
    lstm_bias: List[np.ndarray]          # int32 [U] at x.scale * input_scales[g]
    dense_codes: np.ndarray              # int8 [out, in]
    dense_scales: np.ndarray             # float32 [out]
    dense_bias: np.ndarray               # int32 [out] at h.scale * dense_scales


def _grid(quantizer) -> Grid:
    """The int8 grid of a calibrated asymmetric 8-bit activation quantizer (codes 0..255 there)."""
    _, scale, zp = quantizer.params()
    return Grid(float(np.reshape(scale.numpy(), [])), int(np.reshape(zp.numpy(), [])) - 128)


def _bias_codes(bias: np.ndarray, acc_scale: np.ndarray) -> np.ndarray:
    """int32 codes of a bias at the accumulator scale, rounded as the twin rounds it."""
    q = round_half_away(tf.constant(np.asarray(bias, np.float32)) / tf.constant(np.asarray(acc_scale, np.float32)))
    return q.numpy().astype(np.int64).clip(-2 ** 31, 2 ** 31 - 1).astype(np.int32)


def twin_weights(twin) -> TfliteWeights:
    """The codes, scales and grids of a calibrated twin (freeze its ranges first)."""
    lstm, dense = twin_layers(twin)
    q = quantized_weights(twin)
    u = lstm.units
    x, h = _grid(lstm.activation_quantizers["input"]), _grid(lstm.activation_quantizers["state_h"])
    k, r, d = q[f"{lstm.name}/kernel"], q[f"{lstm.name}/recurrent_kernel"], q[f"{dense.name}/kernel"]
    gates = range(4)
    input_scales = [np.float32(k.scale.reshape(-1)[g * u]) for g in gates]
    bias = lstm.bias.numpy()
    lstm_bias = [_bias_codes(bias[g * u:(g + 1) * u], np.float32(x.scale) * input_scales[g]) for g in gates]
    dense_scales = d.scale.reshape(-1).astype(np.float32)
    return TfliteWeights(
        x=x, h=h, cell_exponent=lstm.cell_exponent(), y=_grid(dense.activation_quantizers["output"]),
        input_codes=[k.codes[:, g * u:(g + 1) * u].T.astype(np.int8) for g in gates],
        input_scales=[float(s) for s in input_scales],
        recurrent_codes=[r.codes[:, g * u:(g + 1) * u].T.astype(np.int8) for g in gates],
        recurrent_scales=[float(r.scale.reshape(-1)[g * u]) for g in gates],
        lstm_bias=lstm_bias, dense_codes=d.codes.T.astype(np.int8), dense_scales=dense_scales,
        dense_bias=_bias_codes(dense.bias.numpy(), np.float32(h.scale) * dense_scales))


# ----------------------------------------------------------------------------------- conversion

def _float_copy(twin, lstm_part: bool, head_part: bool, frames: Optional[int] = None):
    """A float Keras model (batch 1) of the twin's topology or a part of it, with its dequantized
    weights: what the converter turns into builtin ops."""
    lstm, dense = twin_layers(twin)
    q = quantized_weights(twin)
    shape = twin.input_shape[1:]
    if lstm_part:
        inp = keras.Input(batch_shape=(1, frames or shape[0], shape[1]))
        x = keras.layers.LSTM(lstm.units, return_sequences=lstm.return_sequences or not head_part, name=lstm.name)(inp)
    else:
        inp = x = keras.Input(batch_shape=(1, *lstm.compute_output_shape((None, *shape))[1:]))
    if head_part:
        if len(x.shape) == 3:
            x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(dense.units, activation=dense.activation, name=dense.name)(x)
    model = keras.Model(inp, x)
    if lstm_part:
        model.get_layer(lstm.name).set_weights([q[f"{lstm.name}/kernel"].values, q[f"{lstm.name}/recurrent_kernel"].values,
                                                lstm.bias.numpy()])
    if head_part:
        model.get_layer(dense.name).set_weights([q[f"{dense.name}/kernel"].values, dense.bias.numpy()])
    return model


def _convert(model, representative: np.ndarray, int8_input: bool, int8_output: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.asarray(r[None], np.float32)] for r in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_input:
        converter.inference_input_type = tf.int8
    if int8_output:
        converter.inference_output_type = tf.int8
    with stderr_silenced(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


# ----------------------------------------------------------------------------------- the flatbuffer

class _Patch:
    """Sets tensors' quantization and constant data in one subgraph of a ModelT."""

    def __init__(self, model):
        self.model, self.graph = model, model.subgraphs[0]
        self.grids: Dict[int, Grid] = {}

    def op_name(self, op) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        return OPS.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))

    def quantize(self, index: int, scales, zero_points, dimension: int = 0) -> None:
        params = schema.QuantizationParametersT()
        params.scale = [float(s) for s in np.atleast_1d(scales)]
        params.zeroPoint = [int(z) for z in np.atleast_1d(zero_points)]
        params.quantizedDimension = int(dimension)
        self.graph.tensors[index].quantization = params

    def grid(self, index: int, grid: Grid) -> None:
        self.grids[index] = grid
        self.quantize(index, grid.scale, grid.zero_point)

    def constant(self, index: int, values: np.ndarray, scales, dimension: int = 0) -> None:
        """Write `values` (int8 / int32, the tensor's shape) into a buffer of the tensor's own."""
        tensor = self.graph.tensors[index]
        if list(tensor.shape) != list(values.shape):
            raise ValueError(f"tensor {tensor.name!r} has shape {list(tensor.shape)}, the trained values "
                             f"{list(values.shape)}")
        expected = {np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32"}[values.dtype]
        if TYPES[tensor.type] != expected:
            raise ValueError(f"tensor {tensor.name!r} is {TYPES[tensor.type]}, the trained values {expected}")
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
        self.model.buffers.append(buffer)
        tensor.buffer = len(self.model.buffers) - 1
        self.quantize(index, scales, np.zeros(np.size(scales), np.int64), dimension)

    def drop_unused_buffers(self) -> None:
        used = {t.buffer for g in self.model.subgraphs for t in g.tensors}
        for i, buffer in enumerate(self.model.buffers):
            if i and i not in used:
                buffer.data = None


def _set_lstm(p: _Patch, op, w: TfliteWeights) -> None:
    inputs = op.inputs
    p.grid(inputs[0], w.x)
    for g in range(4):
        p.constant(inputs[LSTM_INPUT_WEIGHTS[g]], w.input_codes[g], w.input_scales[g])
        p.constant(inputs[LSTM_RECURRENT_WEIGHTS[g]], w.recurrent_codes[g], w.recurrent_scales[g])
        p.constant(inputs[LSTM_BIASES[g]], w.lstm_bias[g], w.x.scale * w.input_scales[g])
    for index in (inputs[LSTM_OUTPUT_STATE], op.outputs[0], op.intermediates[LSTM_HIDDEN_INTERMEDIATE]):
        p.grid(index, w.h)
    p.quantize(inputs[LSTM_CELL_STATE], 2.0 ** w.cell_exponent, 0)


def _set_dense(p: _Patch, op, w: TfliteWeights) -> None:
    p.grid(op.inputs[0], w.h)
    p.constant(op.inputs[1], w.dense_codes, w.dense_scales, 0)
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        raise ValueError("the converter dropped the Dense bias (it was all zeros): nothing to hold the trained bias")
    p.constant(op.inputs[2], w.dense_bias, w.h.scale * w.dense_scales, 0)
    p.grid(op.outputs[0], w.y)


def patched(flatbuffer: bytes, w: TfliteWeights) -> bytes:
    """The converter's file with the trained codes, scales and grids of `w` (module doc)."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    p = _Patch(model)
    names = [p.op_name(op) for op in p.graph.operators]
    unexpected = sorted(set(names) - {"UNIDIRECTIONAL_SEQUENCE_LSTM", "FULLY_CONNECTED", "SOFTMAX"} - PASS_THROUGH - EDGES)
    if unexpected:
        raise ValueError(f"the converted model has ops {unexpected}: expected an LSTM, FULLY_CONNECTED and "
                         f"SOFTMAX with {sorted(PASS_THROUGH | EDGES)}")
    for op, name in zip(p.graph.operators, names):
        if name == "UNIDIRECTIONAL_SEQUENCE_LSTM":
            _set_lstm(p, op, w)
        elif name == "FULLY_CONNECTED":
            _set_dense(p, op, w)
    for _ in range(len(names)):     # grids through reshapes, both ways, until nothing changes
        for op, name in zip(p.graph.operators, names):
            if name in PASS_THROUGH:
                a, b = op.inputs[0], op.outputs[0]
                if a in p.grids and b not in p.grids:
                    p.grid(b, p.grids[a])
                elif b in p.grids and a not in p.grids:
                    p.grid(a, p.grids[b])
    p.drop_unused_buffers()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def float_ops(flatbuffer: bytes) -> List[str]:
    """Ops of a file that compute in float (any float32 operand) other than the QUANTIZE of a float
    input and the DEQUANTIZE of a float output: empty for a full-integer file."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    p = _Patch(model)
    out = []
    for op in p.graph.operators:
        name = p.op_name(op)
        if name in EDGES:
            continue
        operands = [i for i in list(op.inputs) + list(op.outputs) if i >= 0]
        if any(TYPES[p.graph.tensors[i].type] in ("FLOAT32", "FLOAT16") for i in operands):
            out.append(name)
    return out


def check_integer_only(flatbuffer: bytes, what: str) -> None:
    """Raise if the file falls back to float ops."""
    bad = float_ops(flatbuffer)
    if bad:
        raise ValueError(f"the {what} computes in float ({', '.join(bad)}): expected full-integer int8 ops only")


def trained_tflite(twin, representative: np.ndarray, int8_io: bool = False) -> bytes:
    """The whole-clip full-integer file of a calibrated, frozen twin (float input and output, int8
    inside; `int8_io`: int8 input features on the twin's input grid and int8 probabilities): one
    invoke per clip, reset the variables between clips."""
    w = twin_weights(twin)
    flat = patched(_convert(_float_copy(twin, True, True), representative, int8_io, int8_io), w)
    check_integer_only(flat, "TFLite file")
    return flat


def streaming_tflite(twin, representative: np.ndarray) -> Tuple[bytes, bytes]:
    """(the streaming LSTM file: one float frame in, the int8 hidden state out, h and c kept in
    variable tensors; the head file: the int8 hidden states of the clip in, the output out)."""
    w = twin_weights(twin)
    lstm, _ = twin_layers(twin)
    frames = representative[:, :1] if len(representative) else representative
    stream = patched(_convert(_float_copy(twin, True, False, frames=1), frames, False, True), w)
    head_model = _float_copy(twin, False, True)
    h = keras.Model(twin.input, lstm.output)(np.asarray(representative, np.float32), training=False).numpy()
    head = patched(_convert(head_model, h, True, False), w)
    for flat, what in ((stream, "streaming file"), (head, "head file")):
        check_integer_only(flat, what)
    return stream, head


class TFLiteStream:
    """The streaming pair run frame by frame: `predict(x)` resets the LSTM's variables, invokes the
    streaming file once per frame, then the head on the clip's int8 hidden states."""

    def __init__(self, stream: bytes, head: bytes, return_sequences: bool):
        self.stream, self.head = interpreter(stream), interpreter(head)
        self.return_sequences = return_sequences
        self.s_in, self.s_out = self.stream.get_input_details()[0], self.stream.get_output_details()[0]
        self.h_in, self.h_out = self.head.get_input_details()[0], self.head.get_output_details()[0]

    def hidden_states(self, clip: np.ndarray) -> np.ndarray:
        """The int8 hidden state after each frame of one clip [frames, features], from zero states."""
        self.stream.reset_all_variables()
        hs = []
        for frame in np.asarray(clip, np.float32):
            self.stream.set_tensor(self.s_in["index"], frame[None, None])
            self.stream.invoke()
            hs.append(self.stream.get_tensor(self.s_out["index"])[0, 0])
        return np.stack(hs)

    def predict(self, x: np.ndarray, batch_size: int = 1, verbose: int = 0) -> np.ndarray:
        outputs = []
        for clip in x:
            hs = self.hidden_states(clip)
            h = hs[None] if self.return_sequences else hs[-1:]
            self.head.set_tensor(self.h_in["index"], h.astype(np.int8))
            self.head.invoke()
            outputs.append(self.head.get_tensor(self.h_out["index"])[0])
        return np.stack(outputs)
