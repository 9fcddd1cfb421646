"""Packed b-bit weight files: the true size of a b-bit model, and the model read back from its file
alone."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from qat.errors import DataError
from qat.io import atomic_path
from qat.layers.model import (QuantConfig, freeze_ranges, integer_layout, leaf_layers, quantize_model, quantized_layers,
                              quantized_weights)

MAGIC = b"QLSTMPK2"
OLDER = (b"QLSTMPK1",)   # formats this version no longer reads


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


def _zero_point_bytes(zero_point, spec) -> bytes:
    if spec.scheme == "symmetric":
        return b""
    zp = np.asarray(zero_point, np.float32)
    if not np.array_equal(zp, np.round(zp)) or zp.min() < spec.qmin or zp.max() > spec.qmax:
        raise ValueError(f"zero points must be integers in [{spec.qmin}, {spec.qmax}] to be packed")
    return pack_bits(zp.astype(np.int64) - spec.qmin, spec.bits)


def write_packed(path: str, quantized: Dict[str, object], float_tensors: Dict[str, np.ndarray],
                 meta: Optional[dict] = None) -> int:
    """Write quantized weights (name -> object with codes, scale, zero_point, spec; see
    qat.layers.model.quantized_weights) packed at their bit-width, plus the tensors left in float32
    (e.g. normalisation statistics), into one file. Written atomically. Returns its size in bytes.

    Layout: MAGIC, u32 header length, JSON header (the tensors and `meta`, e.g. the integer layout
    of qat.layers.model.integer_layout), then the payloads at the offsets it lists. A
    quantized tensor's payload: its scales as float32 (one per quantization group, what the model
    computes with), its zero points (integers in [qmin, qmax]; absent for the symmetric scheme, where
    they are 0) and its codes, both packed at the tensor's bit-width offset by qmin so they are
    unsigned.
    """
    header, payloads, offset = {"tensors": [], **({"meta": meta} if meta else {})}, [], 0

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
            np.asarray(q.scale, np.float32).tobytes() + _zero_point_bytes(q.zero_point, spec)
            + pack_bits(np.asarray(q.codes, np.int64) - spec.qmin, spec.bits))
    for name, value in float_tensors.items():
        value = np.asarray(value, np.float32)
        add({"name": name, "kind": "float32", "shape": list(value.shape)}, value.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(MAGIC + struct.pack("<I", len(head)) + head)
        for blob in payloads:
            fh.write(blob)
    return path.stat().st_size


def read_packed_meta(path: str) -> dict:
    """The `meta` a file written by `write_packed` carries ({} if none)."""
    return _read(path)[0].get("meta", {})


def _read(path: str):
    """(header, payload bytes) of a packed file; DataError for a file of another kind or format."""
    raw = Path(path).read_bytes()
    if raw[: len(MAGIC)] in OLDER:
        raise DataError(f"{path} is a packed file of an older format ({raw[:len(MAGIC)]!r}): export it again with "
                        "this version (evaluate.py run_dir=<run> re-runs the recipe)")
    if raw[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a packed weight file (expected it to start with {MAGIC!r})")
    (n,) = struct.unpack("<I", raw[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(raw[start: start + n]), memoryview(raw)[start + n:]


def read_packed(path: str) -> Dict[str, object]:
    """Read a file written by `write_packed`: name -> PackedTensor (quantized) or float32 array."""
    header, body = _read(path)
    out = {}
    for t in header["tensors"]:
        blob = bytes(body[t["offset"]: t["offset"] + t["nbytes"]])
        if t["kind"] == "float32":
            out[t["name"]] = np.frombuffer(blob, np.float32).reshape(t["shape"])
            continue
        k = int(np.prod(t["scale_shape"], dtype=np.int64))
        scale = np.frombuffer(blob[: 4 * k], np.float32).reshape(t["scale_shape"])
        zp_bytes = 0 if t["scheme"] == "symmetric" else (k * t["bits"] + 7) // 8
        zero_point = np.zeros(k, np.float32) if not zp_bytes else \
            (unpack_bits(blob[4 * k: 4 * k + zp_bytes], t["bits"], k).astype(np.int64) + t["qmin"]).astype(np.float32)
        zero_point = zero_point.reshape(t["scale_shape"])
        count = int(np.prod(t["shape"], dtype=np.int64))
        codes = (unpack_bits(blob[4 * k + zp_bytes:], t["bits"], count).astype(np.int64)
                 + t["qmin"]).reshape(t["shape"])
        values = (scale * (codes.astype(np.float32) - zero_point)).astype(np.float32)
        out[t["name"]] = PackedTensor(codes.astype(np.int32), scale, zero_point, t["bits"], values)
    return out


# ------------------------------------------------------------------------ whole quantized models

def _weight_quantizers(qmodel):
    """(layer, weight name, quantizer) for every quantized weight."""
    return [(layer, name, q) for layer in quantized_layers(qmodel) for name, q in layer.weight_quantizers.items()]


def _stored_elsewhere(qmodel) -> set:
    """ids of the variables a packed file does not store as float32: the quantized weights (stored
    as codes) and their quantizers' range variables (the codes' scale / zero point replace them)."""
    return {id(v) for layer, name, q in _weight_quantizers(qmodel) for v in [getattr(layer, name), *q.variables]}


def _variable_key(layer, var) -> str:
    return f"{layer.name}/{var.name.split('/')[-1].split(':')[0]}"


def write_packed_model(qmodel, path: str) -> int:
    """The whole fake-quant model as a packed file: quantized weights at their bit-width, every other
    variable (float weights, normalisation statistics, quantizer ranges) as float32. Returns bytes."""
    quantized = quantized_weights(qmodel)
    skip = _stored_elsewhere(qmodel)
    floats = {_variable_key(layer, v): v.numpy() for layer in leaf_layers(qmodel) for v in layer.weights
              if id(v) not in skip}
    for layer in qmodel.layers:   # normalisation built from fixed statistics keeps them as constants
        if type(layer).__name__ == "Normalization" and not layer.weights:
            floats[f"{layer.name}/mean"] = np.asarray(layer.mean)
            floats[f"{layer.name}/variance"] = np.asarray(layer.variance)
    layout = integer_layout(qmodel)
    return write_packed(path, quantized, floats, {"integer": layout} if layout else None)


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
    for layer in leaf_layers(qmodel):
        for v in layer.weights:
            if id(v) not in skip:
                v.assign(tensors[_variable_key(layer, v)])


def model_from_packed(float_model, cfg: QuantConfig, path: str):
    """The fake-quant twin of `float_model` under `cfg`, ranges frozen, with every variable from the
    packed file: the model the file alone describes."""
    qmodel = quantize_model(float_model, cfg)
    freeze_ranges(qmodel)
    load_packed_model(qmodel, path)
    return qmodel
