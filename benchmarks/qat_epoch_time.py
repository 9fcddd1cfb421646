"""QAT epoch time against float epoch time, measured in one process, rounds interleaved (float, then
each QAT model), median ratio reported; machines here are shared and noisy. The models are those of
`train.py` with the given overrides (default: the default config, i.e. log-mel 40 + LSTM(80)), the QAT
models use `quant=qat`'s options, distillation from the float model included (as `fit` runs it, plus
rows without it); epochs run on the cached training features.

    python benchmarks/qat_epoch_time.py [--rounds 5] [overrides, e.g. data=fsdd experiment=study]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LSTM_QAT_REPO", str(REPO))

from qat import ConfigError  # noqa: E402,F401  (selects Keras 2 before TensorFlow is imported)
import tf_keras as keras  # noqa: E402

from qat.features import load_features, normalization_stats  # noqa: E402
from qat.models import build_model  # noqa: E402
from qat.distill import Distiller  # noqa: E402
from qat.qat import options  # noqa: E402
from qat.quantize import calibrate, quantize_model  # noqa: E402
from qat.recipes import QuantOptions, RecipeSpec  # noqa: E402

# (label, method, bits, act_bits, state_bits, distillation as the recipe's options say / off)
VARIANTS = [("qat w4", "qat", 4, None, None, True), ("qat w2", "qat", 2, None, None, True),
            ("qat w2, no distillation", "qat", 2, None, None, False),
            ("qat w2 a4 s4", "qat", 2, 4, 4, True), ("qat w2 a4 s4, no distillation", "qat", 2, 4, 4, False),
            ("qat_lsq w2 a4 s4", "qat_lsq", 2, 4, 4, True)]


def composed_spec(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qat.config import run_spec

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["quant=qat", *overrides]), resolve=True)
    return run_spec(cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="train.py overrides (data, features, model, quant options)")
    args = p.parse_args()
    spec = composed_spec(args.overrides)
    feats = load_features(spec.data, spec.features, spec.cache_dir)
    x, y = feats.x["train"], feats.y["train"]
    keras.utils.set_random_seed(0)
    mean, var = normalization_stats(x) if spec.features.normalize else (None, None)
    float_model = build_model(feats.input_shape, len(feats.class_names), spec.model, mean, var)
    models = {"float": float_model}
    opts, _ = QuantOptions.pick(spec.recipe.options)
    distill = options(spec.recipe)[-1]
    for label, method, bits, act, state, distilled in VARIANTS:
        recipe = RecipeSpec(method=method, bits=bits, act_bits=act, state_bits=state)
        q = quantize_model(float_model, opts.quant_config(recipe, learned=method == "qat_lsq"))
        if act:
            calibrate(q, [x[:256]])
        if distilled and distill.alpha > 0:     # what fit() trains with quant.distill > 0
            q = Distiller(q, float_model, distill.alpha, distill.temperature)
        models[label] = q
    batch = spec.trainer.batch_size
    for m in models.values():
        m.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        m.fit(x[:128], y[:128], batch_size=batch, epochs=1, verbose=0)          # build and trace once
    seconds = {k: [] for k in models}
    for _ in range(args.rounds):
        for label, m in models.items():
            start = time.perf_counter()
            m.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
            seconds[label].append(time.perf_counter() - start)
    base = statistics.median(seconds["float"])
    print(f"{spec.data.name} ({' '.join(args.overrides) or 'default config'}): input {feats.input_shape}, "
          f"{len(x)} training clips, batch {batch}, act/state {opts.act_granularity} {opts.act_estimator}, "
          f"distillation weight {distill.alpha}, "
          f"{args.rounds} interleaved rounds (median)")
    print("| model | s / epoch | ratio to float |\n|---|---|---|")
    for label, s in seconds.items():
        print(f"| {label} | {statistics.median(s):.2f} | {statistics.median(s) / base:.2f} |")


if __name__ == "__main__":
    main()
