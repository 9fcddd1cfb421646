"""Shared test setup: Keras 2 for TensorFlow, and the real speech data in ../shared/data."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LSTM_QAT_REPO", str(REPO))   # the configs' default data root: ../shared/data
DATA = Path(os.environ.get("LSTM_QAT_DATA", REPO.parent / "shared" / "data"))
SPEECH_COMMANDS = DATA / "speech_commands_v2_test"
FSDD = DATA / "fsdd"


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real speech data not found at {path} (set LSTM_QAT_DATA to the folder holding "
                    "speech_commands_v2_test/ and fsdd/)")
    return path


@pytest.fixture
def speech_commands_root() -> Path:
    return _need(SPEECH_COMMANDS)


@pytest.fixture
def fsdd_root() -> Path:
    return _need(FSDD)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")
