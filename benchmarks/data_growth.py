"""Cost as the data grows: time and peak memory of feature extraction, float training, a PTQ run and
a QAT run at growing numbers of clips.

The larger sets are built from the shared Speech Commands clips (`data.root`, 4,890 clips, 12
labels) in a temporary folder: each clip once as it is and `copies - 1` more times shifted by up to
+/-100 ms and mixed with white noise at 20-30 dB SNR, written as 16-bit WAV under the same speaker
(so a speaker's copies stay in one split). Every stage runs as its own `train.py` process on the
kws12 task (every clip counts), one after the other with the same feature / float-model cache:

    features + float   quant=none trainer.epochs=<E>     time/features_s, float/sec_per_epoch
    ptq                quant=ptq (features, float cached) time/recipe_s
    qat                quant=qat quant.epochs=1           time/recipe_s, qat/sec_per_epoch

Peak memory is each process's maximum resident set (os.wait4). Times are divided by the number of
clips and given as a ratio to the smallest set, measured in the same script: a ratio near 1 is
linear growth.

    python benchmarks/data_growth.py [--copies 1 5 20] [--epochs 2] [--work /tmp/growth] [overrides, e.g. experiment=study]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "speech_commands_v2_test"
RATE = 16000


def build(source: Path, dest: Path, copies: int, seed: int = 0) -> int:
    """Write every clip of `source` and `copies - 1` shifted, noisy variants of it into `dest`."""
    rng = np.random.default_rng(seed)
    n = 0
    for wav in sorted(source.glob("*/*.wav")):
        audio, rate = soundfile.read(wav, dtype="float32")
        out = dest / wav.parent.name
        out.mkdir(parents=True, exist_ok=True)
        stem = wav.name[:-len(".wav")]
        soundfile.write(out / wav.name, audio, rate, subtype="PCM_16")
        n += 1
        for k in range(1, copies):
            shift = int(rng.integers(-RATE // 10, RATE // 10 + 1))
            moved = np.roll(audio, shift)
            if shift > 0:
                moved[:shift] = 0.0
            elif shift < 0:
                moved[shift:] = 0.0
            power = float(np.mean(moved ** 2)) or 1e-8
            snr = rng.uniform(20, 30)
            noisy = moved + rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), moved.shape).astype(np.float32)
            soundfile.write(out / f"{stem}c{k}.wav", np.clip(noisy, -1, 1), rate, subtype="PCM_16")
            n += 1
    return n


def stage(args, run_dir: Path) -> dict:
    """Run train.py with `args` into `run_dir`: its summary, wall seconds and peak RSS (bytes)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)     # this child's own peak memory
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            log.seek(0)
            raise SystemExit(f"train.py {' '.join(args)} failed ({code}):\n{log.read()[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "wall_s": wall, "peak_bytes": usage.ru_maxrss * 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, nargs="+", default=[1, 5, 20], help="copies of every clip per set")
    p.add_argument("--epochs", type=int, default=2, help="float training epochs")
    p.add_argument("--work", default=None, help="folder for the sets, caches and runs (default: a temporary one)")
    p.add_argument("--source", default=str(SOURCE), help="Speech Commands clips to grow the sets from")
    p.add_argument("overrides", nargs="*", help="train.py overrides (e.g. experiment=study)")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="growth-"))
    rows = []
    try:
        for copies in a.copies:
            root = work / f"data-x{copies}"
            t0 = time.perf_counter()
            if not root.exists():
                build(Path(a.source), root, copies)
            clips = sum(1 for _ in root.glob("*/*.wav"))
            build_s = time.perf_counter() - t0
            common = [f"data.root={root}", "data.task=kws12", "logger=none", f"cache_dir={work / f'cache-x{copies}'}",
                      *a.overrides]
            runs = work / f"runs-x{copies}"
            first = stage([*common, "quant=none", f"trainer.epochs={a.epochs}", "trainer.patience=0"], runs / "float")
            float_epochs = first["summary"]["float/epochs"]
            train_args = [f"trainer.epochs={a.epochs}", "trainer.patience=0"]
            ptq = stage([*common, *train_args, "quant=ptq", "bits=4"], runs / "ptq")
            qat = stage([*common, *train_args, "quant=qat", "bits=4", "quant.epochs=1"], runs / "qat")
            s = first["summary"]
            rows.append({"clips": clips, "n_train": s["n_train"], "build_s": build_s,
                         "features_s": s["time/features_s"], "float_epoch_s": s["float/sec_per_epoch"],
                         "float_epochs": float_epochs, "float_peak": first["peak_bytes"], "float_wall_s": first["wall_s"],
                         "ptq_s": ptq["summary"]["time/recipe_s"], "ptq_peak": ptq["peak_bytes"],
                         "qat_s": qat["summary"]["time/recipe_s"], "qat_epoch_s": qat["summary"]["qat/sec_per_epoch"],
                         "qat_peak": qat["peak_bytes"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    gib = 1024 ** 3
    print(f"\n{' '.join(a.overrides) or 'default config'}; {os.cpu_count()} CPUs")
    print("| clips (train) | features s [per clip vs smallest] | float s / epoch [per clip] | ptq s [per clip] "
          "| qat s [per clip] | peak GiB: features + float / ptq / qat |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = lambda k: r[k] / r["clips"] / (base[k] / base["clips"])
        print(f"| {r['clips']:,} ({r['n_train']:,}) | {r['features_s']:.1f} [{per('features_s'):.2f}] "
              f"| {r['float_epoch_s']:.1f} [{per('float_epoch_s'):.2f}] | {r['ptq_s']:.1f} [{per('ptq_s'):.2f}] "
              f"| {r['qat_s']:.1f} [{per('qat_s'):.2f}] | {r['float_peak'] / gib:.2f} / {r['ptq_peak'] / gib:.2f} / "
              f"{r['qat_peak'] / gib:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
