"""Per-tensor quantization MSE of a float model's weight tensors: bit-widths x range estimators
(minmax / mse / percentile) x granularity (per-tensor / per-channel), asymmetric scheme.

    python benchmarks/weight_mse.py --model /tmp/float_seed.keras [--bits 2 3 4 8] [--percentile 99.99]

Prints the study's figure (4-bit per-tensor min-max MAE/MSE/SQNR per tensor), then one markdown
table per bit-width (rows: weight tensors; columns: estimator x granularity).
Per-channel means one range per output column (axis -1); for a 1-D bias that is one range per
element, which is exact, so it is shown as n/a.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from qat.errors import ConfigError  # noqa: E402
from qat.layers.model import float_weight, weight_tensor_names  # noqa: E402
from qat.quant.reference import MSE_GRID, error_stats, fake_quant_np  # noqa: E402
from qat.quant.spec import ESTIMATORS, GRANULARITIES, QuantSpec  # noqa: E402


def float_weights(model) -> dict[str, np.ndarray]:
    """name -> float weight for every quantizable tensor."""
    return {name: float_weight(model, name) for name in weight_tensor_names(model)}


def mse_table(weights: dict, bits: int, percentile: float) -> list[str]:
    """Markdown rows of the MSE for one bit-width."""
    cols = [(e, g) for e in ESTIMATORS for g in GRANULARITIES]
    lines = [f"| {bits}-bit | " + " | ".join(f"{e} {g.replace('_', '-')}" for e, g in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, w in weights.items():
        cells = []
        for estimator, granularity in cols:
            if granularity == "per_channel" and w.ndim < 2:
                cells.append("n/a")
                continue
            spec = QuantSpec(bits, granularity=granularity, estimator=estimator, percentile=percentile)
            cells.append(f"{error_stats(w, fake_quant_np(w, spec))['mse']:.3e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def study_table(weights: dict, bits: int) -> list[str]:
    """The study's figure: per-tensor asymmetric min-max at `bits`, MAE / MSE / SQNR per tensor."""
    lines = [f"| study PTQ, {bits}-bit per-tensor asymmetric minmax | MAE | MSE | SQNR (dB) |", "|---|---|---|---|"]
    for name, w in weights.items():
        s = error_stats(w, fake_quant_np(w, QuantSpec(bits)))
        lines.append(f"| {name} | {s['mae']:.3e} | {s['mse']:.3e} | {s['sqnr_db']:.1f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a tf_keras float model saved with model.save (.keras)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--percentile", type=float, default=99.99)
    args = p.parse_args(argv)
    if not Path(args.model).is_file():
        raise ConfigError(f"--model {args.model} is not a file: expected a saved tf_keras model (.keras)")
    model = keras.models.load_model(args.model, compile=False)
    weights = float_weights(model)
    print(f"model {args.model}: " + ", ".join(
        f"{n} {tuple(w.shape)} [{w.min():.3g}, {w.max():.3g}]" for n, w in weights.items()))
    print(f"asymmetric scheme; percentile p={args.percentile}; mse = best of {MSE_GRID} "
          "clipping ratios of the min-max range\n")
    print("\n".join(study_table(weights, 4)) + "\n")
    for bits in args.bits:
        print("\n".join(mse_table(weights, bits, args.percentile)) + "\n")


if __name__ == "__main__":
    main()
