"""How well does qat.algorithms.predict foresee the measured PTQ degradation? Reads finished train.py runs (a
multirun sweep of PTQ recipes), predicts each run's drop from its own float model and calibration
clips (training or validation split, never test), and prints markdown tables: mean absolute error
of the prediction against the measured `quant/degradation`, beside a "predict 0" baseline, the
drop measured on the validation split (running the quantized model there), and the measurement
noise of the test set itself.

    python train.py -m experiment=study data=fsdd quant=ptq_seed bits=2,3,4,5,6,7,8 seed=0,1,2 logger=none \
        hydra.sweep.dir=/tmp/predict_bench/sweep/ptq_seed-fsdd
    python benchmarks/predict.py /tmp/predict_bench/sweep/* [--calib val|train] [--n-calib 512] [--mixed 0.5,1,2]

The measurement noise of one run (`noise sd`) is the standard deviation of its paired test-set
accuracy difference, sqrt(n01 + n10 - (n01 - n10)^2 / n) / n, from the clips that flip either way;
it is computed by re-quantizing round-to-nearest runs (for GPTQ runs it is left out). A perfect
predictor of the expected drop would still show an MAE of about 0.8 noise sd. `--mixed` also
proposes bits per tensor under each budget for every float model and verifies the proposal (and the
smallest uniform bit-width within the same predicted budget) by PTQ on the test split. Results and
exact commands: BENCHMARKS.md ("Predicted degradation").
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.algorithms.predict import (calibration_set, config_variance, measured_drop, propose_mixed,  # noqa: E402
                                    sensitivity, weight_config)
from qat.config import run_spec  # noqa: E402
from qat.data.features import load_features  # noqa: E402
from qat.layers.model import freeze_ranges, quantize_model  # noqa: E402
from qat.metrics import flip_noise, predict_classes  # noqa: E402
from qat.training.checkpoints import load_model_dir  # noqa: E402


def recipe_label(quant: dict) -> str:
    label = quant.get("granularity", "per_tensor")
    if quant.get("gptq"):
        label += "+gptq"
    if quant.get("bias_correction"):
        label += "+bc"
    return label


def collect(roots):
    runs = []
    for root in roots:
        for summary in sorted(Path(root).rglob("summary.json")):
            run = summary.parent
            cfg_path = run / ".hydra" / "config.yaml"
            if not cfg_path.exists() or not (run / "float").is_dir():
                continue
            s = json.loads(summary.read_text())
            if s["method"] not in ("ptq", "ptq_seed") or s.get("act_bits") or s.get("state_bits"):
                continue
            runs.append((run, s))
    return runs


def paired_noise_sd(model, qmodel, x, y) -> float:
    return flip_noise(predict_classes(model, x) == y, predict_classes(qmodel, x) == y)["noise_sd"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+")
    p.add_argument("--calib", choices=["train", "val"], default="val")
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--competitors", type=int, default=2)
    p.add_argument("--bits", default="3,4,5,6,7,8", help="bit-widths the MAE is taken over")
    p.add_argument("--no-noise", action="store_true", help="skip re-quantizing for the measurement noise")
    p.add_argument("--csv", help="also write every run's numbers here")
    p.add_argument("--mixed", default="", help="budgets (points), e.g. 0.5,1,2: propose bits per tensor for each "
                   "float model and verify by PTQ on the test split")
    p.add_argument("--mixed-granularity", default="per_tensor", choices=["per_tensor", "per_channel"])
    args = p.parse_args()
    runs = collect(args.roots)
    if not runs:
        print(f"error: no finished PTQ run under {args.roots}", file=sys.stderr)
        return 2
    sens_cache, feats_cache, rows, timing = {}, {}, [], []
    for run, s in runs:
        cfg = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=True)
        spec = run_spec(cfg)
        fkey = (spec.data, spec.features)
        if fkey not in feats_cache:
            feats_cache[fkey] = load_features(spec.data, spec.features, spec.cache_dir)
        feats = feats_cache[fkey]
        info = json.loads((run / "float" / "float_info.json").read_text())
        mkey = info.get("key", str(run))
        if mkey not in sens_cache:
            model, _ = load_model_dir(run / "float")
            xc, yc = calibration_set(feats.x[args.calib], feats.y[args.calib], args.n_calib, spec.seed)
            sens = sensitivity(model, xc, yc, competitors=args.competitors)
            sens_cache[mkey] = (model, sens, feats, s["task"], spec.seed)
            timing.append(sens.seconds)
        model, sens = sens_cache[mkey][:2]
        qcfg = spec.recipe.options.quant_config(spec.recipe.bits)
        t0 = time.perf_counter()
        var = config_variance(sens, qcfg)
        pred = sens.drop(var)
        t_cfg = time.perf_counter() - t0
        quant = cfg["quant"]
        noise = np.nan
        if not args.no_noise and not quant.get("gptq") and not quant.get("bias_correction"):
            qmodel = quantize_model(model, qcfg)
            freeze_ranges(qmodel)
            noise = paired_noise_sd(model, qmodel, feats.x["test"], feats.y["test"])
        rows.append({"data": s["task"], "recipe": recipe_label(quant), "bits": s["bits"], "seed": s["seed"],
                     "measured": s["quant/degradation"], "predicted": pred,
                     "val_measured": 100.0 * (s["float/val_acc"] - s["quant/val_acc"]), "noise_sd": noise,
                     "n_test": s["n_test"], "config_s": t_cfg})
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print_tables(rows, [int(b) for b in args.bits.split(",")], args, timing)
    if args.mixed:
        mixed_table(sens_cache, [float(b) for b in args.mixed.split(",")], args.mixed_granularity)
    return 0


def mixed_table(sens_cache, budgets, granularity):
    print(f"\n### Mixed precision ({granularity}): proposal under a predicted-drop budget, verified by PTQ on test\n")
    print("| data | seed | budget | bits (lstm k / rk / b, dense k / b) | KiB | predicted | measured "
          "| uniform bits | uniform KiB | uniform measured | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, sens, feats, task, seed in sorted(sens_cache.values(), key=lambda v: (v[3], v[4])):
        for budget in budgets:
            t0 = time.perf_counter()
            prop = propose_mixed(sens, budget, granularity=granularity)
            t_search = time.perf_counter() - t0
            meas = measured_drop(model, prop.config, feats.x["test"], feats.y["test"])["drop"]
            uni = ("-", "-", "-")
            if prop.uniform_bits is not None:
                u = measured_drop(model, weight_config(prop.uniform_bits, granularity), feats.x["test"],
                                  feats.y["test"])["drop"]
                uni = (prop.uniform_bits, f"{prop.uniform_size_bytes / 1024:.1f}", f"{u:.2f}")
            print(f"| {task} | {seed} | {budget:g} | {' / '.join(str(b) for b in prop.bits.values())} "
                  f"| {prop.size_bytes / 1024:.1f} | {prop.predicted_drop:.2f} | {meas:.2f} | {uni[0]} | {uni[1]} "
                  f"| {uni[2]} | {t_search:.2f} |")


def mae(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


def print_tables(rows, bits, args, timing):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["data"], r["recipe"])].append(r)
    print(f"calibration: {args.n_calib} {args.calib} clips, {args.competitors} competitors per clip; "
          f"sensitivity pass {np.mean(timing):.1f} s per model (mean of {len(timing)})\n")
    print(f"### MAE of the predicted drop over bits {bits[0]}..{bits[-1]} (points; per run, and of the seed means)\n")
    print("| data | recipe | runs | MAE predicted | MAE predict-0 | MAE val-measured | MAE of seed means "
          "(predict-0) | mean noise sd | bias (pred - meas) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (data, recipe), rs in sorted(groups.items()):
        sel = [r for r in rs if r["bits"] in bits]
        if not sel:
            continue
        meas = [r["measured"] for r in sel]
        pred = [r["predicted"] for r in sel]
        by_bits = defaultdict(list)
        for r in sel:
            by_bits[r["bits"]].append(r)
        seed_means = [np.mean([r["measured"] for r in v]) for v in by_bits.values()]
        seed_mae = mae([np.mean([r["predicted"] for r in v]) for v in by_bits.values()], seed_means)
        seed_mae0 = mae(np.zeros(len(seed_means)), seed_means)
        noise = np.nanmean([r["noise_sd"] for r in sel]) if not all(np.isnan(r["noise_sd"]) for r in sel) else np.nan
        print(f"| {data} | {recipe} | {len(sel)} | **{mae(pred, meas):.2f}** | {mae(np.zeros(len(meas)), meas):.2f} "
              f"| {mae([r['val_measured'] for r in sel], meas):.2f} | {seed_mae:.2f} ({seed_mae0:.2f}) | "
              f"{'n/a' if np.isnan(noise) else f'{noise:.2f}'} | {np.mean(np.subtract(pred, meas)):+.2f} |")
    print("\n### Per bit-width: measured vs predicted drop, mean over seeds (points)\n")
    all_bits = sorted({r["bits"] for r in rows})
    print("| data | recipe | " + " | ".join(f"{b} bits" for b in all_bits) + " |")
    print("|---|---|" + "---|" * len(all_bits))
    for (data, recipe), rs in sorted(groups.items()):
        cells = []
        for b in all_bits:
            v = [r for r in rs if r["bits"] == b]
            cells.append("" if not v else f"{np.mean([r['measured'] for r in v]):.1f} / "
                                          f"{np.mean([r['predicted'] for r in v]):.1f}")
        print(f"| {data} | {recipe} | " + " | ".join(cells) + " |")
    two = [r for r in rows if r["bits"] == 2]
    if two:
        print("\n### 2 bits (outside the target range)\n")
        print("| data | recipe | runs | measured | predicted | MAE | MAE predict-0 |")
        print("|---|---|---|---|---|---|---|")
        for (data, recipe), rs in sorted(groups.items()):
            sel = [r for r in rs if r["bits"] == 2]
            if sel:
                m, pr = [r["measured"] for r in sel], [r["predicted"] for r in sel]
                print(f"| {data} | {recipe} | {len(sel)} | {np.mean(m):.1f} | {np.mean(pr):.1f} | {mae(pr, m):.2f} "
                      f"| {mae(np.zeros(len(m)), m):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
