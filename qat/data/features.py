"""The front end: waveforms -> STFT magnitude frames, as in the study, with optional mel filterbank
and log compression; features are cached per data set + feature config."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from qat.checks import Checked, Flag, Integer, Number, rejected, setting
from qat.data.datasets import SPLITS, DataSpec, list_files, load_waveforms
from qat.errors import DataError
from qat.io import atomic_path, file_lock, remove_stale
from qat.memo import Recent

log = logging.getLogger(__name__)

CACHE_VERSION = 2


@dataclass(frozen=True)
class FeatureSpec(Checked):
    """STFT settings (the study's: 480 / 320 / 512 on 16 kHz, magnitude) and optional extras
    (conf/features/*.yaml)."""

    section = "features"

    frame_length: int = setting(Integer(1))
    frame_step: int = setting(Integer(1))
    fft_length: int = setting(Integer(1))
    mel_bins: int = setting(Integer(0, expected="0 (linear bins) or a number of mel bands"))
    log: bool = setting(Flag())                      # log(x + log_offset) compression
    log_offset: float = setting(Number(0, low_open=True))
    log_floor_db: float = setting(Number(0, expected="a number of dB >= 0 (0 = no floor)"))  # floor at peak - dB
    normalize: bool = setting(Flag())   # per-frequency mean / variance, fitted on the training part (in the model)

    def check(self) -> None:
        if self.fft_length < self.frame_length:
            raise rejected("features.fft_length", self.fft_length, f">= features.frame_length={self.frame_length}")
        if self.mel_bins > self.fft_length // 2 + 1:
            raise rejected("features.mel_bins", self.mel_bins, f"0 (linear bins) or 1..{self.fft_length // 2 + 1}")

    def shape(self, num_samples: int) -> Tuple[int, int]:
        """(frames, bins) of one clip."""
        frames = 1 + (num_samples - self.frame_length) // self.frame_step
        return frames, (self.mel_bins or self.fft_length // 2 + 1)


def features_tf(waves, spec: FeatureSpec, sample_rate: int):
    """TensorFlow front end for a [batch, samples] float tensor -> [batch, frames, bins]; usable inside
    tf.data pipelines (augmentation) and for export."""
    stft = tf.signal.stft(waves, frame_length=spec.frame_length, frame_step=spec.frame_step,
                          fft_length=spec.fft_length)
    x = tf.abs(stft)
    if spec.mel_bins:
        matrix = tf.signal.linear_to_mel_weight_matrix(spec.mel_bins, spec.fft_length // 2 + 1, sample_rate,
                                                       20.0, sample_rate / 2.0)
        x = tf.tensordot(x, matrix, 1)
    if spec.log:
        if spec.log_floor_db > 0:   # relative floor: digital silence and empty bands become one level
            peak = tf.reduce_max(x, axis=[-2, -1], keepdims=True)
            x = tf.maximum(x, peak * 10.0 ** (-spec.log_floor_db / 20.0))
        x = tf.math.log(x + spec.log_offset)
    return x


def compute_features(waves: np.ndarray, spec: FeatureSpec, sample_rate: int, batch: int = 256) -> np.ndarray:
    """Features of an [N, samples] array, computed in batches to bound memory."""
    frames, bins = spec.shape(waves.shape[1])
    out = np.zeros((len(waves), frames, bins), np.float32)
    for start in range(0, len(waves), batch):
        out[start:start + batch] = features_tf(waves[start:start + batch], spec, sample_rate).numpy()
    return out


STATS_CHUNK = 4096   # clips per step of the normalisation statistics (float64 copies stay small)


def normalization_stats(x_train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-frequency mean and variance over clips and frames of the training features, in float64
    over chunks of clips (two passes: the mean, then the squared deviations from it)."""
    bins = x_train.shape[-1]
    chunks = lambda: (x_train[s:s + STATS_CHUNK].reshape(-1, bins).astype(np.float64)
                      for s in range(0, len(x_train), STATS_CHUNK))
    count = x_train.size // bins
    mean = sum(c.sum(axis=0) for c in chunks()) / count
    var = sum(((c - mean) ** 2).sum(axis=0) for c in chunks()) / count
    return mean.astype(np.float32), np.maximum(var, 1e-12).astype(np.float32)


@dataclass
class Features:
    """Features and labels of each split of a data set."""

    x: Dict[str, np.ndarray]
    y: Dict[str, np.ndarray]
    files: Dict[str, List[str]]
    class_names: List[str]
    key: str = ""        # digest of data + front end: identifies these features in caches
    hop_ms: float = 0.0  # time between two frames (frame_step / sample rate), for shifts in frames
    skipped: Dict[str, List[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})  # unreadable, skipped

    @property
    def input_shape(self) -> Tuple[int, int]:
        return tuple(self.x["train"].shape[1:])


def cache_key(data: DataSpec, feats: FeatureSpec, signature: str) -> str:
    """Digest of what determines the features: data set content and split, clip length, front end."""
    content = asdict(data)
    for ignored in ("root", "download"):   # where the data lives does not change the features
        content.pop(ignored)
    blob = json.dumps({"v": CACHE_VERSION, "data": content, "features": asdict(feats), "files": signature},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _mtime(path: Path) -> Optional[int]:
    return path.stat().st_mtime_ns if path.is_file() else None


def _read_cache(path: Path, key: str, hop_ms: float) -> Optional[Features]:
    """The cached features in `path`, or None if absent or damaged (a damaged file is named)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = Features({s: z[f"x_{s}"] for s in SPLITS}, {s: z[f"y_{s}"] for s in SPLITS},
                           {s: list(z[f"files_{s}"]) for s in SPLITS}, list(z["class_names"]), key, hop_ms,
                           {s: list(z[f"skipped_{s}"]) for s in SPLITS})
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("feature cache %s is damaged (%s: %s); computing the features again", path, type(e).__name__, e)
        return None
    log.info("features from cache %s", path)
    return out


WAVE_CHUNK = 2048   # clips read at once: the waveforms held in memory stay bounded however large the set


def split_features(paths: List[str], data: DataSpec, feats: FeatureSpec) -> Tuple[np.ndarray, np.ndarray]:
    """(features of the readable clips, kept mask) of one split, reading `WAVE_CHUNK` clips at a
    time, so that memory holds the features and one chunk of waveforms, never the whole split's."""
    frames, bins = feats.shape(data.num_samples)
    out = np.zeros((len(paths), frames, bins), np.float32)
    kept = np.ones(len(paths), bool)
    for start in range(0, len(paths), WAVE_CHUNK):
        waves, ok = load_waveforms(paths[start:start + WAVE_CHUNK], data)
        kept[start:start + len(ok)] = ok
        out[start:start + len(ok)][ok] = compute_features(waves, feats, data.sample_rate)
    return (out if kept.all() else out[kept]), kept


def _compute(file_list, data: DataSpec, feats: FeatureSpec, key: str, hop_ms: float) -> Features:
    x, y, files, skipped = {}, {}, {}, {}
    for split in SPLITS:
        x[split], kept = split_features(file_list.files[split], data, feats)
        y[split] = np.asarray(file_list.labels[split], np.int64)[kept]
        files[split] = [f for f, k in zip(file_list.files[split], kept) if k]
        skipped[split] = [f for f, k in zip(file_list.files[split], kept) if not k]
        if len(x[split]) == 0:
            raise DataError(f"no readable clips in the {split} part of {data.name!r}")
    return Features(x, y, files, file_list.class_names, key, hop_ms, skipped)


# The features the last job of this process read or wrote, with the cache file's mtime: the jobs of
# a sweep in one process share them (callers never change a Features' arrays).
_RECENT = Recent(1)


def load_features(data: DataSpec, feats: FeatureSpec, cache_dir: str | None) -> Features:
    """Features of every split, from the cache when the same data and front end were seen before,
    else computed from the WAV files and cached (written atomically, under a lock so that parallel
    runs compute them once). A damaged cache file is named and replaced; a cache that cannot be
    written (read-only, another user's file) is a warning, and the run goes on without caching. An
    earlier job of the same process that used the same cache file, unchanged since, hands its
    Features over without reading the file again."""
    file_list = list_files(data)
    key = cache_key(data, feats, file_list.signature())
    hop_ms = 1000.0 * feats.frame_step / data.sample_rate
    if not cache_dir:
        return _compute(file_list, data, feats, key, hop_ms)
    path = Path(os.path.expanduser(cache_dir)) / "features" / f"{data.name}-{key}.npz"
    seen = _mtime(path)
    if seen is not None and (recent := _RECENT.get(str(path))) is not None and recent[0] == seen:
        log.info("features from cache %s (read by this process before)", path)   # file unchanged since
        return recent[1]
    if (cached := _read_cache(path, key, hop_ms)) is not None:
        _RECENT.put(str(path), (seen, cached))
        return cached
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path.with_suffix(".lock"), f"computing the features {path.name}"))
        except OSError as e:
            log.warning("feature cache %s cannot be written (%s); computing the features without caching",
                        path.parent, e)
            return _compute(file_list, data, feats, key, hop_ms)
        if _mtime(path) != seen and (cached := _read_cache(path, key, hop_ms)) is not None:
            return cached                                          # another run wrote it meanwhile
        remove_stale(path.parent, f".{path.name}.")
        out = _compute(file_list, data, feats, key, hop_ms)
        try:
            _save_atomic(path, out)
            _RECENT.put(str(path), (_mtime(path), out))
        except OSError as e:
            log.warning("could not write the feature cache %s (%s); going on without caching", path, e)
        return out


def _save_atomic(path: Path, f: Features) -> None:
    arrays = {"class_names": np.asarray(f.class_names)}
    for s in SPLITS:
        arrays.update({f"x_{s}": f.x[s], f"y_{s}": f.y[s], f"files_{s}": np.asarray(f.files[s], dtype=str),
                       f"skipped_{s}": np.asarray(f.skipped[s], dtype=str)})
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    log.info("features cached in %s", path)
