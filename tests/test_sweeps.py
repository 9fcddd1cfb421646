"""Sweep definitions: W&B sweep files and Hydra experiment presets describe real, identical grids;
the aggregation step tabulates and draws runs, listing the incomplete ones."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

from qat.aggregate import collect, figure, markdown, table, write_csv
from qat.config import logger_spec, run_spec
from qat.sweep_report import panels
from qat.tracking import RESULT_KEYS, RESULT_X
from tests.conftest import REPO
from tests.specs import composed

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_there_are_sweep_files():
    assert {p.stem for p in SWEEPS} >= {"ptq_vs_qat_fsdd", "ptq_vs_qat_speech_commands"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_runs_train_py_with_valid_overrides(path):
    sweep = load_sweep_config(str(path))
    assert sweep["program"] == "train.py" and (REPO / sweep["program"]).exists()
    assert sweep["method"] in ("grid", "random", "bayes")
    assert "${args_no_hyphens}" in sweep["command"] and "${program}" in sweep["command"]
    params = sweep["parameters"]
    names = list(params)
    choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    for combo in itertools.product(*choices):               # every run the agent will start
        args = create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(names, combo)}})
        cfg = composed(*args["args_no_hyphens"])
        spec = run_spec(cfg)                                 # every value is a real, valid config value
        assert spec.recipe.method in ("ptq", "qat") and spec.recipe.bits.bits in (2, 3, 4, 8)
        preset = next(a.split("=", 1)[1] for a in args["args_no_hyphens"] if a.startswith("quant="))
        log = logger_spec(cfg).for_run(preset, spec.recipe.bits.bits, spec.data.name)
        assert log.group == path.stem and log.job_type == spec.recipe.method
        assert spec.recipe.method in log.tags and f"bits={spec.recipe.bits.bits}" in log.tags


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_hydra_preset_has_the_same_grid(path):
    sweep = load_sweep_config(str(path))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
    grid = {k: [int(v) if v.isdigit() else v for v in str(vals).split(",")]
            for k, vals in cfg.hydra.sweeper.params.items()}
    for key, values in grid.items():
        assert sorted(map(str, sweep["parameters"][key]["values"])) == sorted(map(str, values))
    assert cfg.data.name == sweep["parameters"]["data"]["value"]
    assert cfg.logger.group == sweep["parameters"]["logger.group"]["value"]


def test_launchers_compose():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        joblib = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.timeout_min > 0


def _fake_run(root: Path, name: str, **summary):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    if summary:
        (run / "summary.json").write_text(json.dumps(summary))


def test_aggregation_tells_presets_and_differing_options_apart(tmp_path):
    """Two presets of one recipe, and one preset swept over an option: four rows, none merged."""
    for i, (preset, distill, seed) in enumerate([("qat", 0.5, 0), ("qat", 0.5, 1), ("qat", 0.0, 0),
                                                 ("my_qat", 0.5, 0)]):
        _fake_run(tmp_path, f"{i}", data="fsdd", task="fsdd", preset=preset, method="qat", bits=2, act_bits=None,
                  state_bits=None, seed=seed, **{"options/distill": distill, "options/epochs": 10,
                                                 "quant/test_acc": 0.9, "float/test_acc": 0.95})
    rows = table(collect([str(tmp_path)]).runs)
    assert sorted((r["recipe"], r["n"]) for r in rows) == [("my_qat", 1), ("qat (distill=0.0)", 1),
                                                          ("qat (distill=0.5)", 2)]
    assert "| fsdd | qat (distill=0.5) | 2 |" in markdown(rows, [])


def test_aggregate_tables_and_figure(tmp_path):
    # Summaries written by hand: the aggregation is file processing, independent of training.
    for i, (method, bits, seed, acc) in enumerate([("ptq", 2, 0, 0.80), ("ptq", 2, 1, 0.84), ("qat", 2, 0, 0.90),
                                                  ("qat", 2, 1, 0.92), ("ptq", 4, 0, 0.93), ("qat", 4, 0, 0.94)]):
        _fake_run(tmp_path, f"{i}", data="fsdd", task="fsdd", method=method, bits=bits, act_bits=None,
                  state_bits=None, seed=seed, **{"quant/test_acc": acc, "float/test_acc": 0.95,
                                                 "quant/degradation": 100 * (0.95 - acc),
                                                 "quant/test_balanced_acc": acc, "quant/size_bytes": 1000 * bits})
    _fake_run(tmp_path, "crashed")                           # started, never finished
    found = collect([str(tmp_path)])
    assert len(found.runs) == 6 and found.incomplete == [str(tmp_path / "crashed")]
    rows = table(found.runs)
    ptq2 = next(r for r in rows if r["method"] == "ptq" and r["bits"] == 2)
    assert ptq2["n"] == 2 and ptq2["seeds"] == [0, 1]
    assert ptq2["quant/test_acc/mean"] == pytest.approx(0.82)
    assert ptq2["quant/test_acc/sd"] == pytest.approx(0.028284, rel=1e-3)
    assert ptq2["quant/degradation/mean"] == pytest.approx(13.0)
    md = markdown(rows, found.incomplete)
    assert "| fsdd | ptq | 2 |" in md and "82.00 ± 2.83" in md and "crashed" in md
    write_csv(found.runs, tmp_path / "runs.csv")
    assert len((tmp_path / "runs.csv").read_text().strip().splitlines()) == 7
    for p in figure(rows, tmp_path / "fig"):
        assert p.stat().st_size > 1000


def test_the_footnote_names_the_validated_range_of_every_recipe_it_flags(tmp_path):
    ranges = {"ptq": "ptq: 3..8 weight bits, activations float or >= 8 bits, state float or >= 4 bits",
              "qat_lsq": "not measured for qat_lsq"}
    for i, (preset, bits) in enumerate([("ptq", 2), ("qat_lsq", 4), ("ptq", 4)]):
        _fake_run(tmp_path, f"{i}", data="fsdd", task="fsdd", preset=preset, method=preset, bits=bits, act_bits=None,
                  state_bits=None, seed=0, **{"quant/test_acc": 0.9, "float/test_acc": 0.95, "quant/degradation": 5.0,
                                              "quant/size_bytes": 100, "predict/degradation": 1.0,
                                              "predict/matches_run": True, "predict/in_validated_range": bits == 4
                                              and preset == "ptq", "predict/validated_bits": None,
                                              "predict/validated_range": ranges[preset], "predict/of": "its model"})
    md = markdown(table(collect([str(tmp_path)]).runs), [])
    assert f"† a prediction outside the predictor's validated range ({ranges['qat_lsq']}; {ranges['ptq']})" in md


def test_predicted_drop_of_another_model_is_never_under_predicted(tmp_path):
    """A QAT row's prediction (its PTQ starting point) and a default-ptq row's (round to nearest, not
    the run's GPTQ + refinement) sit in their own column; a 2-bit prediction is marked as outside
    the validated range."""
    rows = [("ptq_seed", 4, True, True), ("ptq", 4, False, True), ("qat", 2, False, False)]
    for i, (preset, bits, matches, in_range) in enumerate(rows):
        _fake_run(tmp_path, f"{i}", data="fsdd", task="fsdd", preset=preset, method=preset, bits=bits, act_bits=None,
                  state_bits=None, seed=0, **{"quant/test_acc": 0.9, "float/test_acc": 0.95, "quant/degradation": 5.0,
                                              "quant/size_bytes": 100, "predict/degradation": float(bits),
                                              "predict/matches_run": matches, "predict/in_validated_range": in_range,
                                              "predict/validated_bits": [3, 16], "predict/of": f"what {preset} predicts",
                                              "quant/val_degradation": 4.5, "quant/test_noise_sd": 0.6})
    got = {r["recipe"]: r for r in table(collect([str(tmp_path)]).runs)}
    assert got["ptq_seed"]["predict/degradation/mean"] == 4.0 and math.isnan(got["ptq_seed"]["predict/other_model/mean"])
    assert math.isnan(got["ptq"]["predict/degradation/mean"]) and got["ptq"]["predict/other_model/mean"] == 4.0
    md = markdown(list(got.values()), [])
    qat_line = next(line for line in md.splitlines() if line.startswith("| fsdd | qat |"))
    assert qat_line.count("n/a") >= 1 and "2.00 ± 0.00 †" in qat_line
    assert "outside the predictor's validated range (3..16 weight bits)" in md
    assert "- qat: what qat predicts" in md and "- ptq: what ptq predicts" in md and "ptq_seed: what" not in md
    assert "val-measured drop (pts) | test noise sd (pts)" in md and "4.50 ± 0.00" in md   # the baselines beside it
    # over the one run whose model is the predicted one (ptq_seed: predicted 4, measured 5, val 4.5)
    assert ("Predictor check, 1 runs inside the validated range: MAE predicted 1.00, predict-0 5.00, "
            "val-measured 0.50, mean test noise sd 0.60 (points).") in md


def test_report_of_a_sweep_built_offline(tmp_path):
    """sweeps/report.py --offline builds the W&B Report without a network and writes its definition:
    the sweep's runs (its group, the presets asked for), and curves of what every run logs in its
    result row, against bits, one per preset with the seeds' spread."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "report.py"), "me/lstm-qat", "--group", "ptq_vs_qat_fsdd",
                           "--preset", "ptq", "--preset", "qat", "--offline", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["type"], report["entity"], report["project"]) == ("Report", "me", "lstm-qat")
    assert "ptq_vs_qat_fsdd" in report["title"]
    grids = [b for b in report["blocks"] if b["type"] == "PanelGrid"]
    for grid in grids:
        (runset,) = grid["runsets"]
        assert (runset["entity"], runset["project"]) == ("me", "lstm-qat")
        assert runset["filters"] == "Group = 'ptq_vs_qat_fsdd' and Config('preset') in ['ptq', 'qat']"
    curves = [p for p in panels(report) if p["type"] == "LinePlot"]
    assert [c["y"] for c in curves] == [["quant/test_acc"], ["quant/degradation"], ["quant/size_bytes"]]
    for c in curves:
        assert c["x"] == RESULT_X and set(c["y"]) <= set(RESULT_KEYS)
        assert (c["groupby"], c["groupby_aggfunc"], c["groupby_rangefunc"]) == \
            ({"type": "Config", "name": "preset"}, "mean", "stddev")
    assert {p["type"] for p in panels(report)} == {"LinePlot", "ScatterPlot", "ParallelCoordinatesPlot"}


@pytest.mark.parametrize("args, says", [
    (["nope", "--offline", "--out", "x.json"], "path='nope' is not allowed"),
    (["me/p", "--offline"], "--offline needs --out"),
    (["me/p"], "could not save the report"),           # no W&B login here
])
def test_report_errors_are_one_line(tmp_path, args, says):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "report.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path),
                                             "NETRC": str(tmp_path / "netrc")}, timeout=300)
    assert proc.returncode != 0 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x.json").exists()
