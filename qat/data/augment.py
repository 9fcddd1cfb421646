"""Training-clip augmentation for keyword spotting: a random time shift and background-noise mixing
at a random signal-to-noise ratio, so every epoch sees new variants of the clips.

Two pipelines (`training_data` picks): without noise mixing, the shift moves the cached feature
frames by whole hops (20 ms in the study's front end), filling with the clip's silence level; this
costs next to nothing per epoch and also serves QAT fine-tuning, which only has features. With
noise mixing the waveforms are shifted (by samples) and mixed batch by batch, and the features are
computed on the fly (`qat.features.features_tf`, the same front end as the cached features).

Randomness is stateless and keyed by (seed, step): the same seed gives the same augmented batches.

Background noise: the `_silence_` clips of a Speech Commands folder (one-second recordings of real
background noise) or the long `_background_noise_` recordings (cut into clip-length pieces). Clips of
a `_silence_` folder are also examples of the kws12 task, so only those that the data set's hashed
speaker split puts into "train" are used as noise: no test clip ever leaks into training.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import soundfile
import tensorflow as tf

from qat.data.batches import RowFile, gathered
from qat.data.datasets import SILENCE, DataSpec, load_waveforms, read_wav, speaker_of, split_of
from qat.data.features import WAVE_CHUNK, features_tf
from qat.errors import ConfigError, DataError
from qat.io import atomic_path

log = logging.getLogger(__name__)

BACKGROUND = "_background_noise_"
NOISE_FOLDERS = (SILENCE, BACKGROUND)   # looked up under data.root, in this order
MIN_NOISE_RMS = 1e-4                    # quieter clips are digital silence, not noise: left out


def noise_folder(data: DataSpec, noise_dir: Optional[str]) -> Optional[Path]:
    """The folder of background-noise WAVs: `noise_dir` if given (it must exist), else the data
    set's own `_silence_` or `_background_noise_` folder, else None (the data set has none)."""
    if noise_dir:
        path = Path(os.path.expanduser(noise_dir))
        if not path.is_dir():
            raise ConfigError(f"trainer.noise_dir={noise_dir!r} is not a folder: expected a folder of "
                              "background-noise WAV files (e.g. <speech commands>/_silence_)")
        return path
    root = Path(os.path.expanduser(data.root)) if data.root else None
    for name in NOISE_FOLDERS:
        if root is not None and (root / name).is_dir():
            return root / name
    return None


def noise_files(data: DataSpec, noise_dir: Optional[str]) -> List[str]:
    """The noise WAVs to mix into training clips. Clips of a `_silence_` folder are kept only where
    the data set's speaker-hash split (file stem as id, as `qat.data.datasets.list_files` does) says "train"."""
    folder = noise_folder(data, noise_dir)
    if folder is None:
        return []
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
    if folder.name == SILENCE:
        files = [f for f in files
                 if split_of(speaker_of(f), data.val_percent, data.test_percent, data.split_salt) == "train"]
    return files


def load_noise(files: Sequence[str], sample_rate: int, num_samples: int) -> np.ndarray:
    """[K, num_samples] float32 noise pieces: each file cut into clip-length pieces (a shorter file is
    one zero-padded piece); near-silent pieces (RMS < MIN_NOISE_RMS) are left out."""
    pieces = []
    for path in files:
        try:
            info = soundfile.info(path)
        except Exception as e:  # libsndfile's errors for corrupt / non-audio files
            raise DataError(f"cannot read noise WAV file {path}: {str(e).splitlines()[0] if str(e) else e}")
        length = max(num_samples, int(round(info.frames * sample_rate / info.samplerate)))
        audio = read_wav(path, sample_rate, length)
        for start in range(0, max(len(audio) - num_samples, 0) + 1, num_samples):
            pieces.append(audio[start:start + num_samples])
    bank = np.asarray(pieces, np.float32).reshape(-1, num_samples)
    rms = np.sqrt(np.mean(np.square(bank, dtype=np.float64), axis=1))
    return bank[rms >= MIN_NOISE_RMS]


def time_shift(waves, max_shift: int, seed):
    """Shift each clip of a [batch, samples] tensor by a uniform random number of samples in
    [-max_shift, max_shift], filling with zeros: the length is unchanged."""
    if max_shift <= 0:
        return waves
    n = tf.shape(waves)[1]
    offsets = tf.random.stateless_uniform([tf.shape(waves)[0]], seed, minval=0, maxval=2 * max_shift + 1,
                                          dtype=tf.int32)
    padded = tf.pad(waves, [[0, 0], [max_shift, max_shift]])
    idx = offsets[:, None] + tf.range(n)[None, :]
    return tf.gather(padded, idx, batch_dims=1)


def rms(x, axis=-1):
    return tf.sqrt(tf.reduce_mean(tf.square(x), axis=axis))


