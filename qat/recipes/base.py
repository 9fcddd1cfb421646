"""The recipe contract and the registry.

A recipe is a `Recipe` object registered under its `quant.method` name. It declares the dataclass of
its options (`options_type`), built once from the `quant` section of the config (every option must
be there: the YAML is where defaults live) and checked against the run's bit-widths before any data
is read; `run(context, options)` takes the trained float model in a `RecipeContext` and returns the
model to evaluate plus the recipe's own summary figures. A new recipe is one module that calls
`register` plus one YAML file in conf/quant/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Type

import numpy as np

from qat.algorithms.calibration import calibration_clips
from qat.algorithms.predict import PredictSpec, ValidatedRange
from qat.algorithms.report import REPORT_COLUMNS, report_rows, report_summary, weight_report
from qat.checks import Bits, Checked, Flag, Integer, MappingOf, Nullable, OneOf, setting
from qat.data.datasets import DataSpec
from qat.data.features import Features, FeatureSpec
from qat.errors import ConfigError
from qat.export.c_source import export_c
from qat.export.integer import IntegerModel, integer_inputs, integer_summary
from qat.export.packed import write_packed_model
from qat.export.tflite import tflite_model
from qat.layers.model import INTEGER_TOPOLOGY, QuantConfig, integer_modes, quantized_layers, weight_tensor_names
from qat.quant.integer import ACT_BITS, STATE_BITS
from qat.quant.quantizers import RANGE, Strategy
from qat.quant.scale_codes import SCALE_BITS
from qat.quant.spec import ESTIMATOR, GRANULARITY, PERCENTILE, SCHEME, QuantSpec
from qat.tracking import Tracker
from qat.training.fit import TrainSpec
from qat.training.models import ModelSpec, build_model


@dataclass(frozen=True)
class BitWidths(Checked):
    """The bit-widths of a run (top-level `bits`, `act_bits`, `state_bits`)."""

    bits: int = setting(Bits())                               # weights
    act_bits: Optional[int] = setting(Nullable(Bits()))      # layer inputs and gates; None = float
    state_bits: Optional[int] = setting(Nullable(Bits()))    # recurrent cell and hidden state; None = float


@dataclass(frozen=True)
class NoOptions(Checked):
    """A recipe without options of its own."""

    section = "quant"


@dataclass(frozen=True)
class QuantOptions(Checked):
    """How tensors are quantized: the options every PTQ and QAT recipe shares."""

    section = "quant"

    scheme: str = setting(SCHEME)                 # weights: asymmetric | symmetric
    granularity: str = setting(GRANULARITY)       # weights: per_tensor | per_channel (per output unit)
    estimator: str = setting(ESTIMATOR)           # weights: minmax | percentile | mse
    percentile: float = setting(PERCENTILE)       # of the percentile estimator
    narrow_range: bool = setting(Flag())          # symmetric only: [-(2^(b-1)-1), 2^(b-1)-1]
    scale_bits: Optional[int] = setting(SCALE_BITS)   # weights: scales stored as k-bit codes; null = float32
    bias: bool = setting(Flag())                  # quantize biases too (at `bits`, per tensor) or keep them float
    # bits of named weights / biases, e.g. {lstm/kernel: 5}; None: every one at `bits`
    tensor_bits: Optional[Mapping[str, int]] = setting(Nullable(MappingOf(Bits())))
    gate_bits: Optional[int] = setting(Nullable(Bits()))     # the gates' grid where it differs from act_bits
    hidden_bits: Optional[int] = setting(Nullable(Bits()))   # the hidden state h's grid where it differs from state_bits
    act_scheme: str = setting(SCHEME)             # activations and state
    act_granularity: str = setting(GRANULARITY)   # activations and state: per_tensor | per_channel (feature / unit)
    act_estimator: str = setting(ESTIMATOR)
    calibration_size: int = setting(Integer(1))   # training clips that calibrate activation / state ranges
    integer: bool = setting(Flag())               # integer-only inference (qat.layers.integer), see integer_config

    def quant_config(self, bits: BitWidths, strategy: Strategy = RANGE) -> QuantConfig:
        """The QuantConfig these options describe at these bit-widths."""
        if self.integer:
            return self.integer_config(bits, strategy)
        weights = QuantSpec(bits.bits, self.scheme, self.granularity, -1, self.estimator, self.percentile,
                            self.narrow_range, self.scale_bits)
        bias = QuantSpec(bits.bits, self.scheme, "per_tensor", -1, "minmax", narrow_range=self.narrow_range,
                         scale_bits=self.scale_bits)
        act = lambda b: None if b is None else QuantSpec(b, self.act_scheme, self.act_granularity, -1,
                                                        self.act_estimator, self.percentile)
        # a named bias is quantized at its bits even where `bias` is false
        overrides = {name: dataclasses.replace(bias if name.endswith("/bias") else weights, bits=b)
                     for name, b in (self.tensor_bits or {}).items()}
        return QuantConfig(weights=weights, bias=bias if self.bias else None, inputs=act(bits.act_bits),
                           gates=act(bits.act_bits if self.gate_bits is None else self.gate_bits),
                           state=act(bits.state_bits), hidden=act(self.hidden_bits), strategy=strategy,
                           overrides=overrides)

    def integer_config(self, bits: BitWidths, strategy: Strategy) -> QuantConfig:
        """Integer mode: what the integer kernel computes with. Weights symmetric (no zero points) at
        `bits` with `granularity` and `estimator`; the model input per tensor asymmetric at act_bits;
        gates and hidden state on act_bits grids; the cell state at state_bits (16 when null) with a
        power-of-two scale from its calibrated range (act_estimator); biases int32. `scheme`,
        `act_scheme`, `act_granularity` and `bias` do not apply."""
        mixed = {"quant.tensor_bits": self.tensor_bits, "quant.gate_bits": self.gate_bits,
                 "quant.hidden_bits": self.hidden_bits}
        for name, value in mixed.items():
            if value is not None:
                raise ConfigError(f"{name}={value} is not allowed with quant.integer=true: expected null (the "
                                  "integer kernel holds every weight at `bits`, gates and h at act_bits)")
        if bits.act_bits is None:
            raise ConfigError("quant.integer=true needs act_bits: expected act_bits=2..8 (the integer kernel's "
                              "inputs, gates and hidden state)")
        act_bits = ACT_BITS("act_bits", bits.act_bits)
        state_bits = STATE_BITS("state_bits", 16 if bits.state_bits is None else bits.state_bits)
        if strategy is not RANGE:
            raise ConfigError(f"quant.integer=true is not allowed with learned step sizes ({strategy.name}): "
                              "expected quant=qat or quant=ptq")
        weights = QuantSpec(bits.bits, "symmetric", self.granularity, -1, self.estimator, self.percentile,
                            self.narrow_range, self.scale_bits)
        return QuantConfig(weights=weights, inputs=QuantSpec(act_bits, "asymmetric", "per_tensor", -1,
                                                             self.act_estimator, self.percentile),
                           state=QuantSpec(state_bits, "symmetric", "per_tensor", -1, self.act_estimator,
                                           self.percentile), strategy=strategy, integer=True)


def check_tensor_names(tensor_bits: Mapping[str, int], names) -> None:
    """`quant.tensor_bits` names only weights and biases the model has (one-line ConfigError)."""
    unknown = sorted(set(tensor_bits) - set(names))
    if unknown:
        raise ConfigError(f"quant.tensor_bits names {', '.join(unknown)}, which the model does not have: expected "
                          f"names among {', '.join(names)}")


def tflite_int8_us_per_clip(float_model, feats: Features, seed: int, clips: int = 100) -> float:
    """Median time per clip of the TFLite int8 interpreter running `float_model` converted to full
    integer int8 (calibrated on 200 training clips), over the first `clips` test clips: the
    comparison for the C kernel's time."""
    tflite, _ = tflite_model(float_model, "int8", calibration_clips(feats.x["train"], 200, seed))
    tflite.predict(feats.x["test"][:clips])
    return 1000.0 * float(np.median(tflite.latencies_ms))


