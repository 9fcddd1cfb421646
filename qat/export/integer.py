"""Integer-only inference of an integer-mode model (qat.layers.integer) from its packed file alone:
the numpy reference of the integer kernel, the int8 input features it runs on, and the cost figures
a device engineer reads (flash, RAM, multiply-accumulates by operand widths).

`IntegerModel.load(packed_file).run(x8)` takes int8 features [N, T, F] and gives int32 logits with
integer arithmetic only (qat.quant.integer); the C kernel (qat.export.c_source) runs the same
program on the same constants (`IntegerModel` holds them as the C export writes them), and the
integer-mode fake-quant model computes the same integers (`integer_summary` checks all of it).
The first layer's input zero point is folded into its bias (bias - z * column sums), as TFLite does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import tf_keras as keras

from qat.errors import DataError
from qat.export.packed import read_packed, read_packed_meta
from qat.layers.model import find_layer, input_tap
from qat.metrics import predict_classes
from qat.quant import integer as iq
from qat.quant.reference import qparams
from qat.quant.spec import QuantSpec

BATCH = 256


@dataclass
class IntegerLstm:
    """One LSTM's integer constants (int64 arrays)."""

    name: str
    units: int
    act_bits: int
    state_bits: int
    weight_bits: Tuple[int, int]      # kernel, recurrent kernel
    kernel: np.ndarray                # [F, 4U] codes
    recurrent: np.ndarray             # [U, 4U] codes
    bias: np.ndarray                  # [4U] int32 at the input accumulator's scale, input zero point folded in
    m_x: np.ndarray                   # [4U] or [1]: input accumulator -> Q3.12
    n_x: np.ndarray
    m_h: np.ndarray                   # recurrent accumulator -> Q3.12
    n_h: np.ndarray
    cell_exponent: int                # the cell state's scale is 2^cell_exponent
    return_sequences: bool

    def run(self, x: np.ndarray) -> np.ndarray:
        """Codes [N, T, F] (int) -> hidden-state codes [N, T, U] (int64)."""
        a, e = self.act_bits, self.cell_exponent
        sig, tanh = iq.sigmoid_table(a).astype(np.int64), iq.tanh_table(a).astype(np.int64)
        c_lo, c_hi = iq.signed_range(self.state_bits)
        h_lo, h_hi = iq.symmetric_range(a)
        x = np.asarray(x, np.int64)
        zx = iq.saturate(iq.requantize(x @ self.kernel + self.bias, self.m_x, self.n_x), *iq.INT16)
        n, u = x.shape[0], self.units
        h, c, out = np.zeros((n, u), np.int64), np.zeros((n, u), np.int64), []
        for t in range(x.shape[1]):
            zh = iq.saturate(iq.requantize(h @ self.recurrent, self.m_h, self.n_h), *iq.INT16)
            idx = iq.table_index(iq.saturate(zx[:, t] + zh, *iq.INT16))
            i, f, g, o = sig[idx[:, :u]], sig[idx[:, u:2 * u]], tanh[idx[:, 2 * u:3 * u]], sig[idx[:, 3 * u:]]
            c = iq.saturate(iq.shift_round(f * c, a) + iq.shift_round(i * g, e + 2 * a - 1), c_lo, c_hi)
            c12 = iq.saturate(iq.shift_round(c, -(e + iq.GATE_FRAC)), *iq.INT16)
            h = iq.saturate(iq.shift_round(o * tanh[iq.table_index(c12)], a), h_lo, h_hi)
            out.append(h)
        return np.stack(out, 1)


