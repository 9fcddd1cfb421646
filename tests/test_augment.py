"""Augmentation (qat.data.augment) on real clips: waveform shift and noise mixing, the frame-shift pipeline
on cached features, its trainer settings and the config files that use it."""
import os
import re

import numpy as np
import pytest
import soundfile
import tensorflow as tf

from qat.data.augment import (MIN_NOISE_RMS, augment, frame_shift_dataset, load_noise, mix_noise, noise_files,
                              shift_frames, shift_in_frames, time_shift, training_data, training_dataset,
                              training_waveforms)
from qat.data.batches import RowFile
from qat.data.datasets import SILENCE, list_files, load_waveforms, speaker_of, split_of
from qat.data.features import Features, compute_features, load_features
from qat.errors import ConfigError
from qat.experiment import train_float
from qat.tracking import Tracker
from tests import specs
from tests.conftest import SPEECH_COMMANDS

N = 16000


def DataSpec(option="speech_commands", /, **changes):
    return specs.data(option, **changes)


def FeatureSpec(**changes):
    """conf/features/stft.yaml (the study's front end) with these changes."""
    return specs.features("stft", **changes)


def TrainSpec(**changes):
    """conf/trainer/default.yaml (the study's trainer) with these changes."""
    return specs.trainer("default", **changes)


def rms(x):
    return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1))


@pytest.fixture(scope="module")
def clips():
    """Six real one-second clips of the seed task (two per label) and their labels."""
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    data = DataSpec(root=str(SPEECH_COMMANDS), limit_per_class=40)
    files = list_files(data)
    paths = [p for label in range(3)
             for p in [q for q, y in zip(files.files["train"], files.labels["train"]) if y == label][:2]]
    waves, _ = load_waveforms(paths, data)
    return data, waves, np.repeat(np.arange(3), 2)


@pytest.fixture(scope="module")
def noise(clips):
    data = clips[0]
    return load_noise(noise_files(data, None)[:8], data.sample_rate, data.num_samples)


def test_time_shift_keeps_length_and_shifts_with_zero_fill(clips):
    waves = clips[1]
    out = time_shift(waves, 1600, [3, 4]).numpy()
    assert out.shape == waves.shape
    for x, y in zip(waves, out):
        k = int(np.argmax(np.correlate(np.abs(y), np.abs(x), "full"))) - (N - 1)   # y[t] = x[t - k]
        assert -1600 <= k <= 1600
        expected = np.zeros(N, np.float32)
        if k >= 0:
            expected[k:] = x[:N - k]
        else:
            expected[:k] = x[-k:]
        np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(time_shift(waves, 0, [3, 4]), waves)


def test_noise_is_mixed_at_the_intended_snr(clips, noise):
    waves = clips[1]
    out = mix_noise(waves, noise, 1.0, (5.0, 15.0), [1, 2]).numpy()
    added = out - waves
    snr = 20 * np.log10(rms(waves) / rms(added))
    assert np.all(snr >= 5.0 - 1e-3) and np.all(snr <= 15.0 + 1e-3) and np.ptp(snr) > 0.1
    for a in added:   # each addition is a scaled piece of real noise
        corr = np.abs(noise @ a) / (np.linalg.norm(noise, axis=1) * np.linalg.norm(a))
        assert corr.max() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_array_equal(mix_noise(waves, noise, 0.0, (5.0, 15.0), [1, 2]), waves)


def test_noise_probability_leaves_some_clips_clean(clips, noise):
    waves = np.tile(clips[1], (20, 1))   # 120 clips
    out = mix_noise(waves, noise, 0.5, (10.0, 30.0), [7, 7]).numpy()
    changed = np.any(out != waves, axis=1).mean()
    assert 0.3 < changed < 0.7


