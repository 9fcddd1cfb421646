"""A W&B Report of a sweep, built from code with wandb-workspaces: the quantized accuracy, the
degradation and the model size against bits, one curve per recipe preset (mean and standard
deviation over the seeds), accuracy against size, and a parallel-coordinates view of the grid.

Every train.py run logs, beside its summary, one history row holding `bits` and the figures the
curves draw (qat.tracking.Tracker.result): line plots with `bits` on the x axis, grouped
by the `preset` config key, are then the accuracy-vs-bits curves of `sweeps/aggregate.py`, live in
W&B. The report object is built without a network; saving it needs a W&B login."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import wandb_workspaces.reports.v2 as wr

from qat.errors import ConfigError
from qat.tracking import RESULT_X

GROUP_BY = "preset"             # the config key every run records (train.py): one curve per preset
# (history key, axis title) of the curves against bits: each one of the keys a run logs in its result row.
CURVES: Tuple[Tuple[str, str], ...] = (
    ("quant/test_acc", "quantized test accuracy"),
    ("quant/degradation", "degradation (points: float - quantized)"),
    ("quant/size_bytes", "model file (bytes)"),
)


@dataclass(frozen=True)
class ReportSpec:
    """Which runs the report shows and what it is called."""

    entity: str
    project: str
    group: Optional[str] = None            # the W&B run group of the sweep (logger.group); None: the whole project
    presets: Tuple[str, ...] = ()          # only these recipe presets; empty: all
    title: Optional[str] = None            # default: named after the group

    def __post_init__(self):
        for name in ("entity", "project"):
            if not getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: expected a W&B {name} name")

    @property
    def name(self) -> str:
        return self.title or f"PTQ vs QAT: {self.group or self.project}"

    def filters(self) -> str:
        parts = []
        if self.group:
            parts.append(f"Group = {self.group!r}")
        if self.presets:
            parts.append(f"Config({GROUP_BY!r}) in {list(self.presets)!r}")
        return " and ".join(parts)


def build_report(spec: ReportSpec) -> wr.Report:
    """The report object (not saved)."""
    def runs() -> wr.Runset:
        return wr.Runset(entity=spec.entity, project=spec.project, name=spec.group or spec.project,
                         filters=spec.filters(), groupby=[f"config.{GROUP_BY}"])

    group = wr.Config(GROUP_BY)
    curves = [wr.LinePlot(title=f"{title} against weight bits", x=RESULT_X, y=[key], title_x="weight bits",
                          title_y=title, groupby=group, groupby_aggfunc="mean", groupby_rangefunc="stddev")
              for key, title in CURVES]
    trade_off = wr.ScatterPlot(title="accuracy against model size", x=wr.SummaryMetric("quant/size_bytes"),
                               y=wr.SummaryMetric("quant/test_acc"))
    grid = wr.ParallelCoordinatesPlot(title="the grid", columns=[
        wr.ParallelCoordinatesPlotColumn(metric=wr.Config(RESULT_X)),
        wr.ParallelCoordinatesPlotColumn(metric=wr.Config("seed")),
        wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("float/test_acc")),
        wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("quant/test_acc")),
        wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("quant/degradation")),
    ])
    where = f"the runs of group `{spec.group}`" if spec.group else f"every run of project `{spec.project}`"
    blocks = [
        wr.P(f"{where.capitalize()}, one curve per recipe preset (`quant=<preset>`): mean and standard "
             f"deviation over the seeds at each weight bit-width. Degradation is the float model's test "
             f"accuracy minus the quantized model's, in points; the size is the file the recipe exports."),
        wr.H2("Accuracy, degradation and size against bits"),
        wr.PanelGrid(runsets=[runs()], panels=curves),
        wr.H2("Accuracy against size, and the whole grid"),
        wr.PanelGrid(runsets=[runs()], panels=[trade_off, grid]),
    ]
    return wr.Report(entity=spec.entity, project=spec.project, title=spec.name,
                     description=f"Quantized LSTM accuracy against bits for {where}.", blocks=blocks)


def definition(obj: Any) -> Any:
    """The report as plain data: each wandb-workspaces object as {"type": its class, field: value}
    for the fields that are set, recursively (what `save` would turn into the W&B spec)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: Dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if f.name.startswith("_") or not f.init:
                continue
            value = definition(getattr(obj, f.name))
            if value not in (None, "", [], {}, (None, None), [None, None]):
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [definition(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): definition(v) for k, v in obj.items()}
    return obj


def panels(report_definition: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every panel of a report definition, in order."""
    return [p for b in report_definition["blocks"] if b["type"] == "PanelGrid" for p in b.get("panels", [])]
