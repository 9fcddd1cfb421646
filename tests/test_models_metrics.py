"""The float model's shapes and spec checks, and the classification figures by hand."""
import numpy as np
import pytest

from qat.errors import ConfigError
from qat.metrics import classification_report, confusion_matrix, flip_noise
from qat.training.models import build_model
from tests import specs


def test_study_model_shapes_and_size():
    model = build_model((49, 257), 3, specs.model())
    assert [l.name for l in model.layers] == ["features", "lstm", "flatten", "dense"]
    assert model.output_shape == (None, 3)
    units, inputs = 80, 257
    lstm = 4 * units * (inputs + units + 1)
    dense = 49 * units * 3 + 3
    assert model.count_params() == lstm + dense
    out = model(np.zeros((2, 49, 257), np.float32)).numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_stacked_model_with_normalization():
    mean, var = np.arange(257, dtype=np.float32), np.ones(257, np.float32)
    model = build_model((49, 257), 12, specs.model(units=32, layers=2, dropout=0.1), mean, var)
    assert [l.name for l in model.layers] == ["features", "normalize", "lstm", "lstm_1", "flatten", "dropout", "dense"]
    assert model.get_layer("lstm_1").output_shape == (None, 49, 32)


@pytest.mark.parametrize("kwargs", [{"units": 0}, {"layers": 0}, {"dropout": 1.0}, {"dropout": "abc"}])
def test_bad_model_spec(kwargs):
    with pytest.raises(ConfigError, match="model."):
        specs.model(**kwargs)


def test_classification_report_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["acc"] == pytest.approx(6 / 8)
    assert r["balanced_acc"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    f1 = [2 * 1 * 0.75 / 1.75, 2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (5 / 3)]
    assert r["macro_f1"] == pytest.approx(np.mean(f1))
    assert r["per_class_acc"] == pytest.approx({"a": 0.75, "b": 0.5, "c": 1.0})


def test_flip_noise_by_hand():
    """Clips only the float model gets right (n10 = 3), only the quantized one (n01 = 1), of n = 10:
    sd = sqrt(1 + 3 - (1 - 3)^2 / 10) / 10 in points."""
    a = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    out = flip_noise(a, b)
    assert (out["flips_lost"], out["flips_gained"]) == (3, 1)
    assert out["noise_sd"] == pytest.approx(100 * np.sqrt(4 - 0.4) / 10)
    assert flip_noise(a, a)["noise_sd"] == 0.0