def integer_results(ctx: "RecipeContext", qmodel, packed: Path) -> Dict[str, Any]:
    """`integer/*` summary keys of an integer-mode run: the numpy reference from the packed file
    against the fake-quant model on the test clips, the C export (run_dir/c) compiled, run and
    compared with the reference where a C compiler exists, and the TFLite int8 interpreter's time
    per clip for the same float model beside the C kernel's."""
    x, y = ctx.feats.x["test"], ctx.feats.y["test"]
    ref, x8 = IntegerModel.load(str(packed)), integer_inputs(qmodel, x)
    logits = ref.run(x8)
    summary = integer_summary(qmodel, ref, logits, x, y)
    report = export_c(ref, x8, ctx.run_dir / "c", expected=logits)
    summary.update({"integer/c_agreement": report["agreement"], "integer/c_us_per_clip": report["us_per_clip"],
                    "integer/tflite_int8_us_per_clip": tflite_int8_us_per_clip(ctx.float_model, ctx.feats,
                                                                                           ctx.seed)})
    return summary


def size_limit_bytes(qmodel, params: int, bits: int) -> int:
    """The physical limit of a model's weights: each quantized tensor's values at its own bits, every
    other parameter at `bits`, nothing else."""
    sizes = [(int(np.prod(getattr(layer, name).shape)), q.spec.bits)
             for layer in quantized_layers(qmodel) for name, q in layer.weight_quantizers.items()]
    total = sum(n * b for n, b in sizes) + (params - sum(n for n, _ in sizes)) * bits
    return -(-total // 8)


def quantized_result(ctx: "RecipeContext", qmodel, integer: bool, summary: Dict[str, Any],
                     check_packed: Optional[Callable[[Path], Dict[str, Any]]] = None) -> "RecipeResult":
    """How every recipe that quantizes with qat.layers ends: the per-tensor error report, the packed
    file `model_<bits>bit.qlstm` (`quant/size_bytes`; `check_packed(path)` adds its own keys), the
    integer figures in integer mode, the W&B error table."""
    report = weight_report(ctx.float_model, qmodel)
    summary.update(report_summary(report, qmodel))
    packed = ctx.run_dir / f"model_{ctx.bits.bits}bit.qlstm"
    summary["quant/size_bytes"] = write_packed_model(qmodel, str(packed))
    summary["quant/size_limit_bytes"] = size_limit_bytes(qmodel, ctx.float_model.count_params(), ctx.bits.bits)
    if check_packed is not None:
        summary.update(check_packed(packed))
    if integer:
        summary.update(integer_results(ctx, qmodel, packed))
    ctx.tracker.table("quant/weight_error", REPORT_COLUMNS, report_rows(report))
    return RecipeResult(qmodel, summary, {"packed": packed})


@dataclass
class RecipeContext:
    """What a recipe works with: the trained float model, the features, the run's settings and where
    its outputs go."""

    float_model: Any
    feats: Features
    data: DataSpec
    features: FeatureSpec
    trainer: TrainSpec
    predict: PredictSpec
    bits: BitWidths
    seed: int
    run_dir: Path
    tracker: Tracker
    verbose: int = 0


@dataclass
class RecipeResult:
    """The model to evaluate as "quant", the recipe's own summary figures, and the files it exported
    (kind -> path: "packed" for a packed b-bit file, "tflite" for a flatbuffer)."""

    model: Any
    summary: Dict[str, Any] = field(default_factory=dict)
    exports: Dict[str, Path] = field(default_factory=dict)


class Recipe:
    """A quantization recipe (see the module doc). Subclasses set `options_type`, implement `run`, and
    add rules across options and bit-widths in `check`. `validated`: where the predictions of its
    runs' drops were measured (qat.algorithms.predict.ValidatedRange; default: nowhere)."""

    options_type: ClassVar[Type[Checked]] = NoOptions

    def __init__(self, name: str, validated: Optional[ValidatedRange] = None):
        self.name = name
        self.validated = validated or ValidatedRange(name, None)

    def options(self, values: Mapping[str, Any], bits: BitWidths):
        """The recipe's typed options from the `quant` section (without `method`), checked."""
        options = self.options_type.from_config(values, owner=f"an option of quant.method={self.name}")
        self.check(options, bits)
        return options

    def check(self, options, bits: BitWidths) -> None:
        """Rules across the options and the bit-widths (ConfigError). Recipes with QuantOptions build
        their QuantConfig here, so every QuantSpec rule applies before any data is read."""
        if isinstance(options, QuantOptions):
            options.quant_config(bits)

    def check_model(self, model: ModelSpec, options) -> None:
        """Rules on the model the recipe will get (ConfigError), checked before any data is read (a
        user's saved model: `check_float_model` once it is loaded)."""
        if getattr(options, "integer", False) and model.path is None and (model.bidirectional or model.conv_filters):
            raise ConfigError(f"quant.integer=true is not allowed with model.bidirectional="
                              f"{str(model.bidirectional).lower()}, model.conv_filters={model.conv_filters}: "
                              f"expected {INTEGER_TOPOLOGY} (model=lstm or model=gru)")
        if isinstance(options, QuantOptions) and options.tensor_bits and model.path is None:
            # layer names are build_model's contract; any input shape the front end accepts shows them
            probe = build_model((max(model.conv_kernel[0], 2), max(model.conv_kernel[1], 2)), 2, model)
            check_tensor_names(options.tensor_bits, weight_tensor_names(probe))

    def check_float_model(self, float_model, bits: BitWidths, options) -> None:
        """Rules on a loaded float model (the user's), before any data is read."""
        if isinstance(options, QuantOptions) and options.tensor_bits:
            check_tensor_names(options.tensor_bits, weight_tensor_names(float_model))
        if isinstance(options, QuantOptions) and options.integer:
            integer_modes(float_model, options.quant_config(bits))

    def run(self, ctx: RecipeContext, options) -> RecipeResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


RECIPES: Dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Make `recipe` available as `quant.method=<recipe.name>`."""
    if recipe.name in RECIPES:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def recipe_named(name: Any) -> Recipe:
    """The registered recipe `quant.method=name` names (ConfigError listing the choices otherwise)."""
    OneOf(tuple(RECIPES))("quant.method", name)
    return RECIPES[name]


@dataclass(frozen=True)
class RecipeSpec:
    """Which recipe runs, at which bit-widths, with which (typed, checked) options; `preset` is the
    name the user chose it by (conf/quant/<preset>.yaml), which several presets of one recipe tell
    apart."""

    recipe: Recipe
    bits: BitWidths
    options: Any
    preset: str

    @property
    def method(self) -> str:
        return self.recipe.name

    @classmethod
    def from_config(cls, quant: Mapping[str, Any], bits: BitWidths, preset: Optional[str] = None) -> "RecipeSpec":
        """From the `quant` section of a config (its `method` and the recipe's options) and the name of
        the preset it came from (default: the method)."""
        values = dict(quant or {})
        if "method" not in values:
            raise ConfigError("quant.method is missing: expected the name of a recipe (conf/quant/<name>.yaml)")
        recipe = recipe_named(values.pop("method"))
        return cls(recipe, bits, recipe.options(values, bits), preset or recipe.name)

    def option_values(self) -> Dict[str, Any]:
        """The recipe's options as `options/<name>` summary keys (lists as lists)."""
        return {f"options/{f.name}": (list(v) if isinstance(v := getattr(self.options, f.name), tuple) else v)
                for f in dataclasses.fields(self.options)}

    def run(self, ctx: RecipeContext) -> RecipeResult:
        return self.recipe.run(ctx, self.options)