@dataclass
class IntegerGru:
    """One GRU's integer constants (Keras' reset_after=True; int64 arrays)."""

    name: str
    units: int
    act_bits: int
    weight_bits: Tuple[int, int]
    kernel: np.ndarray                # [F, 3U] codes
    recurrent: np.ndarray             # [U, 3U] codes
    bias: np.ndarray                  # [3U] int32 at the input accumulator's scale, input zero point folded in
    recurrent_bias: np.ndarray        # [3U] int32 at the recurrent accumulator's scale
    m_x: np.ndarray
    n_x: np.ndarray
    m_h: np.ndarray
    n_h: np.ndarray
    return_sequences: bool

    def run(self, x: np.ndarray) -> np.ndarray:
        """Codes [N, T, F] (int) -> hidden-state codes [N, T, U] (int64)."""
        a, u = self.act_bits, self.units
        sig, tanh = iq.sigmoid_table(a).astype(np.int64), iq.tanh_table(a).astype(np.int64)
        h_lo, h_hi = iq.symmetric_range(a)
        x = np.asarray(x, np.int64)
        zx = iq.saturate(iq.requantize(x @ self.kernel + self.bias, self.m_x, self.n_x), *iq.INT16)
        h, out = np.zeros((x.shape[0], u), np.int64), []
        for t in range(x.shape[1]):
            zh = iq.saturate(iq.requantize(h @ self.recurrent + self.recurrent_bias, self.m_h, self.n_h), *iq.INT16)
            zr = sig[iq.table_index(iq.saturate(zx[:, t, :2 * u] + zh[:, :2 * u], *iq.INT16))]
            z, r = zr[:, :u], zr[:, u:]
            n = tanh[iq.table_index(iq.saturate(zx[:, t, 2 * u:] + iq.shift_round(r * zh[:, 2 * u:], a), *iq.INT16))]
            h = iq.saturate(n + iq.shift_round(z * (h - n), a), h_lo, h_hi)
            out.append(h)
        return np.stack(out, 1)


@dataclass
class IntegerDense:
    """The classifier's integer constants: int32 logits = requant(X W + bias) per unit."""

    name: str
    units: int
    weight_bits: int
    kernel: np.ndarray                # [F, units] codes
    bias: np.ndarray                  # [units] int32
    m: np.ndarray
    n: np.ndarray
    logit_scale: float                # real logit = int logit * logit_scale

    def run(self, x: np.ndarray) -> np.ndarray:
        return iq.requantize(np.asarray(x, np.int64) @ self.kernel + self.bias, self.m, self.n)


