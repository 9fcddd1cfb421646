"""QAT training time against float training time, measured in one process.

The models are those of `train.py` with the given overrides (default: the default config, log-mel 40
+ LSTM(80), batch 64): the float model and its QAT twins as the recipes build them: `qat` at 4 and 2
bits trained with distillation from the float model (as `fit` runs it), `qat` at 4 bits with the
LSTM run by Keras' own fused kernel on the fake-quantized weights (cuDNN on a GPU), `qat` at 2 bits without it,
`qat` at W2/A4/S4 (calibrated; with distillation as the recipe, and without) and `qat_lsq`
W2/A4/S4; plus the QLSTM twin with no quantizer at all (the float math through the project's own
time loop).

Two measurements, each interleaved so that the load drifts of a shared machine hit every model alike:

- steps: every round runs `--steps` training steps (Keras' own train function, the cached training
  features in batches) of every model; the figure is the median over rounds of (model / float) time
  within the round, with its quartiles. This is what an epoch consists of, without the end-of-epoch
  work that is the same for all models.
- epochs: whole `fit` epochs of every model, `--epochs` rounds; median ratio of the epoch times.

    python benchmarks/qat_epoch_time.py [--rounds 30] [--steps 10] [--epochs 5] [overrides, e.g. data=fsdd]

The last line printed is one JSON object: the median step ratio to float of every model, keyed by
recipe (`{"qat": <qat w4>, "qat_act": <qat w2 a4 s4>, "qat_lsq": <qat_lsq w2 a4 s4>, ...}`; the key
of each model is in VARIANTS).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LSTM_QAT_REPO", str(REPO))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.algorithms.calibration import calibrate  # noqa: E402
from qat.config import run_spec  # noqa: E402
from qat.data.features import load_features, normalization_stats  # noqa: E402
from qat.layers.model import QuantConfig, quantize_model, quantized_layers  # noqa: E402
from qat.layers.recurrent import QuantizedRNN  # noqa: E402
from qat.training.distill import Distiller  # noqa: E402
from qat.training.models import build_model  # noqa: E402

ACT = ["bits=2", "act_bits=4", "state_bits=4"]
# (key in the JSON line, table label, quant preset, bit-width overrides, distilled as the recipes do)
VARIANTS = [("qat", "qat w4", "qat", ["bits=4"], True),
            ("qat_fused", "qat w4, Keras' fused LSTM kernel", "qat", ["bits=4"], True),
            ("qat_w2", "qat w2", "qat", ["bits=2"], True),
            ("qat_w2_no_distill", "qat w2, no distillation", "qat", ["bits=2"], False),
            ("qat_act", "qat w2 a4 s4", "qat", ACT, True),
            ("qat_act_no_distill", "qat w2 a4 s4, no distillation", "qat", ACT, False),
            ("qat_lsq", "qat_lsq w2 a4 s4", "qat_lsq", ACT, True)]
TWIN_KEY = "twin_no_quantizer"
FUSED = {"qat_fused"}     # weights-only loop through Keras' own kernel (what a GPU runs as cuDNN)


def composed_spec(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
    return run_spec(cfg)


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="rounds of training steps")
    p.add_argument("--steps", type=int, default=10, help="training steps per model and round")
    p.add_argument("--epochs", type=int, default=5, help="rounds of whole epochs (0: skip)")
    p.add_argument("overrides", nargs="*", help="train.py overrides (data, features, model, quant options)")
    args = p.parse_args()
    spec = composed_spec(["quant=qat", *args.overrides])
    feats = load_features(spec.data, spec.features, spec.cache_dir)
    x, y = feats.x["train"], feats.y["train"]
    keras.utils.set_random_seed(0)
    mean, var = normalization_stats(x) if spec.features.normalize else (None, None)
    float_model = build_model(feats.input_shape, len(feats.class_names), spec.model, mean, var)
    cell = {"lstm": "LSTM", "gru": "GRU"}[spec.model.cell]
    models = {f"float (Keras {cell})": float_model,
              f"Q{cell} twin, no quantizer": quantize_model(float_model, QuantConfig())}
    keys = {f"Q{cell} twin, no quantizer": TWIN_KEY}
    opts = spec.recipe.options
    for key, label, preset, bits, distilled in VARIANTS:
        recipe = composed_spec([f"quant={preset}", *bits, *args.overrides]).recipe
        cfg = recipe.options.quant_config(recipe.bits, recipe.options.strategy)
        q = quantize_model(float_model, cfg)
        for layer in quantized_layers(q):
            if isinstance(layer, QuantizedRNN):
                layer.fused = key in FUSED
        if cfg.quantizes_activations:
            calibrate(q, [x[:256]])
        if distilled and recipe.options.distill > 0:     # what fit() trains with quant.distill > 0
            q = Distiller(q, float_model, recipe.options.distill, recipe.options.temperature)
        models[label], keys[label] = q, key
    batch = spec.trainer.batch_size
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(batch).repeat()
    train_steps = {}
    for label, m in models.items():
        m.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        m.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, epochs=1, verbose=0)     # build and trace
        step, it = m.make_train_function(), iter(batches)
        step(it)
        train_steps[label] = (step, it)

    step_s = {k: [] for k in models}
    for _ in range(args.rounds):
        for label, (step, it) in train_steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                logs = step(it)
            tf.nest.map_structure(lambda t: t.numpy(), logs)       # wait for the last step
            step_s[label].append((time.perf_counter() - start) / args.steps)
    epoch_s = {k: [] for k in models}
    for _ in range(args.epochs):
        for label, m in models.items():
            start = time.perf_counter()
            m.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
            epoch_s[label].append(time.perf_counter() - start)

    base = next(iter(models))
    print(f"{spec.data.name} ({' '.join(args.overrides) or 'default config'}): input {feats.input_shape}, "
          f"{len(x)} training clips, batch {batch}, act/state {opts.act_granularity} {opts.act_estimator}, "
          f"distillation weight {opts.distill}, T {opts.temperature}; {args.rounds} rounds x {args.steps} "
          f"steps, {args.epochs} epoch rounds; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| model | ms / step | step ratio to float, median [quartiles] | s / epoch | epoch ratio to float |")
    print("|---|---|---|---|---|")
    medians = {}
    for label in models:
        ratios = [a / b for a, b in zip(step_s[label], step_s[base])]
        lo, mid, hi = quartiles(ratios)
        if label in keys:
            medians[keys[label]] = round(mid, 3)
        ep = (f"{statistics.median(epoch_s[label]):.2f} | "
              f"{statistics.median([a / b for a, b in zip(epoch_s[label], epoch_s[base])]):.2f}"
              if args.epochs else "- | -")
        print(f"| {label} | {1e3 * statistics.median(step_s[label]):.1f} | {mid:.2f} [{lo:.2f}, {hi:.2f}] | {ep} |")
    print(json.dumps(medians))     # last line: the median step ratio of every recipe, for scripts


if __name__ == "__main__":
    main()
