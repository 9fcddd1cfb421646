"""Training-step time of fake-quant twins relative to the float seed model, as a ratio.

The seed model (Input(49,257) -> LSTM(80) -> Flatten -> Dense(3)) trains with Adam on random data
(batch 64 by default). Each round times `--steps` consecutive `train_on_batch` calls of every model,
models interleaved in a rotating order so that load drifts on a shared machine hit all of them alike;
the figure is the median over rounds of (variant time / float time) from the same round.

    python benchmarks/step_time.py [--batch 64] [--rounds 15] [--steps 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.algorithms.calibration import calibrate  # noqa: E402
from qat.layers.model import QuantConfig, quantize_model  # noqa: E402
from qat.layers.tfmot import tfmot_quantize  # noqa: E402
from qat.quant.spec import QuantSpec  # noqa: E402
from qat.training.models import ModelSpec, build_model  # noqa: E402


def variants(float_model, calib):
    """The models compared: float; weights-only 4-bit and weights+activations+state 8-bit
    (qat.layers, per-tensor asymmetric minmax, activations calibrated on the batch); tfmot weights-only
    4-bit (qat.layers.tfmot, for comparison)."""
    w4 = quantize_model(float_model, QuantConfig(weights=QuantSpec(4), bias=QuantSpec(4)))
    a8 = quantize_model(float_model, QuantConfig(weights=QuantSpec(8), bias=QuantSpec(8), inputs=QuantSpec(8),
                                                 gates=QuantSpec(8), state=QuantSpec(8)))
    calibrate(a8, [calib])
    return {"float": float_model, "w4": w4, "w8a8s8": a8, "tfmot_w4": tfmot_quantize(float_model, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="train steps timed per model per round")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 49, 257)).astype(np.float32)
    y = rng.integers(0, 3, size=args.batch)
    keras.utils.set_random_seed(0)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        study_model = ModelSpec.from_config(OmegaConf.to_container(compose("config", overrides=["model=lstm"]).model))
    models = variants(build_model((49, 257), 3, study_model), x)
    for m in models.values():
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        for _ in range(3):                        # trace + warm up
            m.train_on_batch(x, y)

    names = list(models)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                models[n].train_on_batch(x, y)
            times[n].append((time.perf_counter() - t0) / args.steps)

    print(f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps, TF {tf.__version__}, "
          f"{len(tf.config.list_physical_devices('GPU'))} GPU")
    print("| model | median step (ms) | ratio to float: median of per-round ratios [quartiles] |")
    print("|---|---|---|")
    for n in names:
        q1, med, q3 = np.percentile(np.array(times[n]) / np.array(times["float"]), [25, 50, 75])
        print(f"| {n} | {1000 * np.median(times[n]):.1f} | {med:.2f} [{q1:.2f}, {q3:.2f}] |")


if __name__ == "__main__":
    main()
