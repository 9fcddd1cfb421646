"""Deployable forms of a model: a packed b-bit weight file (the true size of a b-bit model) and
TFLite flatbuffers (dynamic range, float16, full integer int8) evaluated through tf.lite.Interpreter."""
from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from qat import ConfigError

MAGIC = b"QLSTMPK1"
TFLITE_MODES = ("dynamic", "float16", "int8")


# ------------------------------------------------------------------------------------ bit packing

def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes (< 2^bits) into bytes, `bits` bits each, least significant first."""
    codes = np.asarray(codes).astype(np.uint32).ravel()
    if codes.size and codes.max() >= 2 ** bits:
        raise ValueError(f"a code {codes.max()} does not fit in {bits} bits")
    planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` unsigned codes."""
    flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: count * bits]
    planes = flat.reshape(count, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint32)


@dataclass(frozen=True)
class PackedTensor:
    """A weight read back from a packed file: integer codes, scale, zero point, dequantized values."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    values: np.ndarray


def write_packed(path: str, quantized: Dict[str, object], float_tensors: Dict[str, np.ndarray]) -> int:
    """Write quantized weights (name -> object with codes, scale, zero_point, spec; see
    qat.quantize.quantized_weights) packed at their bit-width, plus the tensors left in float32
    (e.g. normalisation statistics), into one file. Written atomically. Returns its size in bytes.

    Layout: MAGIC, u32 header length, JSON header, then the payloads at the offsets it lists.
    Scales and zero points are float32, codes are stored offset by qmin so they are unsigned.
    """
    header, payloads, offset = {"tensors": []}, [], 0

    def add(entry, blob):
        nonlocal offset
        header["tensors"].append({**entry, "offset": offset, "nbytes": len(blob)})
        payloads.append(blob)
        offset += len(blob)

    for name, q in quantized.items():
        spec = q.spec
        add({"name": name, "kind": "quantized", "shape": list(q.codes.shape), "bits": spec.bits,
             "qmin": spec.qmin, "scale_shape": list(np.shape(q.scale)), "scheme": spec.scheme,
             "granularity": spec.granularity},
            np.asarray(q.scale, np.float32).tobytes() + np.asarray(q.zero_point, np.float32).tobytes()
            + pack_bits(np.asarray(q.codes, np.int64) - spec.qmin, spec.bits))
    for name, value in float_tensors.items():
        value = np.asarray(value, np.float32)
        add({"name": name, "kind": "float32", "shape": list(value.shape)}, value.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(MAGIC + struct.pack("<I", len(head)) + head)
        for blob in payloads:
            fh.write(blob)
    os.replace(tmp, path)
    return path.stat().st_size


def read_packed(path: str) -> Dict[str, object]:
    """Read a file written by `write_packed`: name -> PackedTensor (quantized) or float32 array."""
    raw = Path(path).read_bytes()
    if raw[: len(MAGIC)] != MAGIC:
        raise ConfigError(f"{path} is not a packed weight file (expected it to start with {MAGIC!r})")
    (n,) = struct.unpack("<I", raw[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(raw[start: start + n])
    body = memoryview(raw)[start + n:]
    out = {}
    for t in header["tensors"]:
        blob = bytes(body[t["offset"]: t["offset"] + t["nbytes"]])
        if t["kind"] == "float32":
            out[t["name"]] = np.frombuffer(blob, np.float32).reshape(t["shape"])
            continue
        k = int(np.prod(t["scale_shape"], dtype=np.int64))
        scale = np.frombuffer(blob[: 4 * k], np.float32).reshape(t["scale_shape"])
        zero_point = np.frombuffer(blob[4 * k: 8 * k], np.float32).reshape(t["scale_shape"])
        count = int(np.prod(t["shape"], dtype=np.int64))
        codes = (unpack_bits(blob[8 * k:], t["bits"], count).astype(np.int64) + t["qmin"]).reshape(t["shape"])
        values = (scale * (codes.astype(np.float32) - zero_point)).astype(np.float32)
        out[t["name"]] = PackedTensor(codes.astype(np.int32), scale, zero_point, t["bits"], values)
    return out


# ------------------------------------------------------------------------------------------ TFLite

def batch1_copy(model):
    """The same model with a fixed batch of 1: the batch-None LSTM needs Flex ops that the stock
    TFLite interpreter lacks, the batch-1 one converts to the builtin fused LSTM."""
    import tf_keras as keras

    copy = keras.models.clone_model(model, input_tensors=keras.Input(batch_shape=(1, *model.input_shape[1:])))
    copy.set_weights(model.get_weights())
    return copy


def to_tflite(model, mode: str, representative: Optional[np.ndarray] = None, int8_io: bool = False) -> bytes:
    """Convert a float Keras model: `dynamic` (int8 weights, float activations), `float16`, or `int8`
    (full integer with a representative dataset; `int8_io` makes input and output int8 too)."""
    import tensorflow as tf

    if mode not in TFLITE_MODES:
        raise ConfigError(f"TFLite mode {mode!r} is not allowed: expected one of {', '.join(TFLITE_MODES)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(batch1_copy(model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None or len(representative) == 0:
            raise ConfigError("TFLite int8 needs a representative dataset: expected some training clips")
        converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter.convert()


class TFLiteModel:
    """A TFLite flatbuffer behind a Keras-like `predict`, one clip at a time, with the interpreter's
    variables reset before every clip (otherwise the fused LSTM carries its state across clips)."""

    def __init__(self, flatbuffer: bytes):
        import tensorflow as tf

        self.flatbuffer = flatbuffer
        self.interpreter = tf.lite.Interpreter(model_content=flatbuffer)
        self.interpreter.allocate_tensors()
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


# ------------------------------------------------------------------------ whole quantized models

def _weight_quantizers(qmodel):
    """(layer, weight name, quantizer) for every quantized weight."""
    from qat.quantize import QUANTIZED_LAYERS

    return [(layer, name, q) for layer in qmodel.layers if isinstance(layer, QUANTIZED_LAYERS)
            for name, q in layer.weight_quantizers.items()]


def _stored_elsewhere(qmodel) -> set:
    """ids of the variables a packed file does not store as float32: the quantized weights (stored
    as codes) and their quantizers' range variables (the codes' scale / zero point replace them)."""
    return {id(v) for layer, name, q in _weight_quantizers(qmodel) for v in [getattr(layer, name), *q.variables]}


def _variable_key(layer, var) -> str:
    return f"{layer.name}/{var.name.split('/')[-1].split(':')[0]}"


def write_packed_model(qmodel, path: str) -> int:
    """The whole fake-quant model as a packed file: quantized weights at their bit-width, every other
    variable (float weights, normalisation statistics, quantizer ranges) as float32. Returns bytes."""
    from qat.quantize import quantized_weights

    quantized = quantized_weights(qmodel)
    skip = _stored_elsewhere(qmodel)
    floats = {_variable_key(layer, v): v.numpy() for layer in qmodel.layers for v in layer.weights
              if id(v) not in skip}
    for layer in qmodel.layers:   # normalisation built from fixed statistics keeps them as constants
        if type(layer).__name__ == "Normalization" and not layer.weights:
            floats[f"{layer.name}/mean"] = np.asarray(layer.mean)
            floats[f"{layer.name}/variance"] = np.asarray(layer.variance)
    return write_packed(path, quantized, floats)


def load_packed_model(qmodel, path: str) -> None:
    """Set a fake-quant model's variables from a packed file: quantized weights get their dequantized
    values and their quantizers the file's scale / zero point (frozen), all others their float32
    values (constants such as fixed normalisation statistics are part of the architecture)."""
    tensors = read_packed(path)
    skip = _stored_elsewhere(qmodel)
    for layer, name, q in _weight_quantizers(qmodel):
        t = tensors[f"{layer.name}/{name}"]
        getattr(layer, name).assign(t.values)
        q.load_frozen(t.scale, t.zero_point)
    for layer in qmodel.layers:
        for v in layer.weights:
            if id(v) not in skip:
                v.assign(tensors[_variable_key(layer, v)])
