"""Integer-only inference: the integer arithmetic against exact formulas, the integer mode of QLSTM /
QDense against the numpy reference (same integer logits) and the compiled C export, and its rules."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from qat.algorithms.calibration import batches, calibrate
from qat.errors import ConfigError, DataError
from qat.export.c_source import KERNEL_C, KERNEL_H, export_c, find_compiler
from qat.export.integer import IntegerModel, integer_inputs, integer_logits, integer_summary
from qat.export.packed import write_packed_model
from qat.layers.model import QuantConfig, freeze_ranges, integer_modes, quantize_model
from qat.quant import integer as iq
from qat.quant.spec import QuantSpec
from qat.recipes.base import BitWidths, RecipeSpec
from tests.conftest import REPO
from tests.test_end_to_end import run, small

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------- arithmetic

def test_multiplier_is_the_float32_factor_exactly():
    r = np.concatenate([RNG.uniform(1e-6, 1e3, 500), [1.0, 0.5, 2.0 ** -20, 3.0]]).astype(np.float32)
    m, n = iq.multiplier(r)
    assert np.all(m < 2 ** 24) and np.all(n >= 1)
    assert np.array_equal(m.astype(np.float64) * 2.0 ** -n.astype(np.float64), r.astype(np.float64))
    mt, nt = iq.multiplier_tf(tf.constant(r))
    assert np.array_equal(mt.numpy(), m) and np.array_equal(nt.numpy(), n)


def test_requantize_rounds_half_away_from_zero_like_exact_arithmetic():
    acc = RNG.integers(-2 ** 24, 2 ** 24, 4000)
    r = np.float32(RNG.uniform(1e-4, 2.0))
    m, n = iq.multiplier(r)
    exact = acc.astype(np.float64) * float(r)          # exact in float64: 25-bit x 24-bit
    expected = np.sign(exact) * np.floor(np.abs(exact) + 0.5)
    got = iq.requantize(acc, m, n)
    assert np.array_equal(got, expected.astype(np.int64))
    assert np.array_equal(iq.requantize_tf(tf.constant(acc), tf.constant(m), tf.constant(n)).numpy(), got)
    assert np.array_equal(iq.requantize(np.array([2 ** 40]), m, n), iq.requantize(np.array([2 ** 31 - 1]), m, n))


@pytest.mark.parametrize("shift", [-3, 0, 1, 5, 12])
def test_shift_round_is_division_by_a_power_of_two(shift):
    v = RNG.integers(-2 ** 20, 2 ** 20, 2000)
    exact = v.astype(np.float64) / 2.0 ** shift
    expected = np.sign(exact) * np.floor(np.abs(exact) + 0.5)
    assert np.array_equal(iq.shift_round(v, shift), expected.astype(np.int64))
    assert np.array_equal(iq.shift_round_tf(tf.constant(v), shift).numpy(), expected)
    assert np.array_equal(iq.shift_round_dynamic_tf(tf.constant(v), tf.constant(shift, tf.int64)).numpy(), expected)


@pytest.mark.parametrize("a", [2, 4, 8])
def test_tables_have_at_most_2_to_the_a_levels_and_follow_the_functions(a):
    sig, tanh = iq.sigmoid_table(a), iq.tanh_table(a)
    assert len(np.unique(sig)) <= 2 ** a and sig.min() >= 0 and sig.max() <= 2 ** a - 1
    assert len(np.unique(tanh)) <= 2 ** a - 1 and np.abs(tanh).max() <= 2 ** (a - 1) - 1
    assert np.all(np.diff(sig) >= 0) and np.all(np.diff(tanh) >= 0)
    # every int16 pre-activation: the table value is within the table bin and one code of the function
    z = np.arange(-2 ** 15, 2 ** 15)
    real = z / 2 ** iq.GATE_FRAC
    bin_width = 2.0 ** iq.TABLE_SHIFT / 2 ** iq.GATE_FRAC
    assert np.max(np.abs(sig[iq.table_index(z)] / 2 ** a - 1 / (1 + np.exp(-real)))) <= bin_width / 8 + 2.0 ** -a
    assert np.max(np.abs(tanh[iq.table_index(z)] / 2 ** (a - 1) - np.tanh(real))) <= bin_width / 2 + 2.0 ** -(a - 1)


@pytest.mark.parametrize("c_max", [0.3, 1.0, 1.5, 7.9, 8.0])
@pytest.mark.parametrize("bits", [8, 16])
def test_cell_exponent_is_the_smallest_power_of_two_range_holding_c_max(c_max, bits):
    e = iq.cell_exponent(c_max, bits)
    top = 2.0 ** (e + bits - 1)
    assert c_max <= top < 2 * c_max
    assert int(iq.cell_exponent_tf(tf.constant(c_max, tf.float32), bits).numpy()) == e
    assert float(iq.power_of_two_tf(tf.constant(e, tf.int64)).numpy()) == 2.0 ** e


# ------------------------------------------------------------------------------- the integer model

CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


def _model(stacked: bool, last_state: bool = False, cells=("lstm", "lstm")):
    """[Normalization] -> [cells[0](12)] -> cells[1](9) -> [Flatten] -> Dense(4, softmax)."""
    inp = keras.Input((10, 7))
    x = keras.layers.Normalization(mean=np.full(7, 0.1), variance=np.full(7, 2.0), name="normalize")(inp)
    if stacked:
        x = CELLS[cells[0]](12, return_sequences=True, name="rnn")(x)
    x = CELLS[cells[1]](9, return_sequences=not last_state, name="rnn_top")(x)
    if not last_state:
        x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Dense(4, activation="softmax", name="dense")(x)
    return keras.Model(inp, out)


def _config(bits=4, act=8, state=16, granularity="per_channel"):
    return QuantConfig(weights=QuantSpec(bits, "symmetric", granularity), inputs=QuantSpec(act),
                       state=QuantSpec(state, "symmetric"), integer=True)


def _integer_twin(float_model, cfg, x):
    q = quantize_model(float_model, cfg)
    calibrate(q, batches(x))
    freeze_ranges(q)
    return q


@pytest.mark.parametrize("stacked,last_state,bits,act,state,granularity,cells", [
    (False, False, 4, 8, 16, "per_channel", ("lstm", "lstm")), (True, False, 2, 8, 16, "per_tensor", ("lstm", "lstm")),
    (True, True, 3, 5, 12, "per_channel", ("lstm", "lstm")), (False, False, 8, 4, 8, "per_channel", ("lstm", "lstm")),
    (False, False, 4, 8, 16, "per_channel", ("gru", "gru")), (True, True, 2, 6, 16, "per_tensor", ("gru", "lstm")),
    (True, False, 5, 8, 16, "per_channel", ("lstm", "gru"))])
def test_numpy_reference_gives_the_fake_quant_models_integer_logits(tmp_path, stacked, last_state, bits, act, state,
                                                                    granularity, cells):
    tf.keras.utils.set_random_seed(1)
    model = _model(stacked, last_state, cells)
    x = RNG.normal(0, 1.5, (48, 10, 7)).astype(np.float32)
    q = _integer_twin(model, _config(bits, act, state, granularity), x)
    path = tmp_path / "m.qlstm"
    write_packed_model(q, str(path))
    ref = IntegerModel.load(str(path))
    x8 = integer_inputs(q, x)
    assert x8.dtype == np.int8
    logits = ref.run(x8)
    assert np.array_equal(logits, integer_logits(q, x))
    s = integer_summary(q, ref, logits, x, np.zeros(len(x), int))
    assert s["integer/agreement"] == 1.0 and s["integer/logits_match"] == 1.0
    assert s["integer/macs_per_clip"] == 10 * sum(l.kernel.size + l.recurrent.size for l in ref.recurrent) \
        + ref.dense.kernel.size


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_integer_mode_tracks_the_float_model_better_with_more_bits(cell):
    tf.keras.utils.set_random_seed(2)
    model = _model(False, cells=(cell, cell))
    x = RNG.normal(0, 1.5, (64, 10, 7)).astype(np.float32)
    want = model.predict(x, verbose=0)
    err = [np.mean(np.abs(_integer_twin(model, _config(8, a, 16), x).predict(x, verbose=0) - want)) for a in (3, 5, 8)]
    assert err[0] > err[1] > err[2] and err[2] < 0.01


def test_integer_mode_trains_with_straight_through_gradients():
    tf.keras.utils.set_random_seed(3)
    q = _integer_twin(_model(True), _config(4, 8, 16), RNG.normal(size=(16, 10, 7)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(RNG.normal(size=(4, 10, 7)).astype(np.float32), training=True) * [1.0, 2, 3, 4])
    grads = tape.gradient(loss, q.trainable_weights)
    assert all(g is not None and float(tf.norm(g)) > 0 for g in grads)


def test_a_saved_integer_twin_loads_with_its_integer_mode(tmp_path):
    tf.keras.utils.set_random_seed(4)
    x = RNG.normal(size=(16, 10, 7)).astype(np.float32)
    q = _integer_twin(_model(False), _config(), x)
    q.save(tmp_path / "q.keras")
    back = keras.models.load_model(tmp_path / "q.keras")
    assert back.get_layer("rnn_top").integer == q.get_layer("rnn_top").integer
    assert np.array_equal(integer_logits(back, x), integer_logits(q, x))


# ------------------------------------------------------------------------------- C export

def test_c_kernel_has_no_floating_point_and_no_malloc():
    for text in (KERNEL_C, KERNEL_H):
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        assert "int32_t" in code and not re.search(r"\b(float|double|malloc|calloc|free)\b", code)


@pytest.mark.parametrize("stacked,last_state,bits,cells", [
    (False, False, 4, ("lstm", "lstm")), (True, False, 2, ("lstm", "lstm")), (True, True, 3, ("lstm", "lstm")),
    (False, False, 8, ("lstm", "lstm")), (True, False, 4, ("gru", "lstm")), (True, True, 6, ("lstm", "gru"))])
def test_compiled_c_gives_the_numpy_references_logits(tmp_path, stacked, last_state, bits, cells):
    if find_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on this machine: .ci/run installs one")
    tf.keras.utils.set_random_seed(5)
    x = RNG.normal(0, 1.5, (40, 10, 7)).astype(np.float32)
    q = _integer_twin(_model(stacked, last_state, cells), _config(bits, 8, 16), x)
    write_packed_model(q, str(tmp_path / "m.qlstm"))
    ref = IntegerModel.load(str(tmp_path / "m.qlstm"))
    report = export_c(ref, integer_inputs(q, x), tmp_path / "c", timing_repeat=2)
    assert report["agreement"] == 1.0 and report["class_agreement"] == 1.0 and report["us_per_clip"] > 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["agreement"] == 1.0
    assert report["weight_bytes_parts"]["codes"] == sum(-(-l.kernel.size * bits // 8) - (-l.recurrent.size * bits // 8)
                                                        for l in ref.recurrent) + -(-ref.dense.kernel.size * bits // 8)


# ------------------------------------------------------------------------------- rules

def test_models_integer_inference_cannot_run_are_one_line_errors():
    inp = keras.Input((10, 7))
    gru = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GRU(4, reset_after=False)(inp)))
    with pytest.raises(ConfigError, match=r"layer 'gru.*' \(GRU\) cannot run in integer mode \(reset_after=False"):
        integer_modes(gru, _config())
    conv = keras.Model(inp, keras.layers.Dense(3)(keras.layers.LSTM(4)(keras.layers.Conv1D(4, 3, name="c")(inp))))
    with pytest.raises(ConfigError, match=r"layer 'c' \(Conv1D\) cannot run in integer mode"):
        integer_modes(conv, _config())
    back = keras.Model(inp, keras.layers.Dense(3)(keras.layers.LSTM(4, go_backwards=True, name="b")(inp)))
    with pytest.raises(ConfigError, match="reads the clip backwards"):
        integer_modes(back, _config())
    assert integer_modes(_model(True, cells=("gru", "lstm")), _config()).keys() == {"rnn", "rnn_top", "dense"}


@pytest.mark.parametrize("quant,bits,message", [
    ({"method": "qat"}, BitWidths(4, None, None), "quant.integer=true needs act_bits"),
    ({"method": "qat_lsq"}, BitWidths(4, 8, None), "not allowed with learned step sizes"),
    ({"method": "ptq"}, BitWidths(4, 12, None), "act_bits=12 is not allowed: expected an integer 2..8"),
    ({"method": "ptq"}, BitWidths(4, 8, 4), "state_bits=4 is not allowed: expected an integer 8..16")])
def test_integer_options_are_checked_before_any_data(quant, bits, message):
    import yaml
    preset = "ptq" if quant["method"] == "ptq" else quant["method"]
    values = yaml.safe_load((REPO / "conf" / "quant" / f"{preset}.yaml").read_text())
    if "defaults" in values:
        values = {**yaml.safe_load((REPO / "conf" / "quant" / "qat.yaml").read_text()),
                  **{k: v for k, v in values.items() if k != "defaults"}}
    with pytest.raises(ConfigError, match=message):
        RecipeSpec.from_config({**values, "integer": True}, bits)


def test_a_packed_file_without_integer_layout_is_refused(tmp_path):
    inp = keras.Input((10, 7))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.LSTM(4)(inp)))
    q = quantize_model(model, QuantConfig(weights=QuantSpec(4)))
    write_packed_model(q, str(tmp_path / "m.qlstm"))
    with pytest.raises(DataError, match="not the packed file of an integer-mode model"):
        IntegerModel.load(str(tmp_path / "m.qlstm"))


@pytest.mark.slow
def test_integer_qat_run_then_c_export(speech_commands_root, tmp_path):
    """train.py quant=qat quant.integer=true: the numpy reference and the compiled C agree with the
    fake-quant model on every test clip; evaluate.py export=c writes the sources and report."""
    proc = run("train.py", *small(tmp_path, "int"), "quant=qat", "bits=4", "act_bits=8",
               "quant.integer=true", "quant.act_epochs=1", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "int" / "summary.json").read_text())
    assert s["integer/agreement"] == 1.0 and s["integer/logits_match"] == 1.0 and s["integer/state_bits"] == 16
    assert s["integer/test_acc"] == s["quant/test_acc"]
    if find_compiler() is not None:
        assert s["integer/c_agreement"] == 1.0
    ev = run("evaluate.py", f"run_dir={tmp_path / 'int'}", "export=c", "logger=none",
             f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "int" / "c" / "report.json").read_text())
    assert report["tflite_int8_us_per_clip"] > 0 and (tmp_path / "int" / "c" / "test_clips.i8").exists()
    bad = run("evaluate.py", f"run_dir={tmp_path / 'int'}", "export=h", f"hydra.run.dir={tmp_path / 'eval2'}")
    assert bad.returncode == 2 and "export='h' is not allowed: expected one of c" in bad.stderr


def test_aggregate_table_shows_the_integer_cost_figures():
    from qat.aggregate import label_recipes, markdown, table
    runs = [{"data": "fsdd", "task": None, "preset": "qat", "method": "qat", "bits": 4, "act_bits": 8,
             "state_bits": 16, "seed": s, "float/test_acc": 0.9, "quant/test_acc": 0.9, "quant/degradation": 0.0,
             "quant/size_bytes": 100, "integer/agreement": 1.0, "integer/c_agreement": 1.0,
             "integer/weight_bytes": 2048, "integer/ram_bytes": 300 + s, "integer/macs_per_clip": 2e6,
             "integer/c_us_per_clip": 10.0 * (s + 1)} for s in range(2)]
    label_recipes(runs)
    text = markdown(table(runs), [])
    header, _, row = text.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["integer agreement %"] == "100.00 ± 0.00" and cells["flash (KiB)"] == "2.00 ± 0.00"
    assert cells["RAM (B)"] == "300.50 ± 0.71" and cells["C us / clip"] == "15.00 ± 7.07"


@pytest.mark.slow
def test_export_c_of_a_run_that_is_not_integer_is_one_line(speech_commands_root, tmp_path):
    proc = run("train.py", *small(tmp_path, "plain"), "quant=none", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = run("evaluate.py", f"run_dir={tmp_path / 'plain'}", "export=c", f"hydra.run.dir={tmp_path / 'eval'}")
    assert ev.returncode == 2 and ev.stderr.strip().splitlines()[-1].startswith("error: export=c is not allowed")
    assert "not an integer-mode run" in ev.stderr and not (tmp_path / "plain" / "c").exists()


def test_weights_only_config_of_an_integer_config_is_a_plain_fake_quant_one():
    cfg = _config().weights_only()
    assert not cfg.integer and cfg.inputs is None and cfg.weights == _config().weights
    assert integer_modes(_model(False), cfg) == {}


@pytest.mark.slow
def test_integer_ptq_run_with_gptq_bias_correction_and_refinement(speech_commands_root, tmp_path):
    """quant=ptq quant.integer=true: search, GPTQ, bias correction and rounding refinement run on the
    integer model, whose numpy reference and C agree with it on every test clip."""
    proc = run("train.py", *small(tmp_path, "ptq"), "quant=ptq", "bits=3", "act_bits=8", "state_bits=12",
               "quant.integer=true", "quant.refine_epochs=1", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ptq" / "summary.json").read_text())
    assert s["integer/agreement"] == 1.0 and s["integer/logits_match"] == 1.0 and s["integer/state_bits"] == 12
    assert s["quant/levels_ok"] and "ptq/refine/kept" in s and isinstance(s["predict/degradation"], float)
    if find_compiler() is not None:
        assert s["integer/c_agreement"] == 1.0
