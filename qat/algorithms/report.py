"""The per-tensor report of a quantized model: error figures of every quantized weight against the
float one, and the number of distinct values per quantization group."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from qat.layers.model import float_layers, float_weight, quantized_weights
from qat.quant.reference import error_stats

REPORT_COLUMNS = ["tensor", "bits", "mae", "mse", "sqnr_db", "levels"]


def max_levels(values: np.ndarray, per_channel: bool, axis: int = -1) -> int:
    """Largest number of distinct values in one quantization group (the whole tensor, or one channel
    along `axis`)."""
    values = np.asarray(values)
    if not per_channel:
        return len(np.unique(values))
    columns = np.moveaxis(values, axis, -1)
    return max(len(np.unique(c)) for c in columns.reshape(-1, columns.shape[-1]).T)


def weight_report(float_model, qmodel) -> Dict[str, Dict[str, Any]]:
    """Per weight tensor: MAE, MSE, SQNR (dB) of the quantized weight against the float one, bits and
    the number of distinct values per quantization group (must be <= 2^bits)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, q in quantized_weights(qmodel).items():
        stats = error_stats(float_weight(float_model, name), q.values)
        levels = max_levels(q.codes, q.spec.granularity == "per_channel", q.spec.axis)
        out[name] = {**stats, "bits": q.spec.bits, "levels": levels, "levels_ok": levels <= 2 ** q.spec.bits}
    return out


def report_summary(report: Dict[str, Dict[str, Any]], qmodel) -> Dict[str, Any]:
    """Flat summary keys `quant/weights/<layer>/<weight>/<figure>`, `quant/levels_ok` overall, and
    `quant/float_layers`: the layers of `qmodel` left computing in float (never silently)."""
    out = {f"quant/weights/{name}/{k}": v for name, r in report.items() for k, v in r.items()
           if k in ("mae", "mse", "sqnr_db", "levels")}
    out["quant/levels_ok"] = all(r["levels_ok"] for r in report.values())
    out["quant/float_layers"] = float_layers(qmodel)
    return out


def report_rows(report: Dict[str, Dict[str, Any]]) -> list:
    """The report as table rows in `REPORT_COLUMNS` order."""
    return [[n, r["bits"], r["mae"], r["mse"], r["sqnr_db"], r["levels"]] for n, r in report.items()]
