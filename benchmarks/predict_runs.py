"""How well does a run's own prediction (`predict/degradation`, qat.algorithms.predict.predict_run_model)
foresee its measured test drop? Reads the finished runs of one recipe (`--method`, default ptq) in
multirun sweeps (their summary.json and the calibration margins each saved in predict_margins.npz)
and prints markdown tables: the mean absolute error against the measured `quant/degradation` at
bits 3..8 and at 2 bits, per data set and quantization config, beside the baselines predict-0 and val-measured (the drop the
quantized model shows on the whole validation split: the brute-force alternative), with the test
set's own noise sd (from the clips that flip).

Variants of the estimator, recomputed from the saved margins (no TensorFlow needed), so a choice
among them can be made on one part of the grid and checked on the rest:

- calibrated, T=1: the expected loss of the float model, by its own softmax confidence, to the
  decisions the fitted margin model flips (`expected_drop`: what a run logs as `predict/degradation`);
- calibrated: the same with a softmax temperature fitted on the calibration labels;
- labelled: the same fit, counting labelled flips (`fitted_drop`: mean correct - mean P(correct));
- rtn: round-to-nearest weights from the float model alone (`predict/rtn_degradation`).

    for cfg in "" act_bits=8 state_bits=4 state_bits=8; do for data in speech_commands fsdd kws12; do
      python train.py -m data=$data quant=ptq bits=2,3,4,5,6,7,8 seed=0,1,2 $cfg logger=none \\
          hydra.sweep.dir=$S/${cfg:-weights}-$data
    done; done
    python benchmarks/predict_runs.py $S/* [--seeds 0] [--csv runs.csv]

    # QAT and the TFLite-exact PTQ (their own grids; BENCHMARKS.md):
    python benchmarks/predict_runs.py $Q/* --method qat
    python benchmarks/predict_runs.py $Q/* --method ptq_tflite
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.algorithms.predict import (PREDICT_MARGINS_FILE, RUN_MODEL_TEMPERATURE, expected_drop,  # noqa: E402
                                    fit_margins, fitted_drop, margin_temperature)

VARIANTS = ("calibrated, T=1", "calibrated", "labelled", "rtn")
BASELINES = ("predict-0", "val-measured")


def variants(margins) -> dict:
    m, mq, s2, correct = margins["float_margins"], margins["quant_margins"], margins["variance"], margins["correct"]
    fit = fit_margins(m, mq, s2)
    return {"calibrated, T=1": expected_drop(m, s2, fit, RUN_MODEL_TEMPERATURE),
            "calibrated": expected_drop(m, s2, fit, margin_temperature(m)),
            "labelled": fitted_drop(correct, m, s2, fit)}


def config_label(s: dict) -> str:
    parts = ["W"]
    if s.get("act_bits"):
        parts.append(f"A{s['act_bits']}")
    if s.get("state_bits"):
        parts.append(f"S{s['state_bits']}")
    return "+".join(parts)


def collect(roots, method: str):
    rows = []
    for root in roots:
        for summary in sorted(Path(root).rglob("summary.json")):
            npz = summary.parent / PREDICT_MARGINS_FILE
            s = json.loads(summary.read_text())
            if s.get("method") != method or not npz.exists():
                continue
            row = {"data": s.get("task") or s["data"], "config": config_label(s), "bits": s["bits"],
                   "seed": s["seed"], "measured": s["quant/degradation"], "noise sd": s.get("quant/test_noise_sd"),
                   "val-measured": s["quant/val_degradation"], "predict-0": 0.0,
                   "rtn": s.get("predict/rtn_degradation"), "logged": s["predict/degradation"]}
            row.update(variants(np.load(npz)))
            rows.append(row)
    return rows


def mae(rows, key) -> float:
    errs = [abs(r[key] - r["measured"]) for r in rows if r[key] is not None]
    return float(np.mean(errs)) if errs else float("nan")


def table(rows, bits_filter, title, keys) -> list:
    groups = defaultdict(list)
    for r in rows:
        if bits_filter(r["bits"]):
            groups[(r["data"], r["config"])].append(r)
    out = [f"**{title}**", "", "| data | config | runs | " + " | ".join(f"MAE {k}" for k in keys) + " | noise sd |",
           "|---|---|---|" + "---|" * (len(keys) + 1)]
    for (data, cfg), rs in sorted(groups.items()):
        sd = np.mean([r["noise sd"] for r in rs if r["noise sd"] is not None])
        out.append(f"| {data} | {cfg} | {len(rs)} | " + " | ".join(f"{mae(rs, k):.2f}" for k in keys) + f" | {sd:.2f} |")
    by_data = defaultdict(list)
    for rs in groups.values():
        for r in rs:
            by_data[r["data"]].append(r)
    for data, rs in sorted(by_data.items()):
        sd = np.mean([r["noise sd"] for r in rs if r["noise sd"] is not None])
        out.append(f"| **{data}** | all | {len(rs)} | " + " | ".join(f"{mae(rs, k):.2f}" for k in keys)
                   + f" | {sd:.2f} |")
    every = [r for rs in groups.values() for r in rs]
    out.append(f"| **all** | all | {len(every)} | " + " | ".join(f"{mae(every, k):.2f}" for k in keys) + " | |")
    return out


def per_bits(rows, key="calibrated, T=1") -> list:
    """Mean over seeds of the measured / predicted drop, per data set, config and bit-width."""
    bits = sorted({r["bits"] for r in rows})
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["data"], r["config"])][r["bits"]].append(r)
    out = [f"**mean over seeds, measured / predicted ({key}), points**", "",
           "| data | config | " + " | ".join(str(b) for b in bits) + " bits |", "|---|---|" + "---|" * len(bits)]
    for (data, cfg), by_bits in sorted(groups.items()):
        cells = []
        for b in bits:
            rs = by_bits.get(b, [])
            cells.append(f"{np.mean([r['measured'] for r in rs]):.1f} / {np.mean([r[key] for r in rs]):.1f}"
                         if rs else "")
        out.append(f"| {data} | {cfg} | " + " | ".join(cells) + " |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+")
    p.add_argument("--seeds", default="", help="only these seeds, e.g. 0 (choosing a variant on a subset)")
    p.add_argument("--csv", help="also write every run's numbers here")
    p.add_argument("--method", default="ptq", help="the recipe whose runs are read (quant.method: ptq, qat, ...)")
    args = p.parse_args()
    rows = collect(args.roots, args.method)
    if args.seeds:
        keep = {int(s) for s in args.seeds.split(",")}
        rows = [r for r in rows if r["seed"] in keep]
    if not rows:
        print(f"error: no finished quant.method={args.method} run with {PREDICT_MARGINS_FILE} under {args.roots}",
              file=sys.stderr)
        return 2
    keys = VARIANTS + BASELINES
    print("\n".join(table(rows, lambda b: 3 <= b <= 8, "bits 3..8", keys)))
    print()
    print("\n".join(table(rows, lambda b: b == 2, "2 bits", keys)))
    print()
    print("\n".join(per_bits(rows)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
