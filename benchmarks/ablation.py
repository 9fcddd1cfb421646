"""Float-baseline ablation: the study's recipe (`experiment=study`), one row per front-end /
training option added to it, the `experiment=seed_task_best` preset and the preset with one option
taken out or added (the preset is the default config), on the seed task (yes / no / unknown), kws12 and FSDD. Every row is mean ± sd over
seeds of test accuracy, balanced test accuracy, macro F1, epochs run, seconds per epoch (median
epoch) and training seconds (epochs x s/epoch); "cost" is the training time relative to the study's
recipe on the same data. `--timing N` adds N alternating study / preset runs for a fair cost ratio
on a shared machine.

    python benchmarks/ablation.py [--seeds 0 1 2] [--rows seed: kws12: fsdd:] [--out /tmp/ablation_runs]
                                  [--timing 3]

Runs train.py as a user would (subprocesses, real data, float only, `logger=none`), one run at a
time, with a private feature cache. A finished run under --out is not run again when its resolved
data / features / model / trainer / seed equal the row's, so an interrupted grid resumes where it
stopped (delete --out to start afresh).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LSTM_QAT_REPO", str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.config import run_spec  # noqa: E402
from qat.errors import UserError  # noqa: E402
STUDY = "experiment=study"
PRESET = "experiment=seed_task_best"

# (row id, what it is, Hydra overrides); the row id's prefix before ":" names the data.
GRID = [
    ("seed:study", "study recipe (STFT magnitude 49x257, Adam, early stopping)", [STUDY]),
    ("seed:+log", "+ log compression", [STUDY, "features=log_stft"]),
    ("seed:+log+norm", "+ log + per-bin normalisation", [STUDY, "features=log_stft_norm"]),
    ("seed:+logmel+norm", "+ log-mel 40 (50 dB floor) + normalisation", [STUDY, "features=log_mel"]),
    ("seed:+dropout", "+ dropout 0.3", [STUDY, "model.dropout=0.3"]),
    ("seed:+recdropout", "+ recurrent dropout 0.2", [STUDY, "model.recurrent_dropout=0.2"]),
    ("seed:+shift", "+ time shift ±100 ms", [STUDY, "++trainer.time_shift_ms=100"]),
    ("seed:+noise", "+ noise mixing p=0.5, 10-30 dB", [STUDY, "++trainer.noise_prob=0.5"]),
    ("seed:+classweight", "+ balanced class weights", [STUDY, "trainer.class_weight=balanced"]),
    ("seed:+cosine", "+ cosine LR decay", [STUDY, "trainer.lr_schedule=cosine"]),
    ("seed:preset", "preset seed_task_best (= the default)", [PRESET]),
    ("seed:preset+dropout", "preset + dropout 0.3", [PRESET, "model.dropout=0.3"]),
    ("seed:preset-shift", "preset − time shift", [PRESET, "trainer.time_shift_ms=0"]),
    ("seed:preset-floor", "preset − 50 dB log floor", [PRESET, "features.log_floor_db=0"]),
    ("seed:preset-mel", "preset − mel and floor (log STFT 257 bins + norm)", [PRESET, "features=log_stft_norm"]),
    ("seed:preset+noise", "preset + noise mixing p=0.5 (waveform pipeline)", [PRESET, "trainer.noise_prob=0.5"]),
    ("kws12:study", "study recipe", ["data=kws12", STUDY]),
    ("kws12:preset", "preset seed_task_best", ["data=kws12", PRESET]),
    ("kws12:preset+noise", "preset + noise mixing p=0.5", ["data=kws12", PRESET, "trainer.noise_prob=0.5"]),
    ("fsdd:study", "study recipe", ["data=fsdd", STUDY]),
    ("fsdd:preset", "preset seed_task_best", ["data=fsdd", PRESET]),
    ("fsdd:preset+dropout", "preset + dropout 0.3", ["data=fsdd", PRESET, "model.dropout=0.3"]),
    ("fsdd:preset-shift", "preset − time shift", ["data=fsdd", PRESET, "trainer.time_shift_ms=0"]),
    ("fsdd:preset-floor", "preset − 50 dB log floor", ["data=fsdd", PRESET, "features.log_floor_db=0"]),
]
COMMON = ["quant=none", "logger=none", "verbose=0", "trainer.reuse_float=false"]   # float only, always trained


def float_spec(cfg: dict) -> dict:
    """What determines a float model (data, front end, model, trainer but not reuse, seed), as the
    library reads a resolved train.py config."""
    spec = run_spec(cfg)
    trainer = asdict(spec.trainer)
    trainer.pop("reuse_float")
    return {"data": asdict(spec.data), "features": asdict(spec.features), "model": asdict(spec.model),
            "trainer": trainer, "seed": spec.seed}


def composed(args) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config",
                                              overrides=[a for a in args if not a.startswith("hydra.")]),
                                      resolve=True)


def same_float_run(folder: Path, args) -> bool:
    """Whether `folder` holds a finished run whose float model is the one `args` asks for (compared on
    the resolved configs, so a change of the defaults cannot pass an old run off as this row)."""
    if not (folder / "ablation.json").is_file() or not (folder / ".hydra" / "config.yaml").is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"), resolve=True)
    try:
        return float_spec(saved) == float_spec(composed(args))
    except UserError:           # a run of an older config layout: run it again
        return False


def run(out: Path, cache: Path, row: str, overrides, seed: int, resume: bool = True) -> dict:
    """One train.py run (or its earlier result); returns its float figures plus the process wall time."""
    folder = out / row.replace(":", "-").replace("+", "plus_") / f"s{seed}"
    args = [*overrides, f"seed={seed}", f"cache_dir={cache}", *COMMON, f"hydra.run.dir={folder}"]
    if resume and same_float_run(folder, args):
        return json.loads((folder / "ablation.json").read_text())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    result = {"args": args, "wall_s": wall, **{k: summary[k] for k in (
        "float/test_acc", "float/test_balanced_acc", "float/test_macro_f1", "float/epochs",
        "float/sec_per_epoch", "float/params", "time/total_s")}}
    (folder / "ablation.json").write_text(json.dumps(result, indent=2))
    return result


def mean_sd(values, fmt="{:.1f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def train_seconds(r: dict) -> float:
    return r["float/epochs"] * r["float/sec_per_epoch"]


def timing(out: Path, cache: Path, pairs: int, seed: int) -> None:
    """Training cost of the preset relative to the study's recipe, measured in alternating pairs so
    that the load of a shared machine falls on both alike."""
    study, preset = [], []
    for i in range(pairs):
        study.append(run(out / f"timing{i}", cache, "seed:study", [STUDY], seed, resume=False))
        preset.append(run(out / f"timing{i}", cache, "seed:preset", [PRESET], seed, resume=False))
    med = statistics.median
    print(f"\ntiming, seed {seed}, {pairs} alternating pairs (medians): study {med(map(train_seconds, study)):.1f} s "
          f"training ({study[0]['float/epochs']} epochs x {med(r['float/sec_per_epoch'] for r in study):.2f} s), "
          f"{med(r['wall_s'] for r in study):.0f} s wall; preset {med(map(train_seconds, preset)):.1f} s training "
          f"({preset[0]['float/epochs']} epochs x {med(r['float/sec_per_epoch'] for r in preset):.2f} s), "
          f"{med(r['wall_s'] for r in preset):.0f} s wall; training-time ratio "
          f"{med(train_seconds(p) / train_seconds(s) for s, p in zip(study, preset)):.2f}x, wall ratio "
          f"{med(p['wall_s'] / s['wall_s'] for s, p in zip(study, preset)):.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="*", default=[],
                   help="row ids or prefixes to run (default: all), e.g. seed: fsdd:study")
    p.add_argument("--out", default="/tmp/ablation_runs", help="run folders (kept, for resuming)")
    p.add_argument("--cache-dir", default="/tmp/ablation_cache", help="feature cache of these runs")
    p.add_argument("--timing", type=int, default=0, metavar="PAIRS",
                   help="also time study vs preset in this many alternating pairs (first seed)")
    args = p.parse_args()
    out, cache = Path(args.out), Path(args.cache_dir)
    rows = [r for r in GRID if not args.rows or any(r[0] == s or r[0].startswith(s) for s in args.rows)]
    print(f"seeds {args.seeds}; each run: `python train.py <overrides> seed=S cache_dir={cache} {' '.join(COMMON)}`\n")
    print("| row | overrides | test acc % | balanced acc % | macro F1 % | epochs | s / epoch | train s | cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    study_train = {}
    for row, what, overrides in rows:
        results = [run(out, cache, row, overrides, s) for s in args.seeds]
        train_s = [train_seconds(r) for r in results]
        data = row.split(":")[0]
        if row.endswith(":study"):
            study_train[data] = statistics.mean(train_s)
        cost = f"{statistics.mean(train_s) / study_train[data]:.1f}x" if data in study_train else "-"
        print(f"| {row} {what} | `{' '.join(overrides)}` "
              f"| {mean_sd([100 * r['float/test_acc'] for r in results])} "
              f"| {mean_sd([100 * r['float/test_balanced_acc'] for r in results])} "
              f"| {mean_sd([100 * r['float/test_macro_f1'] for r in results])} "
              f"| {mean_sd([r['float/epochs'] for r in results])} "
              f"| {mean_sd([r['float/sec_per_epoch'] for r in results], '{:.2f}')} "
              f"| {mean_sd(train_s, '{:.0f}')} | {cost} |", flush=True)
    if args.timing:
        timing(out, cache, args.timing, args.seeds[0])


if __name__ == "__main__":
    main()
