"""QAT epoch time against float epoch time on the study's task, measured in one process, rounds
interleaved (float, then each QAT model), median ratio reported; machines here are shared and noisy.

    python benchmarks/qat_epoch_time.py [--rounds 5] [--data speech_commands|fsdd]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402

from qat.data import DataSpec  # noqa: E402
from qat.features import FeatureSpec, load_features  # noqa: E402
from qat.models import build_model  # noqa: E402
from qat.quantize import calibrate, quantize_model  # noqa: E402
from qat.recipes import QuantOptions, RecipeSpec  # noqa: E402

DATA = Path(os.environ.get("LSTM_QAT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default="speech_commands", choices=["speech_commands", "fsdd"])
    args = p.parse_args()
    root = DATA / ("speech_commands_v2_test" if args.data == "speech_commands" else "fsdd")
    feats = load_features(DataSpec(name=args.data, root=str(root)), FeatureSpec(), "~/.cache/lstm_qat")
    x, y = feats.x["train"], feats.y["train"]
    keras.utils.set_random_seed(0)
    float_model = build_model(feats.input_shape, len(feats.class_names))
    models = {"float": float_model}
    for label, bits, act, state in [("qat w4", 4, None, None), ("qat w2", 2, None, None),
                                    ("qat w2 a4 s4", 2, 4, 4), ("qat_lsq w2 a4 s4", 2, 4, 4)]:
        spec = RecipeSpec(method="qat", bits=bits, act_bits=act, state_bits=state)
        q = quantize_model(float_model, QuantOptions(granularity="per_channel").quant_config(
            spec, learned=label.startswith("qat_lsq")))
        if act:
            calibrate(q, [x[:256]])
        models[label] = q
    for m in models.values():
        m.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        m.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0)          # build and trace once
    seconds = {k: [] for k in models}
    for _ in range(args.rounds):
        for label, m in models.items():
            start = time.perf_counter()
            m.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=True)
            seconds[label].append(time.perf_counter() - start)
    base = statistics.median(seconds["float"])
    print(f"{args.data}: {len(x)} training clips, batch 64, {args.rounds} interleaved rounds (median)")
    print("| model | s / epoch | ratio to float |\n|---|---|---|")
    for label, s in seconds.items():
        print(f"| {label} | {statistics.median(s):.2f} | {statistics.median(s) / base:.2f} |")


if __name__ == "__main__":
    main()
