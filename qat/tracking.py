"""Weights & Biases logging that never fails a run: offline by default (files under the run
directory), online when asked for and reachable, or disabled."""
from __future__ import annotations

import contextlib
import logging
import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import wandb

from qat.checks import Scalar, Checked, ListOf, Nullable, Number, OneOf, Text, setting

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
# The run's result as one history row (`Tracker.result`), so that W&B line plots can draw these
# against `bits` across the runs of a sweep (qat.sweep_report).
RESULT_X = "bits"
RESULT_KEYS = ("float/test_acc", "quant/test_acc", "quant/degradation", "quant/size_bytes")


@dataclass(frozen=True)
class LoggerSpec(Checked):
    """Where and how a run is logged to W&B (conf/logger/*.yaml)."""

    section = "logger"

    mode: str = setting(OneOf(MODES))
    project: str = setting(Text())
    entity: Optional[str] = setting(Nullable(Text()))
    group: Optional[str] = setting(Nullable(Text()))      # e.g. the sweep / experiment name, so a dashboard can pivot
    job_type: Optional[str] = setting(Nullable(Text()))   # null: the run's recipe preset (see `for_run`)
    tags: Tuple[str, ...] = setting(ListOf(Scalar(), expected="a list of tags"))   # added to the run's own
    init_timeout: float = setting(Number(0, low_open=True))   # seconds to wait for the W&B service before going offline

    def check(self) -> None:
        object.__setattr__(self, "tags", tuple(str(t) for t in self.tags))

    def for_run(self, preset: str, bits: int, data: str) -> "LoggerSpec":
        """This spec for one run: job type the recipe preset unless set, and the tags preset,
        `bits=<b>` and the data set before the configured ones, so a dashboard can pivot on them."""
        tags = tuple(dict.fromkeys((preset, f"bits={bits}", data, *self.tags)))
        return dataclasses.replace(self, job_type=self.job_type or preset, tags=tags)


class Tracker:
    """A W&B run, or nothing. Every call is guarded: a W&B error is logged once as a warning and
    the run goes on without tracking."""

    def __init__(self, run=None):
        self.run = run

    @property
    def dir(self) -> Optional[str]:
        return getattr(self.run, "dir", None) if self.run is not None else None

    def _guard(self, what: str, fn, *args, **kwargs):
        if self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # W&B must never take a finished experiment down with it
            log.warning("W&B %s failed (%s: %s); tracking stops, results stay on disk", what, type(e).__name__, e)
            self.run = None
            return None

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        self._guard("log", lambda: self.run.log(metrics, step=step))

    def summary(self, values: Dict[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(values))

    def image(self, key: str, path: str) -> None:
        self._guard("image", lambda: self.run.log({key: wandb.Image(path)}))

    def table(self, key: str, columns: List[str], rows: List[List[Any]]) -> None:
        self._guard("table", lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def result(self, summary: Dict[str, Any]) -> None:
        """One history row: `RESULT_X` and the `RESULT_KEYS` the run has (a recipe may have no file size)."""
        row = {k: summary[k] for k in (RESULT_X, *RESULT_KEYS) if isinstance(summary.get(k), (int, float))}
        self.log(row)

    @property
    def offline(self) -> bool:
        return self.run is not None and bool(getattr(self.run.settings, "_offline", False))

    def artifact(self, name: str, kind: str, files: List[str], metadata: Dict[str, Any], use: bool = False) -> None:
        """Log `files` as the W&B artifact `name` (type `kind`) with `metadata`, an output of this run;
        with `use`, an input instead (the run consumed it: W&B links it to the run that made it, one
        version per content). W&B cannot record an input while offline ("Cannot use artifact when in
        offline mode"): an offline run then records the artifact's name in its summary
        (`artifacts/used`) instead."""
        if self.run is None:
            return
        if use and self.offline:
            self.summary({"artifacts/used": name})
            return

        def log():
            art = wandb.Artifact(name, type=kind, metadata=_json_safe(metadata))
            for f in files:
                art.add_file(str(f))
            (self.run.use_artifact if use else self.run.log_artifact)(art)

        self._guard("artifact", log)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero exit code marks it failed in W&B."""
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None

    @contextlib.contextmanager
    def scope(self) -> Iterator["Tracker"]:
        """The run for the `with` block: finished when the block ends, marked failed (exit code 1,
        130 for Ctrl-C) when it ends with an exception."""
        try:
            yield self
        except KeyboardInterrupt:
            self.finish(exit_code=130)
            raise
        except BaseException:
            self.finish(exit_code=1)
            raise
        self.finish()


def _json_safe(values: Dict[str, Any]) -> Dict[str, Any]:
    """Metadata W&B can store: scalars and lists of scalars (numpy scalars as Python numbers)."""
    out = {}
    for k, v in values.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None or (isinstance(v, list) and
                                                                   all(isinstance(x, (str, int, float)) for x in v)):
            out[k] = v
    return out


def start_run(spec: LoggerSpec, run_dir: str, config: Dict[str, Any], name: Optional[str] = None) -> Tracker:
    """Start a W&B run whose files live under `run_dir/wandb`. Online mode falls back to offline
    when W&B cannot be reached or the user is not logged in; any other W&B failure gives a Tracker
    that does nothing (with a warning). WANDB_MODE=disabled (or WANDB_DISABLED=true) in the
    environment turns W&B off whatever the config says."""
    if spec.mode == "disabled":
        return Tracker(None)
    if os.environ.get("WANDB_MODE") == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        log.info("W&B is disabled by the environment (WANDB_MODE / WANDB_DISABLED)")
        return Tracker(None)
    os.makedirs(run_dir, exist_ok=True)
    kwargs = dict(project=spec.project, entity=spec.entity, group=spec.group, job_type=spec.job_type,
                  tags=list(spec.tags) or None, config=config, name=name, dir=run_dir, reinit="finish_previous")
    modes = [spec.mode] if spec.mode == "offline" else [spec.mode, "offline"]
    for mode in modes:
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=spec.init_timeout, silent=True),
                             **kwargs)
            if mode != spec.mode:
                log.warning("W&B online run could not start; logged offline instead (sync later with `wandb sync`)")
            return Tracker(run)
        except Exception as e:
            log.warning("W&B %s run could not start (%s: %s)", mode, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    log.warning("W&B is not tracking this run; results are still written to %s", run_dir)
    return Tracker(None)
