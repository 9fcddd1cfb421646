"""The Hydra edge: a composed config (a plain, resolved dict, as Hydra gives it) becomes the typed
specs of the library, every value checked here once, before any data is read, with one-line
errors; and the job wrapper of the entry points, which decides what a failure looks like.

A failed job (see `job`):
- bad input (UserError): `error: <one line>` on stderr and in the job's log file, exit code 2; a
  run folder that holds nothing but Hydra's own files is removed;
- Ctrl-C: `interrupted` on stderr, exit code 130;
- any other exception (a bug): its traceback in the job's log file and on stderr;
- in a multirun, the job writes `error.txt` into its folder instead of stopping the sweep; the
  `FailedJobsReport` callback lists the failed jobs when the sweep ends and exits with code 1.
The W&B run of a failed job is marked failed (qat.tracking.Tracker.scope).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shlex
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qat.algorithms.predict import PredictSpec, tensor_specs
from qat.checks import Integer
from qat.data.datasets import DataSpec
from qat.data.features import FeatureSpec
from qat.errors import ConfigError, DataError, UserError
from qat.experiment import SUMMARY_FILE, RunSpec
from qat.io import ERROR_FILE, list_failed_jobs, write_bytes
from qat.recipes import base as recipes
from qat.tracking import LoggerSpec
from qat.training.fit import TrainSpec
from qat.training.models import ModelSpec

log = logging.getLogger(__name__)

SEED = Integer(0)
TRAIN_SECTIONS = ("data", "features", "model", "trainer", "quant", "logger", "bits", "seed")

# `${run_id:}` in conf/config.yaml makes every run folder unique: two runs started in the same second
# must not write into one folder. Cached per config, as Hydra's `${now:}` is.
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: uuid.uuid4().hex[:6], use_cache=True)


def _verbose(value: Any) -> int:
    """Keras progress bars: auto (only in a terminal), 0, 1 or 2."""
    if value in ("auto", None):
        return 1 if sys.stdout.isatty() else 0
    return Integer(0, 2, expected="auto, 0, 1 or 2")("verbose", value)


def _cache_dir(value: Any):
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cache_dir={value!r} is a file: expected a folder (it is created if missing)")
    return str(value)


def run_spec(cfg: Mapping[str, Any], preset: Optional[str] = None) -> RunSpec:
    """The RunSpec of a composed train.py config; `preset` is the conf/quant file it chose (Hydra's
    `runtime.choices.quant`; default: the recipe's name)."""
    bits = recipes.BitWidths.from_config({k: cfg.get(k) for k in ("bits", "act_bits", "state_bits")})
    return RunSpec(data=DataSpec.from_config(cfg.get("data")),
                   features=FeatureSpec.from_config(cfg.get("features")),
                   model=ModelSpec.from_config(cfg.get("model")),
                   trainer=TrainSpec.from_config(cfg.get("trainer")),
                   recipe=recipes.RecipeSpec.from_config(cfg.get("quant"), bits, preset),
                   predict=PredictSpec.from_config(cfg.get("predict")),
                   seed=SEED("seed", cfg.get("seed")), cache_dir=_cache_dir(cfg.get("cache_dir")),
                   verbose=_verbose(cfg.get("verbose", "auto")))


def quant_preset() -> Optional[str]:
    """The conf/quant preset this Hydra job chose (`quant=<preset>`), or None if it chose none."""
    return HydraConfig.get().runtime.choices.get("quant")


def logger_spec(cfg: Mapping[str, Any]) -> LoggerSpec:
    """The LoggerSpec of a composed config."""
    return LoggerSpec.from_config(cfg.get("logger"))


def saved_config(run_dir: str) -> Dict[str, Any]:
    """The resolved train.py config saved in a run folder (`.hydra/config.yaml`); DataError for a
    missing, unreadable or foreign one."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}): expected the config a train.py run saved")
    missing = [k for k in TRAIN_SECTIONS if not isinstance(config, dict) or k not in config]
    if missing:
        raise DataError(f"{path} is not a train.py config: it lacks {', '.join(missing)}")
    return with_options_added_since(config)


# Recipe options added after runs were saved without them, with the value that reproduces what
# those runs did: an older run folder still evaluates.
OPTIONS_ADDED = {"tensor_bits": None, "gate_bits": None, "hidden_bits": None}


def with_options_added_since(config: Dict[str, Any]) -> Dict[str, Any]:
    """`config` (a saved train.py config) with every option in OPTIONS_ADDED that its recipe has and
    it lacks set to the value its run used."""
    quant = config.get("quant")
    if not isinstance(quant, dict) or quant.get("method") not in recipes.RECIPES:
        return config
    fields = {f.name for f in dataclasses.fields(recipes.recipe_named(quant["method"]).options_type)}
    return {**config, "quant": {**{k: v for k, v in OPTIONS_ADDED.items() if k in fields}, **quant}}


# what a proposal's command sets; the run's own overrides of these are dropped
PROPOSAL_KEYS = ("quant", "bits", "act_bits", "state_bits", "hydra")


def proposal_overrides(cfg, names) -> list:
    """train.py overrides that build `cfg` (a QuantConfig of qat.algorithms.proposal: round-to-nearest
    weights, bits per tensor over `names`, activation parts calibrated) with `quant=ptq_seed`, the
    recipe that quantizes as the proposal's verification does."""
    bits = {n: spec.bits for n, spec in tensor_specs(names, cfg.weights_only()).items() if spec is not None}
    weight_bits = [b for n, b in bits.items() if not n.endswith("/bias")] or list(bits.values())
    top = max(sorted(set(weight_bits)), key=weight_bits.count)       # the most common kernel width
    w = cfg.weights
    out = [f"bits={top}", "quant=ptq_seed", f"quant.scheme={w.scheme}", f"quant.granularity={w.granularity}",
           f"quant.estimator={w.estimator}"]
    if w.scale_bits is not None:
        out.append(f"quant.scale_bits={w.scale_bits}")
    if len(bits) < len(names):
        out.append("quant.bias=false")
    others = {n: b for n, b in bits.items() if b != top}
    if others:
        out.append("quant.tensor_bits={" + ",".join(f"{n}:{b}" for n, b in others.items()) + "}")
    inputs, gates, state, hidden = cfg.inputs, cfg.gates, cfg.state, cfg.hidden
    if inputs is not None:
        out.append(f"act_bits={inputs.bits}")
    if gates is not None and (inputs is None or gates.bits != inputs.bits):
        out.append(f"quant.gate_bits={gates.bits}")
    if state is not None:
        out.append(f"state_bits={state.bits}")
    if hidden is not None and (state is None or hidden.bits != state.bits):
        out.append(f"quant.hidden_bits={hidden.bits}")
    act = next((s for s in (inputs, gates, state, hidden) if s is not None), None)
    if act is not None:
        out += [f"quant.act_scheme={act.scheme}", f"quant.act_granularity={act.granularity}",
                f"quant.act_estimator={act.estimator}", f"quant.percentile={act.percentile:g}"]
    return out


def proposal_command(run_dir: str, cfg, names) -> str:
    """The train.py command (shell-quoted) that runs a proposal on a finished run's data, model and
    seed: the run's own overrides (`.hydra/overrides.yaml`) but its quantization, then
    `proposal_overrides`."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    own = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    kept = [o for o in own if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] not in PROPOSAL_KEYS]
    return "python train.py " + " ".join(shlex.quote(o) for o in kept + proposal_overrides(cfg, names))


def proposal_commands(run_dir: str, result: Mapping[str, Any]) -> str:
    """Text to follow a predict_run report: the command of each proposal in its result ("" if none)."""
    lines = []
    for title, prop, names in (("weights-only", result.get("proposal"), "bits"),
                               ("weights and activation parts", result.get("part_proposal"), "weights")):
        if prop is not None:
            lines += ["", f"run the {title} proposal:",
                      "  " + proposal_command(run_dir, prop.config, getattr(prop, names))]
    return "\n" + "\n".join(lines) if lines else ""


def _job_log(level: int, message: str, exc_info=None) -> None:
    """Write to the job's log file(s) only (Hydra's file handler), not to the console."""
    record = logging.getLogger("qat").makeRecord("qat", level, __file__, 0, message, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's own files (a run rejected at the start),
    and the date folders above it that this leaves empty (`outputs/<day>`, `outputs`, at most two)."""
    job_log = f"{HydraConfig.get().job.name}.log"
    if not (run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", job_log}):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.resolve().parents)[:2]:
        if parent == Path.cwd().resolve() or any(parent.iterdir()):
            break
        parent.rmdir()


def job(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Entry-point decorator (inside `@hydra.main`): what a failed job looks like (module doc)."""

    @functools.wraps(fn)
    def wrapper(cfg):
        hydra = HydraConfig.get()
        run_dir = Path(hydra.runtime.output_dir)
        multirun = hydra.mode == RunMode.MULTIRUN
        with CtrlC() as ctrl_c:
            return _run_job(fn, cfg, run_dir, multirun, ctrl_c)

    return wrapper


class CtrlC:
    """Within the block, records whether Ctrl-C (SIGINT) arrived and then hands it to the handler
    that was there (Python's own raises KeyboardInterrupt). TensorFlow can turn a KeyboardInterrupt raised while it traces a
    function into another exception (a StagingError); `job` still reports such a failure as the
    interrupt it was. Outside the main thread, where no handler can be set, it records nothing."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _on_sigint(self, signum, frame):
        self.received = True
        self._previous(signum, frame)

    def __enter__(self) -> "CtrlC":
        previous = signal.getsignal(signal.SIGINT)
        # an ignored SIGINT (a background job) stays ignored
        if threading.current_thread() is threading.main_thread() and callable(previous):
            self._previous = previous
            signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _run_job(fn, cfg, run_dir: Path, multirun: bool, ctrl_c: CtrlC):
    """One job, its failures shaped as the module doc says. A Ctrl-C ends the job as interrupted even
    where the code it landed in swallowed the KeyboardInterrupt and ran on."""
    try:
        result = fn(cfg)
        if ctrl_c.received:
            _interrupted()
        return result
    except UserError as e:
        message = f"error: {e}"
        _job_log(logging.ERROR, message)
        if multirun:
            write_bytes(run_dir / ERROR_FILE, (message + "\n").encode())
            print(message, file=sys.stderr)
            return None
        print(message, file=sys.stderr)
        _remove_if_empty(run_dir)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        if ctrl_c.received:
            _interrupted()
        _job_log(logging.ERROR, "the run failed", exc_info=sys.exc_info())
        if multirun:
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (traceback in the job's log)"
            write_bytes(run_dir / ERROR_FILE, (line + "\n").encode())
            log.error("job %s failed: %s", run_dir, line)
            return None
        raise


def _interrupted() -> None:
    _job_log(logging.ERROR, "interrupted")
    print("interrupted", file=sys.stderr)
    sys.exit(130)


class FailedJobsReport(Callback):
    """At the end of a multirun: the jobs that failed (their folders and errors), and exit code 1 if
    any did. Configured in conf/config.yaml (`hydra.callbacks`)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if list_failed_jobs(Path(str(config.hydra.sweep.dir))):
            sys.exit(1)


class BestTrialReport(Callback):
    """At the end of a hyper-parameter search (conf/hparams_search/): the best trial's folder, the
    parameters it was given, its validation accuracy (what the search maximised) and, for the record,
    its test accuracy. Optuna's own result is `optimization_results.yaml` in the sweep folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        trials = []
        for folder in sorted(p.parent for p in sweep.glob(f"*/{SUMMARY_FILE}")):
            summary = json.loads((folder / SUMMARY_FILE).read_text())
            trials.append((summary["quant/val_acc"], folder, summary))
        if not trials:
            return
        val, folder, summary = max(trials, key=lambda t: t[0])
        params = [o for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")
                  if o.split("=", 1)[0] in config.hydra.sweeper.params]
        print(f"best of {len(trials)} trials: quant/val_acc {val:.4f} (test {summary['quant/test_acc']:.4f}) "
              f"with {' '.join(params)} -> {folder}")
