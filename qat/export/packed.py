"""Packed b-bit weight files: the true size of a b-bit model, and the model read back from its file
alone."""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from qat.errors import DataError
from qat.io import atomic_path
from qat.layers.model import (QuantConfig, freeze_ranges, integer_layout, leaf_layers, quantize_model, quantized_layers,
                              quantized_weights)
from qat.quant.scale_codes import decode_scales, encode_scales

MAGIC = b"QLSTMPK3"
OLDER = (b"QLSTMPK1", b"QLSTMPK2")   # formats this version no longer reads


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


def _packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


@dataclass(frozen=True)
class PackedTensor:
    """A weight read back from a packed file: integer codes, scale, zero point, dequantized values."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    values: np.ndarray


def _scale_payload(scale, spec) -> Tuple[dict, bytes]:
    """Header fields and bytes of a tensor's scales: float32, or `spec.scale_bits`-bit codes (the
    scales must already be on that format: a frozen quantizer snaps them there)."""
    scale = np.asarray(scale, np.float32)
    if spec.scale_bits is None:
        return {}, scale.tobytes()
    coded = encode_scales(scale, spec.scale_bits)
    if not np.array_equal(coded.decode(), scale):
        raise ValueError(f"scales are not on the {spec.scale_bits}-bit scale format: freeze the model "
                         "(qat.layers.model.freeze_ranges) before writing it")
    return ({"scale_bits": spec.scale_bits, "scale_top": coded.top, "scale_exp_bits": coded.exp_bits},
            pack_bits(coded.codes, spec.scale_bits))


def _zero_point_payload(zero_point, spec) -> Tuple[dict, bytes]:
    """Header fields and bytes of a tensor's zero points: none for the symmetric scheme, else small
    integers, offset by their minimum and packed at the width their spread needs."""
    if spec.scheme == "symmetric":
        return {}, b""
    zp = np.asarray(zero_point, np.float32)
    if not np.array_equal(zp, np.round(zp)) or zp.min() < spec.qmin or zp.max() > spec.qmax:
        raise ValueError(f"zero points must be integers in [{spec.qmin}, {spec.qmax}] to be packed")
    zp = zp.astype(np.int64)
    low = int(zp.min())
    width = int(zp.max() - low).bit_length()
    return {"zp_min": low, "zp_bits": width}, pack_bits(zp - low, width) if width else b""


def write_packed(path: str, quantized: Dict[str, object], float_tensors: Dict[str, np.ndarray],
                 meta: Optional[dict] = None) -> int:
    """Write quantized weights (name -> object with codes, scale, zero_point, spec; see
    qat.layers.model.quantized_weights) packed at their bit-width, plus the tensors left in float32
    (e.g. normalisation statistics), into one file. Written atomically. Returns its size in bytes.

    Layout: MAGIC, u32 header length, the header (zlib-compressed JSON: the tensors and `meta`, e.g.
    the integer layout of qat.layers.model.integer_layout), then the payloads at the offsets it
    lists. A quantized tensor's payload: its scales (one per quantization group: float32, or
    `scale_bits`-bit codes of qat.quant.scale_codes, whose format parameters are in the header), its
    zero points (absent for the symmetric scheme, where they are 0; else offset by their minimum and
    packed at the width their spread needs) and its codes, packed at the tensor's bit-width offset by
    qmin so they are unsigned. What the model computes with is what the file decodes to, exactly.
    """
    header, payloads, offset = {"tensors": [], **({"meta": meta} if meta else {})}, [], 0

    def add(entry, blob):
        nonlocal offset
        header["tensors"].append({**entry, "offset": offset, "nbytes": len(blob)})
        payloads.append(blob)
        offset += len(blob)

    for name, q in quantized.items():
        spec = q.spec
        scale_fields, scale_blob = _scale_payload(q.scale, spec)
        zp_fields, zp_blob = _zero_point_payload(q.zero_point, spec)
        add({"name": name, "kind": "quantized", "shape": list(q.codes.shape), "bits": spec.bits,
             "qmin": spec.qmin, "scale_shape": list(np.shape(q.scale)), "scheme": spec.scheme,
             "granularity": spec.granularity, **scale_fields, **zp_fields},
            scale_blob + zp_blob + pack_bits(np.asarray(q.codes, np.int64) - spec.qmin, spec.bits))
    for name, value in float_tensors.items():
        value = np.asarray(value, np.float32)
        add({"name": name, "kind": "float32", "shape": list(value.shape)}, value.tobytes())
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
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
    return json.loads(zlib.decompress(raw[start: start + n])), memoryview(raw)[start + n:]


def _read_quantized(t: dict, blob: bytes) -> PackedTensor:
    k = int(np.prod(t["scale_shape"], dtype=np.int64))
    if "scale_bits" in t:
        end = _packed_size(k, t["scale_bits"])
        scale = decode_scales(unpack_bits(blob[:end], t["scale_bits"], k), t["scale_bits"], t["scale_top"],
                              t["scale_exp_bits"])
    else:
        end = 4 * k
        scale = np.frombuffer(blob[:end], np.float32)
    zero_point = np.zeros(k, np.float32)
    if t["scheme"] != "symmetric":
        width = t["zp_bits"]
        stored = unpack_bits(blob[end: end + _packed_size(k, width)], width, k) if width else np.zeros(k, np.uint32)
        zero_point = (stored.astype(np.int64) + t["zp_min"]).astype(np.float32)
        end += _packed_size(k, width)
    scale, zero_point = scale.reshape(t["scale_shape"]), zero_point.reshape(t["scale_shape"])
    count = int(np.prod(t["shape"], dtype=np.int64))
    codes = (unpack_bits(blob[end:], t["bits"], count).astype(np.int64) + t["qmin"]).reshape(t["shape"])
    values = (scale * (codes.astype(np.float32) - zero_point)).astype(np.float32)
    return PackedTensor(codes.astype(np.int32), scale, zero_point, t["bits"], values)


def read_packed(path: str) -> Dict[str, object]:
    """Read a file written by `write_packed`: name -> PackedTensor (quantized) or float32 array."""
    header, body = _read(path)
    out = {}
    for t in header["tensors"]:
        blob = bytes(body[t["offset"]: t["offset"] + t["nbytes"]])
        out[t["name"]] = np.frombuffer(blob, np.float32).reshape(t["shape"]) if t["kind"] == "float32" \
            else _read_quantized(t, blob)
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