def mix_noise(waves, noise, prob: float, snr_db: Tuple[float, float], seed):
    """Add a random piece of `noise` ([K, samples]) to each clip with probability `prob`, scaled so
    that RMS(clip) / RMS(noise) is a uniform random SNR in [snr_db[0], snr_db[1]] dB."""
    if prob <= 0 or noise is None or noise.shape[0] == 0:
        return waves
    batch = tf.shape(waves)[0]
    s_pick, s_snr, s_on = (tf.random.experimental.stateless_fold_in(seed, i) for i in (1, 2, 3))
    pick = tf.random.stateless_uniform([batch], s_pick, minval=0, maxval=noise.shape[0], dtype=tf.int32)
    chosen = tf.gather(noise, pick)
    snr = tf.random.stateless_uniform([batch], s_snr, minval=float(snr_db[0]), maxval=float(snr_db[1]))
    on = tf.cast(tf.random.stateless_uniform([batch], s_on) < prob, waves.dtype)
    gain = rms(waves) / (tf.maximum(rms(chosen), 1e-12) * tf.pow(10.0, snr / 20.0))
    return waves + (on * gain)[:, None] * chosen


def augment(waves, seed, *, max_shift: int = 0, noise=None, noise_prob: float = 0.0,
            snr_db: Tuple[float, float] = (10.0, 30.0)):
    """Time shift, then noise mixing, of a [batch, samples] tensor; `seed` is a stateless seed
    (shape [2] integers): the same seed gives the same result."""
    seed = tf.cast(seed, tf.int64)
    waves = time_shift(waves, max_shift, tf.random.experimental.stateless_fold_in(seed, 0))
    return mix_noise(waves, noise, noise_prob, snr_db, tf.random.experimental.stateless_fold_in(seed, 1))


def shift_frames(x, max_frames: int, seed):
    """Shift each clip of a [batch, frames, bins] tensor by a uniform random whole number of frames
    in [-max_frames, max_frames]; frames shifted in take the clip's smallest value (its silence
    level: 0 for magnitudes, the floor / log offset for log features). The length is unchanged."""
    if max_frames <= 0:
        return x
    batch, n = tf.shape(x)[0], tf.shape(x)[1]
    offsets = tf.random.stateless_uniform([batch], seed, minval=0, maxval=2 * max_frames + 1, dtype=tf.int32)
    silence = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    pad = tf.broadcast_to(silence, [batch, max_frames, tf.shape(x)[2]])
    padded = tf.concat([pad, x, pad], axis=1)
    return tf.gather(padded, offsets[:, None] + tf.range(n)[None, :], batch_dims=1)


def _epochs_of(arrays: tuple, batch_size: int, seed: int, step):
    """Shuffle each epoch, batch (never straddling epochs), repeat, and map `step(i, batch)`. The
    shuffle runs over row indices (the same order as shuffling the rows themselves with this seed)
    and each batch is gathered from the arrays in place (qat.data.batches.gathered): a RowFile is
    read batch by batch, and no pipeline holds a copy of the set."""
    n = len(arrays[0])
    indices = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size).repeat()
    ds = gathered(indices, arrays)
    return ds.enumerate().map(step, num_parallel_calls=2, deterministic=True).prefetch(2)


def _float32(x):
    """x as float32 rows, itself where it already is (an array in place, or a RowFile)."""
    return x if x.dtype == np.float32 else np.asarray(x, np.float32)


def frame_shift_dataset(x: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, max_frames: int):
    """An endless tf.data pipeline of (features, labels) batches of cached features, each clip shifted
    by up to `max_frames` frames (`shift_frames`), reshuffled each epoch. Returns (dataset,
    steps_per_epoch). Deterministic given `seed`."""
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} feature arrays but {len(labels)} labels")

    def step(i, batch):
        return shift_frames(batch[0], max_frames, tf.stack([tf.constant(seed, tf.int64), i])), batch[1]

    return _epochs_of((_float32(x), labels.astype(np.int64)), batch_size, seed, step), int(np.ceil(len(x) / batch_size))


def shift_in_frames(time_shift_ms: float, hop_ms: float) -> int:
    """The largest whole number of frames within +/- time_shift_ms (at least 1 when shifting at all)."""
    if time_shift_ms <= 0:
        return 0
    return max(1, int(round(time_shift_ms / hop_ms)))


def training_dataset(waves: np.ndarray, labels: np.ndarray, feature_spec, sample_rate: int, batch_size: int,
                     seed: int, *, max_shift: int = 0, noise: Optional[np.ndarray] = None,
                     noise_prob: float = 0.0, snr_db: Tuple[float, float] = (10.0, 30.0)):
    """An endless tf.data pipeline of (features, labels) batches: clips shuffled each epoch, augmented
    and turned into features on the fly. Returns (dataset, steps_per_epoch); batches never straddle
    epochs. Deterministic given `seed`."""
    if len(waves) != len(labels):
        raise ValueError(f"{len(waves)} waveforms but {len(labels)} labels")
    steps = int(np.ceil(len(waves) / batch_size))
    noise_t = None if noise is None or len(noise) == 0 else tf.constant(noise, tf.float32)

    def step(i, batch):
        x, y = batch
        x = augment(x, tf.stack([tf.constant(seed, tf.int64), i]), max_shift=max_shift, noise=noise_t,
                    noise_prob=noise_prob, snr_db=snr_db)
        return features_tf(x, feature_spec, sample_rate), y

    return _epochs_of((_float32(waves), labels.astype(np.int64)), batch_size, seed, step), steps


