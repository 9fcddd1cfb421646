"""Sweep definitions: W&B sweep files and Hydra experiment presets describe real, identical grids;
the aggregation step tabulates and draws runs, listing the incomplete ones."""
import itertools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

from qat.aggregate import collect, figure, markdown, table, write_csv
from qat.config import logger_spec, run_spec
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
        log = logger_spec(cfg)
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
