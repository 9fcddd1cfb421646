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
from typing import Any, ClassVar, Dict, Mapping, Optional, Type

from qat.algorithms.predict import PredictSpec
from qat.checks import Bits, Checked, Flag, Integer, Nullable, OneOf, setting
from qat.data.datasets import DataSpec
from qat.data.features import Features, FeatureSpec
from qat.errors import ConfigError
from qat.layers.model import QuantConfig
from qat.quant.quantizers import RANGE, Strategy
from qat.quant.spec import ESTIMATOR, GRANULARITY, PERCENTILE, SCHEME, QuantSpec
from qat.tracking import Tracker
from qat.training.fit import TrainSpec
from qat.training.models import ModelSpec


@dataclass(frozen=True)
class BitWidths(Checked):
    """The bit-widths of a run (top-level `bits`, `act_bits`, `state_bits`)."""

    bits: int = setting(Bits())                               # weights
    act_bits: Optional[int] = setting(Nullable(Bits()))      # layer inputs and gates; None = float
    state_bits: Optional[int] = setting(Nullable(Bits()))    # recurrent cell and hidden state; None = float

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits is not None or self.state_bits is not None


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
    bias: bool = setting(Flag())                  # quantize biases too (at `bits`, per tensor) or keep them float
    act_scheme: str = setting(SCHEME)             # activations and state
    act_granularity: str = setting(GRANULARITY)   # activations and state: per_tensor | per_channel (feature / unit)
    act_estimator: str = setting(ESTIMATOR)
    calibration_size: int = setting(Integer(1))   # training clips that calibrate activation / state ranges

    def quant_config(self, bits: BitWidths, strategy: Strategy = RANGE) -> QuantConfig:
        """The QuantConfig these options describe at these bit-widths."""
        weights = QuantSpec(bits.bits, self.scheme, self.granularity, -1, self.estimator, self.percentile,
                            self.narrow_range)
        bias = QuantSpec(bits.bits, self.scheme, "per_tensor", -1, "minmax", narrow_range=self.narrow_range) \
            if self.bias else None
        act = lambda b: None if b is None else QuantSpec(b, self.act_scheme, self.act_granularity, -1,
                                                        self.act_estimator, self.percentile)
        return QuantConfig(weights=weights, bias=bias, inputs=act(bits.act_bits), gates=act(bits.act_bits),
                           state=act(bits.state_bits), strategy=strategy)


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
    add rules across options and bit-widths in `check`."""

    options_type: ClassVar[Type[Checked]] = NoOptions

    def __init__(self, name: str):
        self.name = name

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

    def check_model(self, model: ModelSpec) -> None:
        """Rules on the model the recipe will get (ConfigError), checked before any data is read."""

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
