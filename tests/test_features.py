"""The front end against a numpy STFT oracle, its options, and the feature cache."""
import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

import qat.data.features
from qat.data.datasets import SPLITS, load_waveforms
from qat.data.features import compute_features, load_features, normalization_stats, split_features
from qat.errors import ConfigError
from tests import specs

STFT = specs.features()          # the study's front end (conf/features/stft.yaml)


def FeatureSpec(**changes):
    return specs.features(**changes) if changes else STFT


def numpy_stft_magnitude(x, frame_length=480, frame_step=320, fft_length=512):
    """Independent reference: periodic Hann window, frames without padding, |rfft|."""
    n = np.arange(frame_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / frame_length)
    frames = 1 + (len(x) - frame_length) // frame_step
    out = np.stack([np.abs(np.fft.rfft(x[i * frame_step:i * frame_step + frame_length] * window, fft_length))
                    for i in range(frames)])
    return out


def test_study_front_end_matches_numpy_stft(speech_commands_root):
    path = next((speech_commands_root / "yes").glob("*.wav"))
    wave, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and len(wave) == 16000
    feats = compute_features(wave[None], FeatureSpec(), 16000)
    assert feats.shape == (1, 49, 257)
    ref = numpy_stft_magnitude(wave.astype(np.float64))
    np.testing.assert_allclose(feats[0], ref, rtol=1e-3, atol=1e-4 * ref.max())


def test_log_and_mel_options():
    rng = np.random.default_rng(0)
    wave = rng.normal(size=(2, 16000)).astype(np.float32)
    lin = compute_features(wave, FeatureSpec(), 16000)
    logged = compute_features(wave, FeatureSpec(log=True), 16000)
    np.testing.assert_allclose(logged, np.log(lin + 1e-6), rtol=1e-4, atol=1e-4)
    assert compute_features(wave, FeatureSpec(mel_bins=40), 16000).shape == (2, 49, 40)


@pytest.mark.parametrize("floor_db", [20, 50])
def test_log_floor_is_relative_to_each_clips_peak(floor_db):
    """Numpy oracle: log(max(x, peak_of_clip * 10^(-dB/20)) + offset); a silent tail and the empty
    upper bands of 8 kHz audio upsampled to 16 kHz all sit exactly on the floor."""
    rng = np.random.default_rng(0)
    wave = np.zeros((2, 16000), np.float32)
    wave[0, :8000] = resample_poly(rng.normal(size=4000), 2, 1)          # band-limited, then silence
    wave[1] = 0.01 * rng.normal(size=16000)                              # quieter clip: its own floor
    spec = FeatureSpec(log=True, log_floor_db=floor_db)
    lin = compute_features(wave, FeatureSpec(), 16000).astype(np.float64)
    floor = lin.max(axis=(1, 2), keepdims=True) * 10 ** (-floor_db / 20)
    out = compute_features(wave, spec, 16000)
    np.testing.assert_allclose(out, np.log(np.maximum(lin, floor) + 1e-6), rtol=1e-4, atol=1e-4)
    assert np.allclose(out[0, 30:], np.log(floor[0, 0, 0] + 1e-6), atol=1e-4)  # the silent half: one level
    assert out[1].min() < out[0].min()          # per clip: the quieter clip has the lower floor
    np.testing.assert_array_equal(compute_features(wave, FeatureSpec(log=True, log_floor_db=0), 16000),
                                  compute_features(wave, FeatureSpec(log=True), 16000))


def test_normalization_stats_are_per_frequency():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(50, 49, 7)).astype(np.float32)
    mean, var = normalization_stats(x)
    assert mean.shape == var.shape == (7,)
    np.testing.assert_allclose(mean, x.reshape(-1, 7).mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, x.reshape(-1, 7).var(0), rtol=1e-4)


def test_normalization_stats_in_chunks_equal_one_pass(monkeypatch):
    x = np.random.default_rng(2).normal(-4.0, 3.0, size=(37, 11, 5)).astype(np.float32)
    whole = normalization_stats(x)
    monkeypatch.setattr(qat.data.features, "STATS_CHUNK", 4)          # 10 chunks, the last partial
    chunked = normalization_stats(x)
    flat = x.reshape(-1, 5).astype(np.float64)
    for got in (whole, chunked):
        np.testing.assert_allclose(got[0], flat.mean(0), rtol=1e-6)
        np.testing.assert_allclose(got[1], flat.var(0), rtol=1e-6)


def test_features_are_cached(speech_commands_root, cache_dir, monkeypatch):
    data = specs.data(root=str(speech_commands_root), limit_per_class=15)
    first = load_features(data, FeatureSpec(), cache_dir)
    assert first.x["train"].shape[1:] == (49, 257) and first.hop_ms == 20.0

    def no_recompute(*args, **kwargs):
        raise AssertionError("features were recomputed although they are cached")

    monkeypatch.setattr(qat.data.features, "compute_features", no_recompute)
    second = load_features(data, FeatureSpec(), cache_dir)
    for s in SPLITS:
        np.testing.assert_array_equal(first.x[s], second.x[s])
        np.testing.assert_array_equal(first.y[s], second.y[s])
    assert second.key == first.key and second.hop_ms == 20.0
    with pytest.raises(AssertionError, match="recomputed"):   # another front end is another cache entry
        load_features(data, FeatureSpec(log=True), cache_dir)


@pytest.mark.parametrize("kwargs", [{"fft_length": 256}, {"mel_bins": -1}, {"frame_step": 0}, {"log_floor_db": -3},
                                    {"log_floor_db": "x"}])
def test_bad_feature_spec(kwargs):
    with pytest.raises(ConfigError, match="features."):
        FeatureSpec(**kwargs)


def test_features_read_in_chunks_equal_the_whole_split_read_at_once(speech_commands_root, tmp_path, monkeypatch):
    """Reading a split a few clips at a time (bounded memory) gives the features of reading it whole,
    an unreadable clip left out in either way."""
    paths = sorted(str(p) for p in (speech_commands_root / "yes").glob("*.wav"))[:9]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file")
    paths.insert(4, str(bad))
    data = specs.data(root=str(speech_commands_root), on_bad_file="skip")
    feats = specs.features(option="log_mel")
    waves, whole_kept = load_waveforms(paths, data)
    whole = compute_features(waves, feats, data.sample_rate)
    monkeypatch.setattr(qat.data.features, "WAVE_CHUNK", 3)
    chunked, kept = split_features(paths, data, feats)
    assert kept.tolist() == whole_kept.tolist() and kept.sum() == 9 and not kept[4]
    # equal up to float32 rounding: TensorFlow's batched FFT / matmul may round differently for a
    # batch of 3 than for a batch of 9
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-5)
