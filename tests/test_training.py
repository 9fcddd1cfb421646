"""Float training: seeded and bit-identical, its options, class weights, and the float-model cache."""
import numpy as np
import pytest

from qat.data.features import load_features
from qat.experiment import train_float
from qat.tracking import Tracker
from qat.training.checkpoints import cached_float_model
from qat.training.fit import class_weights
from tests import specs
from tests.conftest import SPEECH_COMMANDS

SMALL = ("features=stft", "model.units=16", "trainer=default", "trainer.epochs=2", "trainer.batch_size=32")


@pytest.fixture(scope="module")
def small_features(tmp_path_factory):
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"real speech data not found at {SPEECH_COMMANDS}")
    run = specs.run(f"data.root={SPEECH_COMMANDS}", "data.limit_per_class=40", "features=stft")
    return load_features(run.data, run.features, str(tmp_path_factory.mktemp("cache")))


def _spec(seed, *overrides):
    return specs.run(*SMALL, f"seed={seed}", *overrides)


def test_same_seed_gives_identical_float_weights(small_features):
    a, _ = train_float(_spec(7), small_features, Tracker())
    b, _ = train_float(_spec(7), small_features, Tracker())
    c, _ = train_float(_spec(8), small_features, Tracker())
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights()))


def test_training_options_run(small_features):
    model, info = train_float(_spec(0, "model.dropout=0.2", "features.normalize=true", "trainer.batch_size=64",
                                    "trainer.lr_schedule=cosine", "trainer.class_weight=balanced"),
                              small_features, Tracker())
    assert info["epochs"] == 2 and set(info["history"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert model.get_layer("normalize") is not None


def test_class_weights_balance_counts():
    y = np.array([0] * 10 + [1] * 30)
    w = class_weights(y, 2)
    assert w[0] * 10 == pytest.approx(w[1] * 30)
    assert (w[0] * 10 + w[1] * 30) / 40 == pytest.approx(1.0)


def test_float_checkpoint_is_trained_once_and_reused(small_features, tmp_path):
    calls = []

    def train():
        calls.append(1)
        return train_float(_spec(3), small_features, Tracker())

    m1, info1, reused1 = cached_float_model(str(tmp_path), "k1", train)
    m2, info2, reused2 = cached_float_model(str(tmp_path), "k1", train)
    assert (reused1, reused2) == (False, True) and len(calls) == 1
    assert info1 == info2
    for w1, w2 in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(w1, w2)
    _, _, reused3 = cached_float_model(str(tmp_path), "k1", train, reuse=False)
    assert not reused3 and len(calls) == 2
    assert not list((tmp_path / "float").glob(".*tmp*"))   # no half-written folders left behind
