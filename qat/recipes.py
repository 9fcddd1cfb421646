"""Quantization recipes picked by name (`quant.method`): each takes the trained float model and
returns the model to evaluate plus its own summary figures."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

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


@dataclass
class RecipeResult:
    """The model to evaluate as "quant" and the recipe's own summary figures."""

    model: Any
    summary: Dict[str, Any] = field(default_factory=dict)


def float_only(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int):
    """`quant.method=none`: the float model is the result."""
    return RecipeResult(model)


RECIPES: Dict[str, Callable[..., RecipeResult]] = {"none": float_only}


def run_recipe(spec: RecipeSpec, model, feats, trainer, seed: int, run_dir: Path, tracker, verbose: int = 0):
    """Run the recipe named by `spec.method`."""
    return RECIPES[spec.method](spec, model, feats, trainer, seed, run_dir, tracker, verbose)
