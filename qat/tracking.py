"""Weights & Biases logging that never fails a run: offline by default (files under the run
directory), online when asked for and reachable, or disabled."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import wandb

from qat.checks import Scalar, Checked, ListOf, Nullable, Number, OneOf, Text, setting

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class LoggerSpec(Checked):
    """Where and how a run is logged to W&B (conf/logger/*.yaml)."""

    section = "logger"

    mode: str = setting(OneOf(MODES))
    project: str = setting(Text())
    entity: Optional[str] = setting(Nullable(Text()))
    group: Optional[str] = setting(Nullable(Text()))      # e.g. the sweep / experiment name, so a dashboard can pivot
    job_type: Optional[str] = setting(Nullable(Text()))   # e.g. the quantization method
    tags: Tuple[str, ...] = setting(ListOf(Scalar(), expected="a list of tags"))
    init_timeout: float = setting(Number(0, low_open=True))   # seconds to wait for the W&B service before going offline

    def check(self) -> None:
        object.__setattr__(self, "tags", tuple(str(t) for t in self.tags))


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
