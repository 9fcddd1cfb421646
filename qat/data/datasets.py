"""Speech data sets as lists of labelled WAV files, split into train / validation / test, and loaded
as fixed-length mono waveforms.

Three sources:
- `speech_commands`: `<label>/<speaker>_nohash_<n>.wav` (Google Speech Commands layout), tasks
  `seed` (yes / no / unknown, the study's task) and `kws12` (ten words + _unknown_ + _silence_);
  speaker-disjoint split by hashing the speaker id, as the Speech Commands convention does.
- `fsdd`: Free Spoken Digit Dataset, `{digit}_{speaker}_{take}.wav`, official split (takes 0-4 = test).
- `folder`: any folder-per-label tree of WAV files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import soundfile
from scipy.signal import resample_poly

from qat.checks import Checked, Integer, ListOf, Nullable, Number, OneOf, Text, setting
from qat.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("speech_commands", "fsdd", "folder")
TASKS = ("seed", "kws12")
SPLITS = ("train", "val", "test")
ON_BAD_FILE = ("error", "skip")

SEED_WORDS = ("yes", "no")
SEED_UNKNOWN = ("down", "go", "left", "right", "stop", "up")
KWS12_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"

# Speech Commands' own split rule (tensorflow/examples/speech_commands/input_data.py).
_MAX_NUM_WAVS_PER_CLASS = 2 ** 27 - 1
_SPEAKER = re.compile(r"([0-9a-f]{8})_nohash_", re.IGNORECASE)

DOWNLOADS = {
    # name -> (url, folder inside the archive that holds the label folders / recordings)
    "mini_speech_commands": ("http://storage.googleapis.com/download.tensorflow.org/data/mini_speech_commands.zip",
                             "mini_speech_commands"),
    "speech_commands_v0.02": ("http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz", "."),
    "fsdd": ("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
             "free-spoken-digit-dataset-1.0.10/recordings"),
}


@dataclass(frozen=True)
class DataSpec(Checked):
    """Which clips, which labels, how they are split and how long they are (conf/data/*.yaml; a
    setting that does not apply to a source is null there)."""

    section = "data"

    name: str = setting(OneOf(SOURCES))
    root: str = setting(Text())
    task: Optional[str] = setting(Nullable(OneOf(TASKS)))             # speech_commands only
    sample_rate: int = setting(Integer(1000, expected="an integer >= 1000 (Hz)"))
    clip_seconds: float = setting(Number(0, low_open=True))
    val_percent: Optional[float] = setting(Nullable(Number(0, 100, high_open=True)))   # share of speakers
    test_percent: Optional[float] = setting(Nullable(Number(0, 100, low_open=True, high_open=True)))
    split_salt: Optional[str] = setting(Nullable(Text()))             # see split_of(); "" = Speech Commands' own
    fsdd_val_takes: Optional[Tuple[int, int]] = setting(Nullable(ListOf(Integer(0), length=2)))  # fsdd only
    limit_per_class: Optional[int] = setting(Nullable(Integer(1)))   # keep the first N files of each label
    on_bad_file: str = setting(OneOf(ON_BAD_FILE))   # error: stop naming the file; skip: warn and count
    download: Optional[str] = setting(Nullable(OneOf(tuple(DOWNLOADS))))  # fetched into `root` when missing

    def check(self) -> None:
        needs = {"fsdd": ("fsdd_val_takes",), "folder": ("val_percent", "test_percent", "split_salt"),
                 "speech_commands": ("task", "val_percent", "test_percent", "split_salt")}[self.name]
        for key in needs:
            if getattr(self, key) is None:
                raise ConfigError(f"data.{key}=None is not allowed with data.name={self.name}: expected a value")
        if self.val_percent is not None and self.test_percent is not None \
                and not self.val_percent + self.test_percent < 100:
            raise ConfigError(f"data.val_percent={self.val_percent}, data.test_percent={self.test_percent} "
                              "are not allowed: expected val + test < 100")

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def task_name(self) -> str:
        """The task a run reports: the speech_commands task, else the data set's name."""
        return self.task if self.name == "speech_commands" else self.name


@dataclass
class FileList:
    """Every clip of a data set: path, label index and split, plus the label names."""

    class_names: List[str]
    files: Dict[str, List[str]] = field(default_factory=dict)    # split -> paths
    labels: Dict[str, List[int]] = field(default_factory=dict)   # split -> label indices
    speakers: Dict[str, List[str]] = field(default_factory=dict)  # split -> speaker ids

    def signature(self) -> str:
        """A digest of the file names, sizes and labels: changes when the data on disk changes."""
        h = hashlib.sha1()
        for split in SPLITS:
            for path, label in zip(self.files[split], self.labels[split]):
                h.update(f"{split}|{os.path.basename(path)}|{os.path.getsize(path)}|{label}\n".encode())
        return h.hexdigest()


def speaker_of(path: str) -> str:
    """The speaker id of a Speech Commands clip (8 hex digits before `_nohash_`); the file stem
    where there is none (the `_silence_` clips)."""
    base = os.path.basename(path)
    m = _SPEAKER.search(base)
    return m.group(1).lower() if m else base.split(".")[0]


def split_of(speaker: str, val_percent: float, test_percent: float, salt: str = "") -> str:
    """Stable speaker-level split: hash the speaker id into [0, 100) as Speech Commands does, so a
    speaker lands in the same part whatever else is in the data set.

    The salt is prepended to the speaker id. It exists because the canonical Speech Commands test
    archive (../shared/data/speech_commands_v2_test) holds exactly the speakers that the unsalted
    rule sends to "test": without a salt every clip of it would land in one part.
    """
    key = f"{salt}:{speaker}" if salt else speaker
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16)
    pct = (digest % (_MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_NUM_WAVS_PER_CLASS)
    if pct < val_percent:
        return "val"
    if pct < val_percent + test_percent:
        return "test"
    return "train"


def _wavs(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file())


def _check_root(spec: DataSpec) -> Path:
    root = Path(os.path.expanduser(spec.root)).resolve() if spec.root else None
    if root is None or not root.is_dir():
        if root is not None and spec.download:
            download(spec.download, root)
            return root
        raise ConfigError(
            f"data set {spec.name!r} not found: looked in {str(root) if root else '(data.root is empty)'}; "
            "point data.root=<folder> (or set LSTM_QAT_DATA=<folder holding the data sets>) at it, "
            f"or add data.download=<{'|'.join(DOWNLOADS)}> on a machine with a network")
    return root


def list_files(spec: DataSpec) -> FileList:
    """Find every clip of the data set, label it and assign it to train / val / test."""
    root = _check_root(spec)
    if spec.name == "speech_commands":
        by_label = _speech_commands_labels(root, spec.task)
    elif spec.name == "fsdd":
        by_label = _fsdd_labels(root)
    else:
        by_label = _folder_labels(root)
    if not by_label or not any(by_label.values()):
        raise DataError(f"no WAV files found for data.name={spec.name!r} under {root}")
    class_names = list(by_label)
    out = FileList(class_names, {s: [] for s in SPLITS}, {s: [] for s in SPLITS}, {s: [] for s in SPLITS})
    for index, name in enumerate(class_names):
        paths = by_label[name][: spec.limit_per_class] if spec.limit_per_class else by_label[name]
        for path in paths:
            if spec.name == "fsdd":
                speaker, split = _fsdd_split(path, spec.fsdd_val_takes)
            else:
                speaker = speaker_of(path)
                split = split_of(speaker, spec.val_percent, spec.test_percent, spec.split_salt)
            out.files[split].append(path)
            out.labels[split].append(index)
            out.speakers[split].append(speaker)
    for split in SPLITS:
        if not out.files[split]:
            raise DataError(f"the {split} part of {spec.name!r} under {root} is empty "
                            f"(data.limit_per_class={spec.limit_per_class}); use more clips per class")
    return out


def _distinct(folders: List[Path]) -> None:
    """DataError if two label folders are one folder on disk (a symlink): its clips would be counted
    under two labels."""
    seen: Dict[str, Path] = {}
    for f in folders:
        real = os.path.realpath(f)
        if real in seen:
            raise DataError(f"label folders {seen[real]} and {f} are the same folder ({real}): remove one of "
                            "them (a symlink?)")
        seen[real] = f


def _folder_labels(root: Path) -> Dict[str, List[str]]:
    """`folder` source: every non-hidden sub-folder is a label and must hold WAV files."""
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    _distinct(folders)
    labels = {d.name: _wavs(d) for d in folders}
    for d in folders:
        if not labels[d.name]:
            raise DataError(f"label folder {d} holds no .wav files: add clips to it or remove it")
    return labels


def _speech_commands_labels(root: Path, task: str) -> Dict[str, List[str]]:
    def folder(word):
        path = root / word
        if not path.is_dir():
            raise DataError(f"{root} does not look like Speech Commands: no folder {word!r} "
                            "(expected <label>/<speaker>_nohash_<n>.wav)")
        return _wavs(path)

    _distinct([d for d in root.iterdir() if d.is_dir()])
    if task == "seed":
        labels = {w: folder(w) for w in SEED_WORDS}
        labels["unknown"] = sorted(p for w in SEED_UNKNOWN for p in folder(w))
        return labels
    labels = {w: folder(w) for w in KWS12_WORDS}
    # The full v0.02 archive has one folder per extra word and _background_noise_; the canonical
    # test archive (and ../shared/data) ships ready-made _unknown_ and _silence_ folders.
    if (root / UNKNOWN).is_dir():
        labels[UNKNOWN] = folder(UNKNOWN)
    else:
        extra = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith("_")
                 and d.name not in KWS12_WORDS]
        labels[UNKNOWN] = sorted(p for d in extra for p in _wavs(d))
    labels[SILENCE] = folder(SILENCE) if (root / SILENCE).is_dir() else []
    if not labels[SILENCE]:
        raise DataError(f"task kws12 needs a {SILENCE} folder of one-second noise clips under {root}")
    return labels


_FSDD = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def _fsdd_labels(root: Path) -> Dict[str, List[str]]:
    labels: Dict[str, List[str]] = {str(d): [] for d in range(10)}
    for path in _wavs(root):
        m = _FSDD.match(os.path.basename(path))
        if m:
            labels[m.group(1)].append(path)
    if not any(labels.values()):
        raise DataError(f"{root} does not look like FSDD: no files named {{digit}}_{{speaker}}_{{take}}.wav")
    return labels


def _fsdd_split(path: str, val_takes: Tuple[int, int]) -> Tuple[str, str]:
    _, speaker, take = _FSDD.match(os.path.basename(path)).groups()
    take = int(take)
    if take <= 4:
        return speaker, "test"          # the data set's official split
    if val_takes[0] <= take <= val_takes[1]:
        return speaker, "val"
    return speaker, "train"


def _declared_frames(path: str) -> Optional[int]:
    """The number of sample frames a RIFF / WAVE header announces (its data chunk size over the
    frame size), or None where the file is not such a WAV or does not say (streamed files)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = fh.read(size + (size & 1))
                    block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
                elif cid == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    fh.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return None


def read_wav(path: str, sample_rate: int, num_samples: int) -> np.ndarray:
    """One clip as float32 mono at `sample_rate`, zero-padded at the end or cropped to `num_samples`.

    Raises DataError naming the file when it is empty, corrupt or not audio.
    """
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors for corrupt / non-audio files
        raise DataError(f"cannot read WAV file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if audio.size == 0:
        raise DataError(f"cannot read WAV file {path}: it holds no samples")
    declared = _declared_frames(path)
    if declared is not None and len(audio) < declared:
        raise DataError(f"cannot read WAV file {path}: it holds {len(audio)} of the {declared} samples its "
                        "header announces (a truncated file)")
    audio = audio.mean(axis=1)
    if not np.all(np.isfinite(audio)):
        raise DataError(f"cannot read WAV file {path}: it holds NaN or Inf samples")
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        audio = resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.pad(audio, (0, num_samples - len(audio)))


def load_waveforms(paths: List[str], spec: DataSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Read clips into an [N, num_samples] array. Returns (waves, kept) where `kept` is a boolean
    mask of the files read; with on_bad_file=skip unreadable files are left out and counted."""
    waves = np.zeros((len(paths), spec.num_samples), np.float32)
    kept = np.ones(len(paths), bool)
    for i, path in enumerate(paths):
        try:
            waves[i] = read_wav(path, spec.sample_rate, spec.num_samples)
        except DataError as e:
            if spec.on_bad_file == "error":
                raise
            kept[i] = False
            log.debug("skipped: %s", e)
    if not kept.all():
        log.warning("skipped %d unreadable WAV file(s) of %d (data.on_bad_file=skip)", (~kept).sum(), len(paths))
    return waves[kept], kept


def download(name: str, dest: Path) -> Path:
    """Fetch a public data set archive into `dest` (needs a network; never called by tests or the
    default run). The archive is unpacked in a temporary folder next to `dest` and moved in place
    at the end, so an interrupted download leaves nothing half-written."""
    url, inner = DOWNLOADS[name]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s", name, url)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / os.path.basename(url)
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:
            raise DataError(f"cannot download {name} from {url}: {e}")
        unpacked = Path(tmp) / "unpacked"
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(unpacked)
        else:
            with tarfile.open(archive) as t:
                t.extractall(unpacked, filter="data")
        shutil.move(str(unpacked / inner), str(dest))
    return dest
