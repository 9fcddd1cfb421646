"""Quantization recipes picked by name (`quant.method`): each takes the trained float model and
returns the model to evaluate plus its own summary figures. Also what every recipe shares: the
options that say how tensors are quantized, and the per-tensor report of a quantized model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from qat import ConfigError

BITS_RANGE = (2, 16)


def check_bits(name: str, value: Any, optional: bool = False) -> Optional[int]:
    """Validate a bit-width: an integer 2..16 (or null where `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not BITS_RANGE[0] <= value <= BITS_RANGE[1]:
        allowed = f"an integer {BITS_RANGE[0]}..{BITS_RANGE[1]}" + (" or null" if optional else "")
        raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")
    return value


@dataclass(frozen=True)
class RecipeSpec:
    """Which recipe, at which bit-widths; `options` holds the recipe's own settings."""

    method: str = "none"
    bits: int = 4                      # weight bits
    act_bits: Optional[int] = None     # layer inputs and gates; None = float
    state_bits: Optional[int] = None   # LSTM cell and hidden state; None = float
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in RECIPES:
            raise ConfigError(f"quant.method={self.method!r} is not allowed: expected one of {', '.join(RECIPES)}")
        check_bits("bits", self.bits)
        check_bits("act_bits", self.act_bits, optional=True)
        check_bits("state_bits", self.state_bits, optional=True)
        check_recipe_options(self)         # checked when the config is read, before any training


@dataclass(frozen=True)
class QuantOptions:
    """How tensors are quantized (shared by PTQ and QAT recipes; `bits` etc. come from RecipeSpec)."""

    scheme: str = "asymmetric"          # weights: asymmetric | symmetric
    granularity: str = "per_tensor"     # weights: per_tensor | per_channel (per output unit)
    estimator: str = "minmax"           # weights: minmax | percentile | mse
    percentile: float = 99.99
    narrow_range: bool = False
    bias: bool = True                   # quantize biases too (at `bits`, per tensor) or keep them float
    act_scheme: str = "asymmetric"      # activations and state
    act_granularity: str = "per_tensor" # activations and state: per_tensor | per_channel (per feature / unit)
    act_estimator: str = "minmax"
    calibration_size: int = 512         # training clips used to calibrate activation / state ranges

    def __post_init__(self):
        from qat.quantizers import ESTIMATORS, GRANULARITIES, SCHEMES

        for name, allowed in (("scheme", SCHEMES), ("granularity", GRANULARITIES), ("estimator", ESTIMATORS),
                              ("act_scheme", SCHEMES), ("act_granularity", GRANULARITIES),
                              ("act_estimator", ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"quant.{name}={getattr(self, name)!r} is not allowed: expected one of "
                                  f"{', '.join(allowed)}")
        for name in ("narrow_range", "bias"):
            check_flag(name, getattr(self, name))
        check_number("percentile", self.percentile, "a number in (50, 100]", lambda v: 50 < v <= 100)
        check_number("calibration_size", self.calibration_size, "a positive integer", lambda v: v >= 1,
                     integer=True)

    @classmethod
    def pick(cls, options: Dict[str, Any]):
        """Split `options` into (this class's fields, the rest); unknown keys are left for the caller."""
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        return cls(**mine), {k: v for k, v in options.items() if k not in names}

    def quant_config(self, spec: "RecipeSpec", learned: bool = False):
        """The qat.quantize.QuantConfig these options and bit-widths describe."""
        from qat.quantize import QuantConfig
        from qat.quantizers import QuantSpec

        weights = QuantSpec(spec.bits, self.scheme, self.granularity, -1, self.estimator, self.percentile,
                            self.narrow_range)
        bias = QuantSpec(spec.bits, self.scheme, "per_tensor", -1, "minmax", narrow_range=self.narrow_range) \
            if self.bias else None
        act = lambda b: QuantSpec(b, self.act_scheme, self.act_granularity, -1, self.act_estimator, self.percentile) \
            if b is not None else None
        return QuantConfig(weights=weights, bias=bias, inputs=act(spec.act_bits), gates=act(spec.act_bits),
                           state=act(spec.state_bits), learned=learned)


def check_flag(name: str, value: Any) -> bool:
    """`quant.<name>` must be true or false (one-line ConfigError otherwise)."""
    if not isinstance(value, bool):
        raise ConfigError(f"quant.{name}={value!r} is not allowed: expected true or false")
    return value


def check_number(name: str, value: Any, expected: str, ok: Callable[[Any], bool], integer: bool = False):
    """`quant.<name>` must be a number (an int where `integer`; never a bool) with `ok(value)`; otherwise a
    one-line ConfigError "quant.<name>=<value> is not allowed: expected <expected>"."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
        raise ConfigError(f"quant.{name}={value!r} is not allowed: expected {expected}")
    return value


def check_recipe_options(spec: "RecipeSpec") -> None:
    """Check the shared quantization options and the recipe's own options of `spec` (ConfigError)."""
    QuantOptions.pick(spec.options)
    if spec.method in ("ptq", "ptq_seed"):
        from qat.ptq import options
    elif spec.method.startswith("tflite_"):
        from qat.ptq import tflite_options as options
    elif spec.method.startswith("qat"):
        from qat.qat import options
    else:
        return
    options(spec)


def check_options(method: str, rest: Dict[str, Any], allowed: List[str]) -> None:
    """One-line error for a recipe option that does not exist."""
    if rest:
        raise ConfigError(f"quant.{sorted(rest)[0]} is not an option of quant.method={method}: expected one of "
                          f"{', '.join(sorted(allowed))}")


def float_weight(model, name: str) -> np.ndarray:
    """A float model's weight by its "<layer>/<weight>" name (a Keras LSTM keeps them on its cell)."""
    layer, weight = name.split("/")
    layer = model.get_layer(layer)
    return getattr(getattr(layer, "cell", layer), weight).numpy()


def max_levels(values: np.ndarray, per_channel: bool, axis: int = -1) -> int:
    """Largest number of distinct values in one quantization group (the whole tensor, or one channel
    along `axis`)."""
    values = np.asarray(values)
    if not per_channel:
        return len(np.unique(values))
    columns = np.moveaxis(values, axis, -1)
    return max(len(np.unique(c)) for c in columns.reshape(-1, columns.shape[-1]).T)


def weight_report(float_model, qmodel) -> Dict[str, Any]:
    """Per weight tensor: MAE, MSE, SQNR (dB) of the quantized weight against the float one, bits and
    the number of distinct values per quantization group (must be <= 2^bits)."""
    from qat.quantize import quantized_weights
    from qat.quantizers import error_stats

    out: Dict[str, Any] = {}
    for name, q in quantized_weights(qmodel).items():
        stats = error_stats(float_weight(float_model, name), q.values)
        levels = max_levels(q.codes, q.spec.granularity == "per_channel", q.spec.axis)
        out[name] = {**stats, "bits": q.spec.bits, "levels": levels, "levels_ok": levels <= 2 ** q.spec.bits}
    return out


def report_summary(report: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Flat summary keys `quant/weights/<layer>/<weight>/<figure>` plus `quant/levels_ok` overall."""
    out = {f"quant/weights/{name}/{k}": v for name, r in report.items() for k, v in r.items()
           if k in ("mae", "mse", "sqnr_db", "levels")}
    out["quant/levels_ok"] = all(r["levels_ok"] for r in report.values())
    return out


@dataclass
class RecipeResult:
    """The model to evaluate as "quant" and the recipe's own summary figures."""

    model: Any
    summary: Dict[str, Any] = field(default_factory=dict)


def float_only(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int):
    """`quant.method=none`: the float model is the result (its weights are 32-bit floats)."""
    return RecipeResult(model, {"bits": 32})


def _ptq(*args, **kwargs):
    from qat import ptq

    return ptq.run(*args, **kwargs)


def _tflite(*args, **kwargs):
    from qat import ptq

    return ptq.run_tflite(*args, **kwargs)


def _qat(*args, **kwargs):
    from qat import qat

    return qat.run(*args, **kwargs)


def _qat_tfmot(*args, **kwargs):
    from qat import qat

    return qat.run_tfmot(*args, **kwargs)


RECIPES: Dict[str, Callable[..., RecipeResult]] = {
    "none": float_only, "ptq_seed": _ptq, "ptq": _ptq,
    "tflite_dynamic": _tflite, "tflite_float16": _tflite, "tflite_int8": _tflite,
    "qat": _qat, "qat_lsq": _qat, "qat_tfmot": _qat_tfmot,
}


def run_recipe(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int = 0):
    """Run the recipe named by `spec.method`."""
    return RECIPES[spec.method](spec, model, feats, trainer, seed, run_dir, tracker, verbose)
