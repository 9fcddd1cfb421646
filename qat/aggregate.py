"""Collect the summaries of many runs (a Hydra multirun folder, W&B run folders, any tree), tabulate
accuracy and degradation per recipe x bits over seeds, and draw the accuracy-vs-bits figure.

A row's recipe is the preset the runs chose (`quant=<preset>`) plus every option whose value differs
between runs of that preset (e.g. `qat (distill=0)` and `qat (distill=0.5)` from a sweep over
`quant.distill`): no two different recipes share a row."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

SUMMARY = "summary.json"
GROUP_KEYS = ("data", "task", "recipe", "bits", "act_bits", "state_bits")
OPTION_PREFIX = "options/"
FIGURES = ("quant/test_acc", "quant/degradation", "float/test_acc", "quant/test_balanced_acc",
           "quant/size_bytes", "quant/latency_ms", "predict/degradation", "integer/agreement", "integer/c_agreement",
           "integer/weight_bytes", "integer/ram_bytes", "integer/macs_per_clip", "integer/c_us_per_clip",
           "integer/tflite_int8_us_per_clip", "tflite/test_acc", "tflite/agreement", "tflite/latency_ms",
           "quant/val_degradation", "quant/test_noise_sd")
PREDICTED, PREDICTED_OTHER = "predict/degradation", "predict/other_model"
BASELINES = ("quant/val_degradation", "quant/test_noise_sd")   # shown beside predictions only
# columns shown where some run has the figure: (key, title, scale). The predicted drop of a run whose
# model is not the predicted one (`predict/matches_run` false: e.g. a QAT run saved by a version that
# predicted its PTQ starting point) is shown apart from the predicted drop of the row's own model.
OPTIONAL_COLUMNS = (("predict/degradation", "predicted drop (pts)", 1.0),
                    ("predict/other_model", "predicted drop of another model (pts)", 1.0),
                    ("quant/val_degradation", "val-measured drop (pts)", 1.0),
                    ("quant/test_noise_sd", "test noise sd (pts)", 1.0), ("quant/latency_ms", "latency (ms)", 1.0),
                    ("integer/agreement", "integer agreement %", 100.0), ("integer/c_agreement", "C agreement %", 100.0),
                    ("integer/weight_bytes", "flash (KiB)", 1 / 1024), ("integer/ram_bytes", "RAM (B)", 1.0),
                    ("integer/macs_per_clip", "MACs / clip (M)", 1e-6), ("integer/c_us_per_clip", "C us / clip", 1.0),
                    ("integer/tflite_int8_us_per_clip", "TFLite int8 us / clip", 1.0),
                    ("tflite/test_acc", "interpreter acc %", 100.0),
                    ("tflite/agreement", "interpreter agreement %", 100.0),
                    ("tflite/latency_ms", "interpreter ms / clip", 1.0))


@dataclass
class Collected:
    """Finished runs (their summaries) and the folders of runs that did not finish."""

    runs: List[Dict[str, Any]] = field(default_factory=list)
    incomplete: List[str] = field(default_factory=list)


def collect(roots: Sequence[str]) -> Collected:
    """Every `summary.json` under the roots; a run folder (one with `.hydra/`) without one is listed
    as incomplete (failed, killed or still running)."""
    out = Collected()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: expected a multirun or run folder")
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            path = run_dir / SUMMARY
            if not path.exists():
                out.incomplete.append(str(run_dir))
                continue
            try:
                out.runs.append({**json.loads(path.read_text()), "run_dir": str(run_dir)})
            except json.JSONDecodeError:
                out.incomplete.append(str(run_dir))
    label_recipes(out.runs)
    return out


def label_recipes(runs: List[Dict[str, Any]]) -> None:
    """Set each run's "recipe": its preset (its method for runs that name none) plus the options whose
    values differ between the runs of that preset."""
    preset_of = lambda r: r.get("preset") or r.get("method")
    values: Dict[str, Dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for k, v in r.items():
            if k.startswith(OPTION_PREFIX):
                values[preset_of(r)][k].add(json.dumps(v, sort_keys=True))
    for r in runs:
        varying = sorted(k for k, vs in values[preset_of(r)].items() if len(vs) > 1)
        detail = ", ".join(f"{k[len(OPTION_PREFIX):]}={json.dumps(r.get(k))}" for k in varying)
        r["recipe"] = f"{preset_of(r)} ({detail})" if detail else preset_of(r)


def _mean_sd(values: List[float]) -> Tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (data, task, recipe, bits, act_bits, state_bits): mean and sd over runs of each
    figure, the seeds and the run count (runs as `collect` returns them, with their recipe labels)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[tuple(r.get(k) for k in GROUP_KEYS)].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: tuple((v is None, str(v) if not isinstance(v, int) else f"{v:04d}")
                                                  for v in k)):
        members = groups[key]
        row = dict(zip(GROUP_KEYS, key))
        row["method"] = members[0].get("method")
        row["n"] = len(members)
        row["seeds"] = sorted(m.get("seed") for m in members)
        for fig in FIGURES:
            row[f"{fig}/mean"], row[f"{fig}/sd"] = _mean_sd([m.get(fig) for m in members])
        own = lambda m: m.get("predict/matches_run") is True
        row[f"{PREDICTED}/mean"], row[f"{PREDICTED}/sd"] = _mean_sd([m.get(PREDICTED) for m in members if own(m)])
        row[f"{PREDICTED_OTHER}/mean"], row[f"{PREDICTED_OTHER}/sd"] = _mean_sd(
            [m.get(PREDICTED) for m in members if not own(m)])
        row["predict/of"] = sorted({m["predict/of"] for m in members if m.get(PREDICTED) is not None
                                    and m.get("predict/of")})
        checked = [m for m in members if own(m) and m.get(PREDICTED) is not None
                   and m.get("quant/degradation") is not None]
        row["predict/checked"] = [(m[PREDICTED], m["quant/degradation"], m.get("quant/val_degradation"),   # (predicted,
                                   m.get("quant/test_noise_sd")) for m in checked]                        # measured, val, noise)
        outside = [m for m in members if m.get(PREDICTED) is not None and m.get("predict/in_validated_range") is False]
        row["predict/outside_range"] = bool(outside)
        row["predict/validated_bits"] = outside[0].get("predict/validated_bits") if outside else None
        row["predict/validated_range"] = outside[0].get("predict/validated_range") if outside else None
        rows.append(row)
    return rows


def write_csv(runs: List[Dict[str, Any]], path: Path) -> None:
    """One line per run with the group keys, seed and scalar figures."""
    cols = list(GROUP_KEYS) + ["preset", "method", "seed"] + list(FIGURES) + ["run_dir"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({c: r.get(c) for c in cols})


def markdown(rows: List[Dict[str, Any]], incomplete: List[str]) -> str:
    """The table as markdown: accuracies in %, degradation in points, mean ± sd over seeds."""
    def pm(row, fig, scale=100.0):
        if math.isnan(row[f"{fig}/mean"]):
            return "n/a"
        flag = " †" if fig in (PREDICTED, PREDICTED_OTHER) and row["predict/outside_range"] else ""
        return f"{scale * row[f'{fig}/mean']:.2f} ± {scale * row[f'{fig}/sd']:.2f}{flag}"

    shown = lambda fig: any(not math.isnan(r[f"{fig}/mean"]) for r in rows)
    predicted = shown(PREDICTED) or shown(PREDICTED_OTHER)
    optional = [(fig, title, scale) for fig, title, scale in OPTIONAL_COLUMNS
                if shown(fig) and (predicted or fig not in BASELINES)]
    lines = ["| data | recipe | bits | act | state | n | float acc % | quant acc % | degradation (pts) | "
             + "".join(f"{title} | " for _, title, _ in optional) + "size (KiB) |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(optional) + "---|"]
    for r in rows:
        size = r["quant/size_bytes/mean"]
        lines.append(f"| {r['task'] or r['data']} | {r['recipe']} | {r['bits']} | {r['act_bits'] or '-'} "
                     f"| {r['state_bits'] or '-'} | {r['n']} | {pm(r, 'float/test_acc')} | {pm(r, 'quant/test_acc')} "
                     f"| {pm(r, 'quant/degradation', 1.0)} | "
                     + "".join(f"{pm(r, fig, scale)} | " for fig, _, scale in optional) + f"{size / 1024:.1f} |")
    lines += predictor_check(rows)
    flagged = [r for r in rows if r["predict/outside_range"]]
    if flagged:
        where = "; ".join(sorted({r["predict/validated_range"] or "{}..{} weight bits".format(
            *(r["predict/validated_bits"] or ("?", "?"))) for r in flagged}))
        lines += ["", f"† a prediction outside the predictor's validated range ({where}): "
                      "large and uncertain, not a number to trust."]
    others = sorted({(r["recipe"], of) for r in rows if not math.isnan(r[f"{PREDICTED_OTHER}/mean"])
                     for of in r["predict/of"]})
    if others:
        lines += ["", "Predicted drop of another model: the prediction is of"] + [f"- {recipe}: {of}"
                                                                                  for recipe, of in others]
    if incomplete:
        lines += ["", f"Incomplete runs ({len(incomplete)}), not in the table:"] + [f"- {d}" for d in incomplete]
    return "\n".join(lines) + "\n"


def predictor_check(rows: List[Dict[str, Any]]) -> List[str]:
    """Markdown lines: over the runs whose model is the predicted one (predict/matches_run), inside
    and outside the validated range apart, the MAE of the prediction against the measured drop
    beside its baselines (predicting 0; the drop measured on validation) and the mean test noise sd."""
    out = []
    for inside in (True, False):
        runs = [c for r in rows if r["predict/outside_range"] != inside for c in r["predict/checked"]]
        if not runs:
            continue
        val = [abs(v - m) for _, m, v, _ in runs if v is not None]
        noise = [sd for *_, sd in runs if sd is not None]
        parts = [f"MAE predicted {statistics.mean(abs(p - m) for p, m, _, _ in runs):.2f}",
                 f"predict-0 {statistics.mean(abs(m) for _, m, _, _ in runs):.2f}",
                 "val-measured " + (f"{statistics.mean(val):.2f}" if val else "n/a")]
        if noise:
            parts.append(f"mean test noise sd {statistics.mean(noise):.2f}")
        out.append(f"Predictor check, {len(runs)} runs {'inside' if inside else 'outside (†)'} the validated range: "
                   + ", ".join(parts) + " (points).")
    return [""] + out if out else []


def figure(rows: List[Dict[str, Any]], path_stem: Path, metric: str = "quant/test_acc") -> List[Path]:
    """Accuracy (or degradation) against bits, one line per recipe with seed error bars (sd), the
    float baseline as a band (mean ± sd); one panel per task. Saved as PNG and PDF."""
    tasks = sorted({r["task"] or r["data"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    scale = 1.0 if metric.endswith("degradation") else 100.0
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if (r["task"] or r["data"]) == task and r["method"] != "none"]
        floats = [r for r in rows if (r["task"] or r["data"]) == task]
        if floats and not metric.endswith("degradation"):
            f_mean = statistics.mean(r["float/test_acc/mean"] for r in floats) * 100
            f_sd = max(r["float/test_acc/sd"] for r in floats) * 100
            ax.axhspan(f_mean - f_sd, f_mean + f_sd, color="grey", alpha=0.25, label=f"float {f_mean:.1f}%")
            ax.axhline(f_mean, color="grey", lw=1)
        by_method: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for r in mine:
            label = r["recipe"] + (f" a{r['act_bits']}" if r["act_bits"] else "") + \
                (f" s{r['state_bits']}" if r["state_bits"] else "")
            by_method[label].append(r)
        for label, rs in sorted(by_method.items()):
            rs = sorted(rs, key=lambda r: r["bits"])
            ax.errorbar([r["bits"] for r in rs], [scale * r[f"{metric}/mean"] for r in rs],
                        yerr=[scale * r[f"{metric}/sd"] for r in rs], marker="o", capsize=3, label=label)
        ax.set_xlabel("weight bits")
        ax.set_ylabel("test accuracy (%)" if scale == 100.0 else "accuracy drop (points)")
        ax.set_title(task)
        ax.set_xticks(sorted({r["bits"] for r in mine}) or [2, 4, 8])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