@dataclass
class IntegerModel:
    """An integer-mode model as integer constants: input grid, recurrent layers (IntegerLstm /
    IntegerGru, bottom first), classifier (see module doc)."""

    input_shape: Tuple[int, int]
    input_bits: int
    input_scale: float                # real input = input_scale * (x8 - input_zero_point)
    input_zero_point: int             # on the int8 grid of the features (q - 2^(a-1))
    recurrent: List[Any]
    dense: IntegerDense
    weight_code_bytes: int = 0        # the packed codes, as stored in flash

    @classmethod
    def load(cls, path: str) -> "IntegerModel":
        """From a packed file written for an integer-mode model (DataError otherwise)."""
        layout = read_packed_meta(path).get("integer")
        if not layout:
            raise DataError(f"{path} is not the packed file of an integer-mode model: expected one written by a run "
                            "with quant.integer=true")
        t = read_packed(path)
        layers, dense, code_bytes = [], None, 0
        for entry in layout["layers"]:
            name, a = entry["name"], entry["act_bits"]
            k = t[f"{name}/kernel"]
            code_bytes += -(-k.codes.size * k.bits // 8)
            bias = t.get(f"{name}/bias")
            if entry["kind"] in ("lstm", "gru"):
                r = t[f"{name}/recurrent_kernel"]
                code_bytes += -(-r.codes.size * r.bits // 8)
                if entry["input_bits"] is None:
                    spec = QuantSpec(**entry["input_spec"])
                    scale, zp = qparams(t[f"{name}/input_lo"], t[f"{name}/input_hi"], spec)
                    s_x, z8 = np.float32(np.reshape(scale, ())), int(np.reshape(zp, ())) - 2 ** (spec.bits - 1)
                    first_scale, zero, input_bits = float(s_x), z8, spec.bits
                else:
                    s_x, z8 = np.float32(iq.hidden_scale(entry["input_bits"])), 0
                acc_scale = s_x * k.scale.reshape(-1)
                m_x, n_x = iq.multiplier(acc_scale * np.float32(2 ** iq.GATE_FRAC))
                rec_scale = np.float32(iq.hidden_scale(a)) * r.scale.reshape(-1)
                m_h, n_h = iq.multiplier(rec_scale * np.float32(2 ** iq.GATE_FRAC))
                kernel, gates = k.codes.astype(np.int64), k.codes.shape[1]
                in_bias = None if bias is None else (bias[0] if entry["kind"] == "gru" else bias)
                folded = _bias_codes(in_bias, acc_scale, gates) - z8 * kernel.sum(axis=0)
                common = dict(name=name, units=entry["units"], act_bits=a, weight_bits=(k.bits, r.bits), kernel=kernel,
                              recurrent=r.codes.astype(np.int64), bias=folded, m_x=m_x, n_x=n_x, m_h=m_h, n_h=n_h,
                              return_sequences=entry["return_sequences"])
                if entry["kind"] == "gru":
                    layers.append(IntegerGru(recurrent_bias=_bias_codes(None if bias is None else bias[1], rec_scale,
                                                                        gates), **common))
                    continue
                c_lo, c_hi = t[f"{name}/state_c_lo"], t[f"{name}/state_c_hi"]
                c_max = np.max(np.maximum(-np.minimum(c_lo, np.float32(0)), np.maximum(c_hi, np.float32(0))))
                layers.append(IntegerLstm(state_bits=entry["state_bits"],
                                          cell_exponent=iq.cell_exponent(c_max, entry["state_bits"]), **common))
            else:
                s_x = np.float32(iq.hidden_scale(entry["input_bits"]))
                k_scale = k.scale.reshape(-1)
                top = np.max(k_scale)
                m, n = iq.multiplier(k_scale / top)
                dense = IntegerDense(name, entry["units"], k.bits, k.codes.astype(np.int64),
                                     _bias_codes(bias, s_x * k_scale, entry["units"]), m, n, float(s_x * top))
        return cls(tuple(layout["input_shape"]), input_bits, first_scale, zero, layers, dense, code_bytes)

    def run(self, x8: np.ndarray) -> np.ndarray:
        """int8 features [N, T, F] -> int32 logits [N, classes] (int64 array), in batches."""
        out = []
        for start in range(0, len(x8), BATCH):
            h = np.asarray(x8[start:start + BATCH], np.int64)
            for layer in self.recurrent:
                h = layer.run(h)
                if not layer.return_sequences:
                    h = h[:, -1]
            out.append(self.dense.run(h.reshape(len(h), -1)))
        return np.concatenate(out) if out else np.zeros((0, self.dense.units), np.int64)

    # ------------------------------------------------------------------ cost figures

    def weight_bytes(self) -> Dict[str, int]:
        """Flash of the C export: packed codes, int32 biases, requantization factors (multiplier and
        shift in one uint32), the sigmoid / tanh tables (int8, one pair per gate bit-width)."""
        requant = sum(len(l.m_x) + len(l.m_h) for l in self.recurrent) + len(self.dense.m)
        biases = sum(len(l.bias) + len(getattr(l, "recurrent_bias", ())) for l in self.recurrent) + len(self.dense.bias)
        tables = 2 * 2 ** iq.TABLE_BITS * len({l.act_bits for l in self.recurrent})
        parts = {"codes": self.weight_code_bytes, "biases": 4 * biases, "requant": 4 * requant, "tables": tables}
        return {**parts, "total": sum(parts.values())}

    def ram_bytes(self) -> int:
        """RAM of the C kernel, streaming one frame at a time: the input frame (int8), per LSTM its
        h (int8), c (int16) and two gate accumulators (int32, 4 units each), per GRU its h and two
        accumulators of 3 units, the classifier's int32 accumulators."""
        per_unit = lambda l: 1 + 2 + 32 if isinstance(l, IntegerLstm) else 1 + 24
        return int(self.input_shape[1]) + sum(l.units * per_unit(l) for l in self.recurrent) + 4 * self.dense.units

    def macs_per_clip(self) -> Dict[str, int]:
        """Multiply-accumulates of one clip by operand widths ("w<bits>xa<bits>")."""
        steps, feats = self.input_shape
        out: Dict[str, int] = {}

        def add(w, a, n):
            out[f"w{w}xa{a}"] = out.get(f"w{w}xa{a}", 0) + int(n)

        in_bits = self.input_bits
        for layer in self.recurrent:
            add(layer.weight_bits[0], in_bits, steps * layer.kernel.size)
            add(layer.weight_bits[1], layer.act_bits, steps * layer.recurrent.size)
            in_bits = layer.act_bits
        add(self.dense.weight_bits, in_bits, self.dense.kernel.size)
        return out


def _bias_codes(bias, acc_scale: np.ndarray, n: int) -> np.ndarray:
    """A float bias as int32 codes at the accumulator scale (float32 division, half-to-even), as
    qat.layers.integer.integer_bias."""
    if bias is None:
        return np.zeros(n, np.int64)
    q = np.round(np.asarray(bias, np.float32).reshape(-1) / acc_scale)
    return np.clip(q, *iq.INT32).astype(np.int64)


# ------------------------------------------------------------------ the fake-quant model's side

def _integer_layers(qmodel):
    layers = [layer for layer in qmodel.layers if getattr(layer, "integer", None) is not None]
    if not layers:
        raise DataError(f"model '{qmodel.name}' has no integer-mode layers: expected a twin built with integer=True")
    return layers


def integer_inputs(qmodel, x: np.ndarray) -> np.ndarray:
    """The int8 features [N, T, F] the integer kernel reads for float model inputs x: the model's
    float front (e.g. normalisation) and the first LSTM's input quantizer, as the fake-quant model
    computes them, on the int8 grid q - 2^(a-1)."""
    first = _integer_layers(qmodel)[0]
    front = keras.Model(qmodel.inputs, input_tap(qmodel, first))
    q = first.activation_quantizers["input"]
    _, scale, zp = (np.asarray(v) for v in q.params())
    out = []
    for start in range(0, len(x), BATCH):
        v = q(front(np.asarray(x[start:start + BATCH], np.float32), training=False)).numpy()
        out.append(np.round(v / scale) + zp - 2 ** (q.spec.bits - 1))
    return np.concatenate(out).astype(np.int8)


def integer_logits(qmodel, x: np.ndarray) -> np.ndarray:
    """The int32 logits (int64 array) the integer-mode fake-quant model computes for inputs x."""
    dense = _integer_layers(qmodel)[-1]
    front = keras.Model(qmodel.inputs, input_tap(qmodel, find_layer(qmodel, dense.name)))
    return np.concatenate([dense.integer_logits(front(np.asarray(x[s:s + BATCH], np.float32), training=False)).numpy()
                           for s in range(0, len(x), BATCH)])


def integer_summary(qmodel, ref: IntegerModel, logits: np.ndarray, x: np.ndarray, y: np.ndarray) -> Dict[str, Any]:
    """`integer/*` summary keys: the accuracy of the numpy reference `ref`, whose int32 logits on the
    clips x (their int8 features) are `logits`, its agreement with the fake-quant model (classes,
    and identical integer logits) and the cost figures."""
    classes = np.argmax(logits, axis=1)
    same_logits = np.all(logits == integer_logits(qmodel, x), axis=1)
    weight = ref.weight_bytes()
    macs = ref.macs_per_clip()
    return {"integer/test_acc": float(np.mean(classes == y)),
            "integer/agreement": float(np.mean(classes == predict_classes(qmodel, x))),
            "integer/logits_match": float(np.mean(same_logits)),
            "integer/act_bits": ref.recurrent[0].act_bits,
            "integer/state_bits": max((getattr(l, "state_bits", 0) for l in ref.recurrent), default=0) or None,
            "integer/weight_bytes": weight["total"], **{f"integer/weight_bytes/{k}": v for k, v in weight.items()
                                                        if k != "total"},
            "integer/ram_bytes": ref.ram_bytes(), "integer/macs_per_clip": sum(macs.values()),
            **{f"integer/macs/{k}": v for k, v in macs.items()}}
