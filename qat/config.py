"""The edge between a composed config (a plain, resolved dict, as Hydra gives it) and the typed specs
of the library: every value is checked here once, with one-line errors."""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import Any, Callable, Mapping, Type, TypeVar

from qat import ConfigError
from qat.data import DataSpec
from qat.experiment import RunSpec
from qat.features import FeatureSpec
from qat.models import ModelSpec
from qat.recipes import RecipeSpec
from qat.tracking import LoggerSpec
from qat.training import TrainSpec

T = TypeVar("T")


def make(cls: Type[T], section: str, values: Mapping[str, Any] | None) -> T:
    """Build a spec dataclass from a config section; unknown keys are an error naming them."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting of {section}: expected one of "
                          f"{', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as e:  # a value of the wrong type that the spec's own checks did not catch
        raise ConfigError(f"bad value in {section}: {e}")


def _verbose(value: Any) -> int:
    if value in ("auto", None):
        return 1 if sys.stdout.isatty() else 0
    if value not in (0, 1, 2):
        raise ConfigError(f"verbose={value!r} is not allowed: expected auto, 0, 1 or 2")
    return int(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"seed={value!r} is not allowed: expected an integer >= 0")
    return value


def run_spec(cfg: Mapping[str, Any]) -> RunSpec:
    """The RunSpec of a composed train.py config."""
    quant = dict(cfg.get("quant") or {})
    method = quant.pop("method", "none")
    recipe = RecipeSpec(method=method, bits=cfg.get("bits"), act_bits=cfg.get("act_bits"),
                        state_bits=cfg.get("state_bits"), options=quant)
    return RunSpec(data=make(DataSpec, "data", cfg.get("data")),
                   features=make(FeatureSpec, "features", cfg.get("features")),
                   model=make(ModelSpec, "model", cfg.get("model")),
                   trainer=make(TrainSpec, "trainer", cfg.get("trainer")),
                   recipe=recipe, seed=_seed(cfg.get("seed", 0)),
                   cache_dir=cfg.get("cache_dir") or None, verbose=_verbose(cfg.get("verbose", "auto")))


def logger_spec(cfg: Mapping[str, Any]) -> LoggerSpec:
    """The LoggerSpec of a composed config."""
    return make(LoggerSpec, "logger", cfg.get("logger"))


def exit_on_config_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Entry-point decorator: bad input ends the program with `error: <one line>` and exit code 2,
    instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            logging.getLogger("qat").debug("config error", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
