"""Specs for tests, from the project's real config: Hydra composes conf/ exactly as train.py does, so a
test uses the documented defaults of each group and changes only what it names."""
import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.config import run_spec
from qat.recipes.base import RecipeContext
from qat.tracking import Tracker
from tests.conftest import REPO


def composed(*overrides, config_name: str = "config") -> dict:
    """The resolved config of train.py (or evaluate.py) with these Hydra overrides."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name, overrides=list(overrides)), resolve=True)


def run(*overrides):
    """The RunSpec train.py would build with these overrides."""
    return run_spec(composed(*overrides))


def _section(attr: str, group: str, option: str, changes: dict):
    return dataclasses.replace(getattr(run(f"{group}={option}"), attr), **changes)


def data(option: str = "speech_commands", **changes):
    return _section("data", "data", option, changes)


def features(option: str = "stft", **changes):
    return _section("features", "features", option, changes)


def model(option: str = "lstm", **changes):
    return _section("model", "model", option, changes)


def trainer(option: str = "default", **changes):
    return _section("trainer", "trainer", option, changes)


def predict(**changes):
    return dataclasses.replace(run().predict, **changes)


def recipe(method: str, *overrides):
    """The RecipeSpec of `quant=<method>` with these overrides (e.g. "bits=3", "quant.gptq=false")."""
    return run(f"quant={method}", *overrides).recipe


def context(float_model, feats, recipe_spec, run_dir, *overrides):
    """The RecipeContext a run with these overrides gives `recipe_spec`'s recipe (no W&B)."""
    spec = run(*overrides)
    return RecipeContext(float_model, feats, spec.data, spec.features, spec.trainer, spec.predict,
                         recipe_spec.bits, spec.seed, Path(run_dir), Tracker(), 0)
