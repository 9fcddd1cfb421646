"""Float baseline figures: test accuracy (mean ± sd over seeds), epochs, seconds per epoch, and the
wall time of the default `python train.py` from a cold and a warm cache.

    python benchmarks/float_baseline.py --seeds 0 1 2 --data speech_commands fsdd [--overrides k=v ...]

Runs train.py as a user would (subprocesses, real data, W&B offline) in a temporary folder.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(out: Path, name: str, *overrides: str) -> tuple:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"hydra.run.dir={out / name}", *overrides],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / name / "summary.json").read_text()), wall


def mean_sd(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", nargs="+", default=["speech_commands", "fsdd"])
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--skip-timing", action="store_true", help="skip the cold / warm wall-time runs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print("| data | seeds | test acc % | balanced acc % | macro F1 % | epochs | s / epoch |")
        print("|---|---|---|---|---|---|---|")
        for data in args.data:
            rows = [train(out, f"{data}-{s}", f"data={data}", f"seed={s}", f"cache_dir={out / 'cache'}",
                          *args.overrides)[0] for s in args.seeds]
            print(f"| {data} | {len(rows)} | {mean_sd([100 * r['float/test_acc'] for r in rows])} "
                  f"| {mean_sd([100 * r['float/test_balanced_acc'] for r in rows])} "
                  f"| {mean_sd([100 * r['float/test_macro_f1'] for r in rows])} "
                  f"| {mean_sd([r['float/epochs'] for r in rows])} "
                  f"| {mean_sd([r['float/sec_per_epoch'] for r in rows])} |", flush=True)
        if not args.skip_timing:
            cache = out / "timing-cache"
            _, cold = train(out, "cold", f"cache_dir={cache}", *args.overrides)
            _, features_warm = train(out, "retrain", f"cache_dir={cache}", "trainer.reuse_float=false", *args.overrides)
            _, warm = train(out, "warm", f"cache_dir={cache}", *args.overrides)
            print(f"\ndefault `python train.py` wall time: cold cache {cold:.1f} s, features cached but float "
                  f"retrained {features_warm:.1f} s, warm cache (features + float checkpoint) {warm:.1f} s")


if __name__ == "__main__":
    main()
