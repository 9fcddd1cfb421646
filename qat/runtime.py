"""TensorFlow's start-up, without the lines it prints to stderr that say nothing to a user.

Loading TensorFlow's C++ libraries prints, before its logging is set up (so TF_CPP_MIN_LOG_LEVEL
cannot filter them): "All log messages before absl::InitializeLog() ...", "oneDNN custom operations
are on ...", "Could not find cuda drivers ..." and "This TensorFlow binary is optimized to use
available CPU instructions ..." (each library once), and the first device query on a machine
without a GPU logs "failed call to cuInit". All of them describe this machine, not the run; so do
the INFO lines of TensorFlow's Python logger (e.g. "Assets written to" when a model is exported
for the TFLite converter), which is set to WARNING, and the retracing warnings of functions traced once per model
(`PerModelRetracingFilter`). The entry points call
`start_tensorflow_quietly()` before anything imports TensorFlow: it imports TensorFlow and lists its
devices with the process's stderr (file descriptor 2) pointed at /dev/null, then restores it. Python exceptions raised meanwhile are not affected (they propagate
and are printed after stderr is back).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PerModelRetracingFilter(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to <function ...> triggered tf.function
    retracing" warning when the function is traced once per model or layer: Keras' predict / test /
    train functions and the quantized recurrent layers' calibration pass (`_intermediates`). Each is
    one Python function wrapped anew for every model, so every new model (PTQ's candidates, QAT's
    stages, the predictor's part measurements) counts as a retrace of "the same function" although
    each is traced once. Retracing of any other function is still reported."""

    PER_MODEL = ("Model.make_predict_function", "Model.make_test_function", "Model.make_train_function",
                 "._intermediates at ")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and any(k in message for k in self.PER_MODEL))


def start_tensorflow_quietly() -> None:
    """Import TensorFlow and initialise its devices without the start-up lines (see the module doc);
    TensorFlow's Python logger keeps warnings and errors, not its INFO lines."""
    with stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()
    tf.get_logger().setLevel(logging.WARNING)
    tf.get_logger().addFilter(PerModelRetracingFilter())
