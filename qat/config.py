"""The edge between a composed config (a plain, resolved dict, as Hydra gives it) and the typed specs
of the library: every value is checked here once, before any data is read, with one-line errors."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, Mapping

from qat.algorithms.predict import PredictSpec
from qat.checks import Integer
from qat.data.datasets import DataSpec
from qat.data.features import FeatureSpec
from qat.errors import UserError
from qat.experiment import RunSpec
from qat.recipes import base as recipes
from qat.tracking import LoggerSpec
from qat.training.fit import TrainSpec
from qat.training.models import ModelSpec

SEED = Integer(0)


def _verbose(value: Any) -> int:
    """Keras progress bars: auto (only in a terminal), 0, 1 or 2."""
    if value in ("auto", None):
        return 1 if sys.stdout.isatty() else 0
    return Integer(0, 2, expected="auto, 0, 1 or 2")("verbose", value)


def run_spec(cfg: Mapping[str, Any]) -> RunSpec:
    """The RunSpec of a composed train.py config."""
    bits = recipes.BitWidths.from_config({k: cfg.get(k) for k in ("bits", "act_bits", "state_bits")})
    return RunSpec(data=DataSpec.from_config(cfg.get("data")),
                   features=FeatureSpec.from_config(cfg.get("features")),
                   model=ModelSpec.from_config(cfg.get("model")),
                   trainer=TrainSpec.from_config(cfg.get("trainer")),
                   recipe=recipes.RecipeSpec.from_config(cfg.get("quant"), bits),
                   predict=PredictSpec.from_config(cfg.get("predict")),
                   seed=SEED("seed", cfg.get("seed")), cache_dir=cfg.get("cache_dir") or None,
                   verbose=_verbose(cfg.get("verbose", "auto")))


def logger_spec(cfg: Mapping[str, Any]) -> LoggerSpec:
    """The LoggerSpec of a composed config."""
    return LoggerSpec.from_config(cfg.get("logger"))


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Entry-point decorator: bad input ends the program with `error: <one line>` and exit code 2,
    instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            logging.getLogger("qat").debug("user error", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