def test_augmentation_is_deterministic_given_the_seed(clips, noise):
    waves = clips[1]
    kw = dict(max_shift=1600, noise=noise, noise_prob=0.8, snr_db=(0.0, 20.0))
    a, b, c = (augment(waves, s, **kw).numpy() for s in ([0, 1], [0, 1], [0, 2]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_only_train_split_silence_clips_are_noise(speech_commands_root):
    data = DataSpec(root=str(speech_commands_root), task="kws12")
    used = noise_files(data, None)
    everything = sorted(p.name for p in (speech_commands_root / SILENCE).glob("*.wav"))
    assert 0 < len(used) < len(everything)
    assert all(os.path.basename(os.path.dirname(f)) == SILENCE for f in used)
    assert all(split_of(speaker_of(f), 10, 10, "lstm-qat") == "train" for f in used)
    held_out = set(list_files(data).files["val"]) | set(list_files(data).files["test"])
    assert not held_out & set(used)
    # another salt moves speakers between parts, and the noise follows the data's split
    other = noise_files(DataSpec(root=str(speech_commands_root), task="kws12", split_salt="other"), None)
    assert set(other) != set(used)


def test_noise_sources(fsdd_root, tmp_path):
    assert noise_files(DataSpec("fsdd", root=str(fsdd_root)), None) == []   # FSDD has no noise
    with pytest.raises(ConfigError, match="trainer.noise_dir='/nowhere' is not a folder"):
        noise_files(DataSpec("fsdd", root=str(fsdd_root)), "/nowhere")
    # a long recording (as in _background_noise_) is cut into clip-length pieces; digital silence is dropped
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "long.wav", 0.05 * rng.standard_normal(int(2.5 * N)), N)
    soundfile.write(tmp_path / "zeros.wav", np.zeros(N), N)
    files = noise_files(DataSpec("fsdd", root=str(fsdd_root)), str(tmp_path))
    bank = load_noise(files, N, N)
    assert bank.shape == (2, N) and np.all(rms(bank) >= MIN_NOISE_RMS)


def test_pipeline_without_augmentation_gives_the_cached_features(clips):
    data, waves, labels = clips
    spec = FeatureSpec(mel_bins=40, log=True)
    ds, steps = training_dataset(waves, labels, spec, data.sample_rate, batch_size=4, seed=0)
    assert steps == 2
    batches = list(ds.take(2 * steps).as_numpy_iterator())
    x = np.concatenate([b[0] for b in batches[:steps]])
    y = np.concatenate([b[1] for b in batches[:steps]])
    cached = compute_features(waves, spec, data.sample_rate)
    order = [int(np.argmin(np.abs(cached - xi).reshape(len(cached), -1).max(axis=1))) for xi in x]
    assert sorted(order) == list(range(len(waves)))           # every clip once per epoch
    np.testing.assert_allclose(x, cached[order], atol=1e-4)
    np.testing.assert_array_equal(y, labels[order])
    again, _ = training_dataset(waves, labels, spec, data.sample_rate, batch_size=4, seed=0)
    for b1, b2 in zip(batches, again.take(2 * steps).as_numpy_iterator()):
        np.testing.assert_array_equal(b1[0], b2[0])
    # the second epoch is reshuffled
    assert not np.array_equal(np.concatenate([b[1] for b in batches[steps:]]), y) or len(set(labels)) == 1


@pytest.mark.parametrize("values,needle", [
    (dict(time_shift_ms=-5), "trainer.time_shift_ms=-5 is not allowed"),
    (dict(noise_prob=1.5), "trainer.noise_prob=1.5 is not allowed"),
    (dict(noise_snr_db=[30, 10]), "trainer.noise_snr_db=[30, 10] is not allowed"),
    (dict(noise_snr_db="loud"), "trainer.noise_snr_db='loud' is not allowed"),
    (dict(noise_dir=3), "trainer.noise_dir=3 is not allowed")])
def test_bad_augmentation_settings_give_one_line_errors(values, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        TrainSpec(**values)
    assert "\n" not in str(e.value)


def test_augmentation_flag():
    assert not TrainSpec().augment
    assert TrainSpec(time_shift_ms=100).augment and TrainSpec(noise_prob=0.5).augment
    assert TrainSpec(noise_snr_db=[0, 20]).noise_snr_db == (0.0, 20.0)


composed = specs.run


def test_study_recipe_is_unchanged():
    spec = composed("features=stft", "trainer=default")
    assert spec.features == FeatureSpec() and spec.trainer == TrainSpec() and not spec.trainer.augment
    study = composed("experiment=study")
    assert study.features == FeatureSpec() and study.trainer == TrainSpec() and study.model.dropout == 0
    assert study.model.recurrent_dropout == 0


def test_option_files_and_preset_compose():
    assert composed("features=log_stft").features == FeatureSpec(log=True)
    assert composed("features=log_stft_norm").features == FeatureSpec(log=True, normalize=True)
    assert composed("features=log_mel").features == FeatureSpec(mel_bins=40, log=True, log_floor_db=50,
                                                                normalize=True)
    shift = composed("trainer=time_shift").trainer
    assert shift.time_shift_ms == 100 and shift.noise_prob == 0 and (shift.epochs, shift.patience) == (30, 8)
    assert composed("trainer=augment").trainer.noise_prob == 0.5
    balanced = composed("trainer=balanced").trainer
    assert (balanced.class_weight, balanced.lr_schedule) == ("balanced", "cosine")
    best = composed("experiment=seed_task_best")
    assert best.features == FeatureSpec(mel_bins=40, log=True, log_floor_db=50, normalize=True)
    assert best.model.units == 80 and best.model.layers == 1 and best.model.dropout == 0
    assert best.trainer.time_shift_ms == 100
    assert composed("experiment=seed_task_best", "data=fsdd", "trainer.noise_prob=0.5").trainer.noise_prob == 0.5


def test_train_float_with_augmentation(speech_commands_root):
    spec = specs.run(f"data.root={speech_commands_root}", "data.limit_per_class=40", "features=log_stft",
                     "features.mel_bins=40", "model.units=8", "trainer=default", "trainer.epochs=2",
                     "trainer.batch_size=16", "trainer.time_shift_ms=50", "trainer.noise_prob=0.5",
                     "trainer.lr_schedule=cosine", "trainer.class_weight=balanced")
    feats = load_features(spec.data, spec.features, None)
    _, info = train_float(spec, feats, Tracker())
    assert info["epochs"] == 2 and info["aug_noise_pieces"] > 0
    assert np.all(np.isfinite(info["history"]["loss"]))


def test_data_without_noise_shifts_frames_and_says_so(fsdd_root, caplog):
    data = DataSpec("fsdd", root=str(fsdd_root))
    files = sorted(str(p) for p in fsdd_root.glob("*_jackson_4[0-3].wav"))[:4]
    x = compute_features(load_waveforms(files, data)[0], FeatureSpec(), data.sample_rate)
    feats = Features({"train": x}, {"train": np.arange(4)}, {"train": files}, ["a", "b", "c", "d"], "k", 20.0)
    ds, steps, info = training_data(data, FeatureSpec(), TrainSpec(noise_prob=0.5, time_shift_ms=40, batch_size=2),
                                    feats, seed=0)
    assert steps == 2 and info["aug_noise_pieces"] == 0 and info["aug_pipeline"] == "frames"
    assert info["aug_shift_frames"] == 2
    assert "noise mixing is off" in caplog.text
    xb, _ = next(iter(ds))
    assert tuple(xb.shape) == (2, 49, 257)
    assert training_data(data, FeatureSpec(), TrainSpec(), feats, seed=0) == (None, None, {})


def test_frame_shift_equals_a_waveform_shift_by_whole_hops(clips):
    """The oracle: features of the waveform shifted by k hops (zero-filled) are the frames shifted by
    k, except the two frames at the seam; `shift_frames` gives each clip one such shift."""
    data, waves, _ = clips
    spec = FeatureSpec()                      # magnitudes: the silence level of a zero-filled frame is 0
    x = compute_features(waves, spec, data.sample_rate)
    hop = spec.frame_step
    for k in (-3, -1, 2, 5):
        moved = np.zeros_like(waves)
        if k >= 0:
            moved[:, k * hop:] = waves[:, :N - k * hop]
        else:
            moved[:, :k * hop] = waves[:, -k * hop:]
        oracle = compute_features(moved, spec, data.sample_rate)
        inner = slice(max(k, 0) + 2, x.shape[1] + min(k, 0) - 2)
        for xi, oi in zip(x, oracle):
            np.testing.assert_allclose(_shifted(xi, k)[inner], oi[inner], atol=1e-4)
    out = shift_frames(x, 5, [7, 3]).numpy()
    assert out.shape == x.shape
    found = [[s for s in range(-5, 6) if np.array_equal(o, _shifted(xi, s))] for o, xi in zip(out, x)]
    assert all(found), "each clip is shifted by a whole number of frames in [-5, 5]"
    np.testing.assert_array_equal(shift_frames(x, 0, [7, 3]), x)


def _shifted(x, k):
    """Numpy reference: frames moved by k (later in time for k > 0), the clip's minimum shifted in."""
    out = np.full_like(x, x.min())
    if k >= 0:
        out[k:] = x[:len(x) - k]
    else:
        out[:k] = x[-k:]
    return out


def test_frame_shift_dataset_is_seeded_and_covers_every_clip(clips):
    data, waves, labels = clips
    x = compute_features(waves, FeatureSpec(mel_bins=40, log=True), data.sample_rate)
    ds, steps = frame_shift_dataset(x, labels, batch_size=4, seed=1, max_frames=3)
    batches = list(ds.take(2 * steps).as_numpy_iterator())
    again = list(frame_shift_dataset(x, labels, batch_size=4, seed=1, max_frames=3)[0].take(2 * steps)
                 .as_numpy_iterator())
    for b1, b2 in zip(batches, again):
        np.testing.assert_array_equal(b1[0], b2[0])
    first = np.concatenate([b[0] for b in batches[:steps]])
    y = np.concatenate([b[1] for b in batches[:steps]])
    assert sorted(y) == sorted(labels)
    shifts = []
    for xi, yi in zip(first, y):
        match = [(c, s) for c in range(len(x)) for s in range(-3, 4)
                 if labels[c] == yi and np.array_equal(xi, _shifted(x[c], s))]
        assert match, "every batch row is one clip shifted by at most 3 frames"
        shifts.append(match[0][1])
    assert len(set(shifts)) > 1                                   # the shifts are random, not constant


@pytest.mark.parametrize("ms,hop,frames", [(0, 20, 0), (100, 20, 5), (5, 20, 1), (50, 20, 2), (30, 20, 2)])
def test_shift_in_frames(ms, hop, frames):
    assert shift_in_frames(ms, hop) == frames


def test_batches_come_in_the_order_shuffling_the_rows_gives(clips):
    """The pipelines shuffle row indices and gather each batch in place; the order is the one
    shuffling the rows themselves with the same seed gives (tf.data's own pipeline as the oracle)."""
    data, waves, labels = clips
    x = compute_features(waves, FeatureSpec(mel_bins=40, log=True), data.sample_rate)
    ds, steps = frame_shift_dataset(x, labels, batch_size=4, seed=3, max_frames=0)
    oracle = tf.data.Dataset.from_tensor_slices((x, labels)).shuffle(len(x), seed=3, reshuffle_each_iteration=True)
    oracle = oracle.batch(4).repeat()
    for (bx, by), (ox, oy) in zip(ds.take(3 * steps).as_numpy_iterator(), oracle.take(3 * steps).as_numpy_iterator()):
        np.testing.assert_array_equal(by, oy)
        np.testing.assert_array_equal(bx, ox)


def test_training_waveforms_are_read_from_the_cache_row_by_row(clips, tmp_path):
    data, waves, _ = clips
    files = [str(p) for p in list_files(data).files["train"][:5]]
    expected, _ = load_waveforms(files, data)
    mapped = training_waveforms(files, data, str(tmp_path), "k")
    assert isinstance(mapped, RowFile) and mapped.dtype == np.float32 and mapped.shape == expected.shape
    np.testing.assert_array_equal(mapped[[4, 0, 2]], expected[[4, 0, 2]])
    np.testing.assert_array_equal(np.load(tmp_path / "waveforms" / f"{data.name}-k.npy"), expected)   # a real .npy
    np.testing.assert_array_equal(mapped, expected)
    path = tmp_path / "waveforms" / f"{data.name}-k.npy"
    stamp = path.stat().st_mtime_ns
    np.testing.assert_array_equal(training_waveforms(files, data, str(tmp_path), "k"), expected)
    assert path.stat().st_mtime_ns == stamp                         # read again, not rewritten
    np.testing.assert_array_equal(training_waveforms(files[:3], data, str(tmp_path), "k"), expected[:3])  # other shape
    np.testing.assert_array_equal(training_waveforms(files, data, None, "k"), expected)   # no cache: in memory
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]                 # no temporary left
    ds, steps = training_dataset(mapped, np.arange(5) % 3, FeatureSpec(mel_bins=40, log=True), data.sample_rate,
                                 batch_size=2, seed=0, max_shift=800)
    assert sum(len(b[1]) for b in ds.take(steps).as_numpy_iterator()) == 5
