"""Data sets: speaker-disjoint splits, the study's label folding, FSDD's official split, WAV reading,
your own folder of clips, and bad files and settings."""
import shutil

import numpy as np
import pytest
import soundfile

from qat.data.datasets import SPLITS, list_files, load_waveforms, read_wav, speaker_of, split_of
from qat.errors import ConfigError, DataError
from tests import specs


def DataSpec(option="speech_commands", /, **changes):
    """conf/data/<option>.yaml with these changes."""
    return specs.data(option, **changes)


@pytest.mark.parametrize("task,n_classes", [("seed", 3), ("kws12", 12)])
def test_speech_commands_split_is_speaker_disjoint_80_10_10(speech_commands_root, task, n_classes):
    files = list_files(DataSpec(root=str(speech_commands_root), task=task))
    assert len(files.class_names) == n_classes
    speakers = {s: set(files.speakers[s]) for s in SPLITS}
    assert not speakers["train"] & speakers["val"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    for split in SPLITS:  # the speakers really are the hash before _nohash_
        assert all(speaker_of(p) == s for p, s in zip(files.files[split], files.speakers[split]))
    total = sum(len(files.files[s]) for s in SPLITS)
    share = {s: len(files.files[s]) / total for s in SPLITS}
    assert 0.7 < share["train"] < 0.9 and 0.05 < share["val"] < 0.15 and 0.05 < share["test"] < 0.15


def test_seed_task_folds_six_words_into_unknown(speech_commands_root):
    files = list_files(DataSpec(root=str(speech_commands_root), task="seed"))
    assert files.class_names == ["yes", "no", "unknown"]
    unknown = [p for s in SPLITS for p, y in zip(files.files[s], files.labels[s]) if y == 2]
    words = {p.split("/")[-2] for p in unknown}
    assert words == {"down", "go", "left", "right", "stop", "up"}


def test_split_is_stable_per_speaker():
    # The part depends on the speaker id alone, not on the rest of the data set.
    parts = [split_of("0a7c2a8d", 10, 10, "lstm-qat") for _ in range(3)]
    assert len(set(parts)) == 1
    counts = {s: 0 for s in SPLITS}
    for i in range(4000):
        counts[split_of(f"{i:08x}", 10, 10, "lstm-qat")] += 1
    assert abs(counts["val"] / 4000 - 0.1) < 0.02 and abs(counts["test"] / 4000 - 0.1) < 0.02


def test_unsalted_rule_sends_the_canonical_test_archive_to_test(speech_commands_root):
    # Why split_salt exists: Speech Commands' own rule put these speakers in its test set.
    files = list_files(DataSpec(root=str(speech_commands_root), task="seed"))
    speakers = {s for split in SPLITS for s in files.speakers[split]}
    assert {split_of(s, 10, 10, "") for s in speakers} == {"test"}


def test_fsdd_official_split(fsdd_root):
    files = list_files(DataSpec("fsdd", root=str(fsdd_root)))
    assert files.class_names == [str(d) for d in range(10)]
    take = lambda p: int(p.rsplit("_", 1)[1].split(".")[0])
    assert len(files.files["test"]) == 300 and all(take(p) <= 4 for p in files.files["test"])
    assert all(5 <= take(p) <= 9 for p in files.files["val"])
    assert all(take(p) >= 10 for p in files.files["train"])


def test_fsdd_is_resampled_and_padded(fsdd_root):
    path = str(next(fsdd_root.glob("0_george_0.wav")))
    raw, rate = soundfile.read(path)
    assert rate == 8000
    wave = read_wav(path, 16000, 16000)
    assert wave.shape == (16000,) and wave.dtype == np.float32
    n = 2 * len(raw)  # resampled length; the rest is zero padding
    assert n < 16000 and np.all(wave[n + 2:] == 0) and np.abs(wave[:n]).max() > 0.01


def test_long_clip_is_cropped(speech_commands_root, tmp_path):
    src = next((speech_commands_root / "yes").glob("*.wav"))
    audio, rate = soundfile.read(src, dtype="float32")
    long = tmp_path / "long.wav"
    soundfile.write(long, np.concatenate([audio, audio]), rate)
    np.testing.assert_allclose(read_wav(str(long), 16000, 16000), audio, atol=1e-4)


def _folder_dataset(root, speech_commands_root, n=12):
    for label in ("yes", "no"):
        (root / label).mkdir(parents=True)
        for p in sorted((speech_commands_root / label).glob("*.wav"))[:n]:
            shutil.copy(p, root / label / p.name)


def test_folder_dataset_and_bad_files(speech_commands_root, tmp_path):
    root = tmp_path / "mine"
    _folder_dataset(root, speech_commands_root, n=40)
    (root / "yes" / "zz_corrupt.wav").write_bytes(b"RIFF\x00\x00not a wav at all")
    (root / "no" / "zz_empty.wav").write_bytes(b"")
    spec = DataSpec("folder", root=str(root))
    files = list_files(spec)
    assert files.class_names == ["no", "yes"]
    paths = [p for s in SPLITS for p in files.files[s]]
    with pytest.raises(DataError, match="zz_(corrupt|empty).wav"):
        load_waveforms(paths, spec)
    waves, kept = load_waveforms(paths, DataSpec("folder", root=str(root), on_bad_file="skip"))
    assert (~kept).sum() == 2 and len(waves) == len(paths) - 2


def test_missing_root_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=f"looked in {tmp_path / 'nope'}.*data.root"):
        list_files(DataSpec(root=str(tmp_path / "nope")))


@pytest.mark.parametrize("kwargs,needle", [({"name": "mnist"}, "data.name='mnist'"),
                                           ({"task": "kws35"}, "data.task='kws35'"),
                                           ({"task": None}, "data.task=None is not allowed with data.name=speech"),
                                           ({"on_bad_file": "ignore"}, "data.on_bad_file"),
                                           ({"sample_rate": "abc"}, "data.sample_rate='abc'"),
                                           ({"clip_seconds": "abc"}, "data.clip_seconds='abc'"),
                                           ({"val_percent": 60, "test_percent": 50}, "val_percent")])
def test_bad_data_spec(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        DataSpec(**kwargs)