def noise_bank(data: DataSpec, trainer) -> Optional[np.ndarray]:
    """[K, samples] noise pieces for the trainer's noise mixing, or None where mixing is off or the
    data set has no background noise (FSDD; a warning says so)."""
    if trainer.noise_prob <= 0:
        return None
    noise_list = noise_files(data, trainer.noise_dir)
    noise = load_noise(noise_list, data.sample_rate, data.num_samples) if noise_list else None
    if noise is None or len(noise) == 0:
        log.warning("trainer.noise_prob=%s but data %r has no background noise (no %s folder under %s): "
                    "noise mixing is off; set trainer.noise_dir=<folder of noise WAVs> to mix noise",
                    trainer.noise_prob, data.name, " or ".join(NOISE_FOLDERS), data.root)
        return None
    log.info("noise mixing: %d noise pieces from %d files", len(noise), len(noise_list))
    return noise


def training_waveforms(files: Sequence[str], data: DataSpec, cache_dir: Optional[str], key: str):
    """[N, samples] float32 waveforms of the training clips `files`, read WAVE_CHUNK clips at a time
    into `<cache_dir>/waveforms/<data>-<key>.npy` (written once, atomically; one of another shape is
    written again) and handed over as a qat.data.batches.RowFile, which the noise-mixing pipeline
    reads batch by batch: memory holds a chunk, not the set. Without a cache_dir, an array in memory.
    A clip that cannot be read now but was read when the features (key) were cached is a DataError."""
    shape = (len(files), data.num_samples)

    def read_into_chunk(out: np.ndarray, start: int) -> None:
        waves, kept = load_waveforms(list(files[start:start + len(out)]), data)
        if not kept.all():
            raise DataError(f"{int((~kept).sum())} training clip(s) of {data.name!r} are unreadable now but were "
                            "read when the features were cached: clear the feature cache (cache_dir) and rerun")
        out[:] = waves

    if not cache_dir:
        out = np.zeros(shape, np.float32)
        for start in range(0, len(files), WAVE_CHUNK):
            read_into_chunk(out[start:start + WAVE_CHUNK], start)
        return out
    path = Path(os.path.expanduser(cache_dir)) / "waveforms" / f"{data.name}-{key}.npy"
    try:
        cached = RowFile(path)
        if cached.shape == shape and cached.dtype == np.float32:
            return cached
    except (OSError, ValueError):
        pass
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                      "fortran_order": False, "shape": shape})
            for start in range(0, len(files), WAVE_CHUNK):
                chunk = np.zeros((min(WAVE_CHUNK, len(files) - start), data.num_samples), np.float32)
                read_into_chunk(chunk, start)
                fh.write(chunk.tobytes())
    log.info("training waveforms cached in %s", path)
    return RowFile(path)


def training_data(data: Optional[DataSpec], feature_spec, trainer, feats, seed: int,
                  cache_dir: Optional[str] = None):
    """The training split of `feats` as an augmented pipeline set up from the trainer's settings
    (`time_shift_ms`, `noise_prob`, `noise_snr_db`, `noise_dir`), or (None, None, {}) when the
    trainer does not augment.

    Without noise (mixing off, no noise in the data set, or `data=None` as in QAT fine-tuning, which
    has only features) the cached frames are shifted by whole hops; with noise the waveforms are
    read, shifted, mixed and turned into features on the fly (read batch by batch from a copy of the
    training waveforms under `cache_dir`: `training_waveforms`). Returns (dataset, steps_per_epoch,
    info) with info = {"aug_pipeline": "frames" | "waveforms", "aug_noise_pieces": K, "aug_setup_s": s}.
    """
    if not trainer.augment:
        return None, None, {}
    t0 = time.perf_counter()
    noise = noise_bank(data, trainer) if data is not None else None
    labels = feats.y["train"]
    if noise is None:
        max_frames = shift_in_frames(trainer.time_shift_ms, feats.hop_ms)
        if max_frames == 0:
            return None, None, {}
        dataset, steps = frame_shift_dataset(feats.x["train"], labels, trainer.batch_size, seed, max_frames)
        return dataset, steps, {"aug_pipeline": "frames", "aug_shift_frames": max_frames, "aug_noise_pieces": 0,
                                "aug_setup_s": time.perf_counter() - t0}
    waves = training_waveforms(feats.files["train"], data, cache_dir, feats.key)
    max_shift = int(round(trainer.time_shift_ms * data.sample_rate / 1000.0))
    dataset, steps = training_dataset(waves, labels, feature_spec, data.sample_rate, trainer.batch_size, seed,
                                      max_shift=max_shift, noise=noise, noise_prob=trainer.noise_prob,
                                      snr_db=trainer.noise_snr_db)
    return dataset, steps, {"aug_pipeline": "waveforms", "aug_noise_pieces": int(len(noise)),
                            "aug_setup_s": time.perf_counter() - t0}
