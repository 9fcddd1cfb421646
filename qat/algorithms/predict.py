"""Predict the test-accuracy drop of a quantized model from the float model and a few labelled
calibration clips (validation or training, never test).

Two predictions share one margin-noise analysis:

- `predict_drop` / `predict_summary` / the drop table: weights rounded to nearest, from the float
  model alone (nothing quantized is run), per tensor or per channel, any scheme, estimator and mix
  of bit-widths; milliseconds per config once the gradient pass has run.
- `predict_run_model`: the model a PTQ run actually evaluates (search, GPTQ, refinement, bias
  correction, activation, gate and state grids), fitted on one pass of that model over the
  calibration clips (below).

The noise model. For calibration clip i with label y, the float model's logits z give margins
m_ik = z_y - z_k to its k strongest rival classes. Rounding a weight tensor w to a grid adds an
error e = Q(w) - w, which moves each margin by g_ik . e to first order, where g_ik = d m_ik / d w
is the clip's own gradient (exact per-clip gradients: one forward and k backward passes through an
unrolled copy of the model, with zero probes on every pre-activation). The rounding errors are
treated as independent zero-mean noise with the *actual* mean squared error of the config's grid
per output unit. The margin change is then ~ N(0, s_ik^2) with

    s_ik^2 = sum over tensors t and output units c of  mean_rows(e_t[:, c]^2) * sum_rows(g_ik,t[:, c]^2),

the clip stays (or becomes) correct with probability P_i = prod_k Phi(m_ik / s_ik), and the
predicted drop is 100 * (mean_i correct_i - mean_i P_i) points. The gradient pass runs once per
model (`sensitivity`, 2-5 s for 512 clips on 2 CPU cores); a config after that costs milliseconds,
and the variances of tensors add, so `propose_mixed` can search bits per tensor exhaustively.

The run's own model (`MarginFit`). Round-to-nearest noise is not what a PTQ run ships: GPTQ and
refinement move the margins less, activation and state grids more, and at 2 bits saturating gates
shrink every margin. One pass of the quantized model over the calibration clips gives its margins
m^q; a least-squares fit of the z-scores, m^q / s = shrink * m / s + N(0, noise_scale), says how
much it shrinks and how much more (or less) it spreads the margins than the noise model. The
clip-by-clip shape of the spread stays the gradients' (where the gradient pass cannot follow the
model, every margin gets the same spread: `predict/noise_shape` "uniform"). The prediction is the
accuracy the float model, by its own softmax confidence, expects to lose to the decisions that
spread flips: 100 * mean_i P(flip_i) * (p_a - p_b)_i for its class a and runner-up b
(`expected_drop`). Counting labelled flips instead (mean correct -
mean P(correct)) over-predicts: a model selected on its validation clips has few wrong clips near
the boundary there to win back, while a test set has as many as it has right ones to lose.

Choices:
- Validation clips by default: training margins are over-confident (the model was fitted to them)
  and under-predict the drop.
- Noise rather than the actual rounding pattern: the model sits at an optimum of the clips it was
  trained and early-stopped on, so any coherent shift of its weights hurts those clips, while on
  unseen speakers it helps as often as it hurts; the first-order effect of the actual errors on
  calibration clips over-predicts the drop on a speaker-disjoint test set.
- Known blind spot: the per-tensor rounding of an LSTM bias at 3-4 bits is a coherent shift of
  every gate, which the noise model does not see; `propose_mixed` therefore keeps biases at 8 bits
  by default (they are under 1 % of the weights).
- 2 bits is outside the first-order regime of the round-to-nearest prediction (off by several
  points); the fitted prediction measures the 2-bit model's shrink instead of assuming none.

The round-to-nearest noise model covers weights only: a config with activation / state
quantization is refused by `tensor_specs`, and `predict_summary` predicts its weight part and says
so; `predict_run_model` covers the rest by its fit, and qat.algorithms.proposal measures each
activation part's noise for the mixed proposal.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, ndtr

from qat.algorithms.calibration import batches, calibrate, calibration_indices
from qat.checks import Bits, Checked, Integer, ListOf, Nullable, Number, OneOf, rejected, setting
from qat.errors import ConfigError, DataError
from qat.io import atomic_path
from qat.layers.conv import conv_patches, convolve
from qat.layers.model import RECURRENT, QuantConfig, freeze_ranges, quantize_model, weight_tensor_names
from qat.memo import derived
from qat.metrics import predict, predict_classes
from qat.quant.reference import fake_quant_np
from qat.quant.spec import ESTIMATOR, GRANULARITY, PERCENTILE, SCHEME, QuantSpec

PREDICT_BITS = tuple(range(2, 9))   # the bit-widths the drop table and the mixed proposal cover by default
PREDICT_MARGINS_FILE = "predict_margins.npz"   # per-clip margins a run's prediction was fitted on
MAX_DROP = Number(0, expected="a number of points >= 0")


# ----------------------------------------------------------------------------- per-clip sensitivities

@dataclass
class Sensitivity:
    """What a float model's predictions depend on, measured once on calibration clips.

    margins[k, i]: z_y - z_k for clip i and its k-th strongest competitor k (by float logit).
    sq_grads[name][k, i, c]: sum over the rows of the squared per-clip gradient of that margin with
    respect to weight tensor `name`, for output unit c (for 1-D biases: each element).
    """

    margins: np.ndarray
    correct: np.ndarray
    sq_grads: Dict[str, np.ndarray]
    weights: Dict[str, np.ndarray]
    rivals: Optional[np.ndarray] = None      # [k, i]: class index of clip i's k-th strongest competitor
    labels: Optional[np.ndarray] = None      # [i]
    seconds: float = 0.0
    _noise_cache: Dict[Tuple[str, QuantSpec], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_clips(self) -> int:
        return self.margins.shape[1]

    @property
    def names(self) -> List[str]:
        return list(self.weights)

    def column_noise(self, name: str, spec: Optional[QuantSpec]) -> np.ndarray:
        """Mean squared round-to-nearest error per output unit of tensor `name` under `spec` (for a
        1-D bias: per element; zeros where left float), from the same numpy quantizer the models use."""
        w = self.weights[name]
        if spec is None:
            return np.zeros(w.shape[-1])
        key = (name, spec)
        if key not in self._noise_cache:
            err2 = (fake_quant_np(w, spec).astype(np.float64) - w) ** 2
            self._noise_cache[key] = err2.reshape(-1, w.shape[-1]).mean(0) if w.ndim > 1 else err2
        return self._noise_cache[key]

    def tensor_variance(self, name: str, spec: Optional[QuantSpec]) -> np.ndarray:
        """Variance of every margin [k, i] caused by quantizing one tensor."""
        return self.sq_grads[name] @ self.column_noise(name, spec)

    def accuracy_under_noise(self, variance: np.ndarray) -> np.ndarray:
        """Probability per clip of being classified correctly, for margin variances [k, i]."""
        return probability_correct(self.margins, variance)

    def drop(self, variance: np.ndarray) -> float:
        """Predicted drop in percentage points for total margin variances [k, i]."""
        return 100.0 * float(self.correct.mean() - self.accuracy_under_noise(variance).mean())


def probability_correct(margins: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """prod_k Phi(m_k / s_k) per clip; s = 0 gives the hard decision (0.5 at a tie)."""
    s = np.sqrt(np.maximum(variance, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s > 0, margins / np.where(s > 0, s, 1.0), np.sign(margins) * np.inf)
    p = np.where(np.isnan(z), 0.5, ndtr(z))
    return p.prod(axis=0)


CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D)
# layers without quantized weights that the unrolled forward pass runs as Keras runs them
PASS_THROUGH = (keras.layers.Flatten, keras.layers.Dropout, keras.layers.Normalization, keras.layers.Reshape,
                keras.layers.ReLU, keras.layers.Activation, keras.layers.BatchNormalization)


class UnsupportedModel(ConfigError):
    """The predictor cannot follow this model (a layer type it has no adjoint for)."""


def _check_layers(model) -> list:
    """The model's layers (InputLayer dropped), or an UnsupportedModel error naming one predict cannot
    follow."""
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    for idx, layer in enumerate(layers):
        if type(layer) in RECURRENT:
            if layer.go_backwards or layer.stateful or layer.time_major or not layer.cell.use_bias:
                raise UnsupportedModel(f"predict supports plain {type(layer).__name__} layers with a bias; "
                                       f"'{layer.name}' is not one")
        elif type(layer) is keras.layers.Dense:
            last = idx == len(layers) - 1
            if last and layer.activation not in (keras.activations.softmax, keras.activations.linear):
                raise ConfigError(f"predict needs a softmax or linear output layer; '{layer.name}' uses "
                                  f"{layer.activation.__name__}")
        elif type(layer) in CONVOLUTIONS:
            if layer.data_format != "channels_last" or layer.groups != 1:
                raise UnsupportedModel(f"predict supports channels-last convolutions without groups; "
                                       f"'{layer.name}' is not one")
        elif not isinstance(layer, PASS_THROUGH):
            raise UnsupportedModel(f"predict does not support layer '{layer.name}' ({type(layer).__name__}): "
                                   "expected Normalization, Conv1D, Conv2D, BatchNormalization, activations, Reshape, "
                                   "LSTM, GRU, Flatten, Dropout and Dense layers")
    if not layers or type(layers[-1]) is not keras.layers.Dense:
        raise UnsupportedModel("predict needs a Dense output layer (the classifier) last")
    return layers


def _forward(model, x, probes: Optional[dict] = None, record: Optional[dict] = None):
    """The model's logits (pre-softmax), computed by an unrolled copy of its layers so that a zero
    `probe` can be added to every LSTM / Dense pre-activation (its gradient is then the per-clip,
    per-step adjoint; a GRU has two: its input and its recurrent products). `record` collects each
    layer's input (and h_{t-1} for an LSTM; for a GRU h_{t-1} and what its candidate's recurrent
    product multiplies, r * h_{t-1} without reset_after)."""
    layers = _check_layers(model)
    h = tf.convert_to_tensor(x, tf.float32)
    for idx, layer in enumerate(layers):
        if isinstance(layer, keras.layers.LSTM):
            cell = layer.cell
            xz = tf.einsum("ntf,fg->ntg", h, cell.kernel) + cell.bias
            if probes is not None:
                xz = xz + probes[layer.name]
            state_h = tf.zeros((tf.shape(h)[0], cell.units))
            state_c = tf.zeros_like(state_h)
            outs, prev = [], []
            for t in range(h.shape[1]):
                prev.append(state_h)
                zi, zf, zc, zo = tf.split(xz[:, t] + tf.matmul(state_h, cell.recurrent_kernel), 4, axis=1)
                act, rec = cell.activation, cell.recurrent_activation
                state_c = rec(zf) * state_c + rec(zi) * act(zc)
                state_h = rec(zo) * act(state_c)
                outs.append(state_h)
            if record is not None:
                record[layer.name] = (h, tf.stack(prev, axis=1))
            h = tf.stack(outs, axis=1) if layer.return_sequences else outs[-1]
        elif isinstance(layer, keras.layers.GRU):
            h = _gru_forward(layer, h, None if probes is None else probes[layer.name], record)
        elif type(layer) is keras.layers.Dense:
            if h.shape.rank != 2:
                raise ConfigError(f"predict supports Dense layers on flat inputs; '{layer.name}' gets rank {h.shape.rank}")
            if record is not None:
                record[layer.name] = (h, None)
            z = tf.matmul(h, layer.kernel) + (layer.bias if layer.use_bias else 0.0)
            if probes is not None:
                z = z + probes[layer.name]
            h = z if idx == len(layers) - 1 else layer.activation(z)
        elif type(layer) in CONVOLUTIONS:
            if record is not None:
                record[layer.name] = (conv_patches(layer, h), "conv")
            z = convolve(layer, h, layer.kernel) + (layer.bias if layer.use_bias else 0.0)
            if probes is not None:
                z = z + probes[layer.name]
            h = layer.activation(z)
        elif isinstance(layer, keras.layers.Flatten):
            h = tf.reshape(h, (tf.shape(h)[0], -1))
        elif not isinstance(layer, keras.layers.Dropout):   # Dropout: identity at inference
            h = layer(h, training=False)
    return h


def _gru_forward(layer, x, probe, record):
    """A Keras GRU unrolled (both reset_after modes), with `probe` = (input, recurrent) zeros added
    to its input products x W + b and its recurrent products h R (+ b')."""
    cell, u = layer.cell, layer.cell.units
    act, rec = cell.activation, cell.recurrent_activation
    in_b, rec_b = (cell.bias[0], cell.bias[1]) if cell.reset_after else (cell.bias, 0.0)
    xz = tf.einsum("ntf,fg->ntg", x, cell.kernel) + in_b
    if probe is not None:
        xz = xz + probe[0]
    r_zr, r_h = cell.recurrent_kernel[:, :2 * u], cell.recurrent_kernel[:, 2 * u:]
    state = tf.zeros((tf.shape(x)[0], u))
    outs, prev, cand = [], [], []
    for t in range(x.shape[1]):
        prev.append(state)
        p = 0.0 if probe is None else probe[1][:, t]
        if cell.reset_after:
            hz = tf.matmul(state, cell.recurrent_kernel) + rec_b + p
            zr = rec(xz[:, t, :2 * u] + hz[:, :2 * u])
            z, r = zr[:, :u], zr[:, u:]
            n = act(xz[:, t, 2 * u:] + r * hz[:, 2 * u:])
            cand.append(state)
        else:
            p_zr, p_h = (0.0, 0.0) if probe is None else (p[:, :2 * u], p[:, 2 * u:])
            zr = rec(xz[:, t, :2 * u] + tf.matmul(state, r_zr) + p_zr)
            z, r = zr[:, :u], zr[:, u:]
            n = act(xz[:, t, 2 * u:] + tf.matmul(r * state, r_h) + p_h)
            cand.append(r * state)
        state = z * state + (1 - z) * n
        outs.append(state)
    if record is not None:
        record[layer.name] = (x, (tf.stack(prev, axis=1), tf.stack(cand, axis=1)))
    return tf.stack(outs, axis=1) if layer.return_sequences else outs[-1]


def _sq_column_grads(x, delta):
    """sum over rows of the squared per-clip gradient of W in z_t = x_t W (+ ...): for every clip n
    and column c, sum_f (sum_t x[n,t,f] delta[n,t,c])^2 = delta^T (x x^T) delta, through the per-clip
    Gram matrix over time (no [n, f, c] intermediate)."""
    gram = tf.matmul(x, x, transpose_b=True)                      # [n, t, t]
    return tf.reduce_sum(delta * tf.matmul(gram, delta), axis=1)  # [n, c]


def _gru_sq_grads(layer, inp, prev, d) -> dict:
    """Per-clip squared margin gradients of a GRU's weights, summed over rows, from the adjoints
    d = (input products, recurrent products): the recurrent kernel's candidate columns multiply
    r * h_{t-1} without reset_after; a (2, 3U) bias sums its input and recurrent rows."""
    (dx, dh), (h_prev, cand), u = d, prev, layer.cell.units
    return {"kernel": lambda: _sq_column_grads(inp, dx),
            "recurrent_kernel": lambda: tf.concat([_sq_column_grads(h_prev, dh[..., :2 * u]),
                                                   _sq_column_grads(cand, dh[..., 2 * u:])], axis=-1),
            "bias": lambda: tf.square(tf.reduce_sum(dx, axis=1))
            + (tf.square(tf.reduce_sum(dh, axis=1)) if layer.cell.reset_after else 0.0)}


def _make_pass(model, names: Sequence[str]):
    """A compiled function (x, y, k) -> (logits, rivals [n, k], {name: [k, n, columns]}): for the k
    strongest rival classes of every clip, the squared gradient of the margin z_y - z_rival summed
    over each weight's rows."""
    layers = sorted({n.split("/")[0] for n in names})
    n_classes = int(model.output_shape[-1])

    @tf.function(reduce_retracing=True)
    def run(x, y, k: int):
        record, probes = {}, {}
        n = tf.shape(x)[0]
        with tf.GradientTape(persistent=True) as tape:
            for name in layers:
                layer = model.get_layer(name)
                if isinstance(layer, keras.layers.LSTM):
                    probes[name] = tf.zeros((n, layer.input_shape[1], 4 * layer.cell.units))
                elif isinstance(layer, keras.layers.GRU):
                    probes[name] = tuple(tf.zeros((n, layer.input_shape[1], 3 * layer.cell.units)) for _ in "xh")
                elif type(layer) in CONVOLUTIONS:
                    probes[name] = tf.zeros((n, *layer.output_shape[1:]))
                else:
                    probes[name] = tf.zeros((n, layer.units))
                tape.watch(probes[name])
            logits = _forward(model, x, probes, record)
        true = tf.one_hot(y, n_classes)
        rivals = tf.math.top_k(logits - 1e30 * true, k=k).indices                 # [n, k], strongest first
        seeds = [true - tf.one_hot(rivals[:, r], n_classes) for r in range(k)]
        out = {nm: [] for nm in names}
        for r in range(k):
            deltas = tape.gradient(logits, probes, output_gradients=seeds[r])
            for name in layers:
                d = deltas[name]
                inp, prev = record[name]
                if isinstance(prev, str):     # convolution: dm/dK = patches^T d over output positions
                    d = tf.reshape(d, (n, -1, d.shape[-1]))
                    per = {"kernel": lambda: _sq_column_grads(inp, d),
                           "bias": lambda: tf.square(tf.reduce_sum(d, axis=1))}
                elif isinstance(prev, tuple):   # GRU: dm/dW from the input products, dm/dR from the recurrent
                    per = _gru_sq_grads(model.get_layer(name), inp, prev, d)
                elif prev is not None:   # LSTM: dm/dW = sum_t x_t^T d_t, dm/dR = sum_t h_{t-1}^T d_t, dm/db = sum_t d_t
                    per = {"kernel": lambda: _sq_column_grads(inp, d),
                           "recurrent_kernel": lambda: _sq_column_grads(prev, d),
                           "bias": lambda: tf.square(tf.reduce_sum(d, axis=1))}
                else:                  # Dense: dm/dK = x^T d, dm/db = d
                    per = {"kernel": lambda: tf.reduce_sum(tf.square(inp), axis=1, keepdims=True) * tf.square(d),
                           "bias": lambda: tf.square(d)}
                for w, fn in per.items():
                    if f"{name}/{w}" in out:
                        out[f"{name}/{w}"].append(fn())
        return logits, rivals, {nm: tf.stack(v) for nm, v in out.items()}

    return run


def sensitivity(float_model, x: np.ndarray, y: np.ndarray, competitors: int = 2,
                batch_size: int = 128) -> Sensitivity:
    """Per-clip margins and squared margin gradients (summed per output unit) of `float_model` on
    labelled calibration clips (x, y): one forward and `competitors` backward passes."""
    start = time.perf_counter()
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"predict needs labelled calibration clips: got {len(x)} clips and {len(y)} labels")
    Integer(1)("competitors", competitors)
    _check_layers(float_model)
    names = weight_tensor_names(float_model)
    weights = {}
    for n in names:
        layer = float_model.get_layer(n.split("/")[0])
        weights[n] = getattr(getattr(layer, "cell", layer), n.split("/")[1]).numpy().astype(np.float64)
    n_classes = int(float_model.output_shape[-1])
    if y.min() < 0 or y.max() >= n_classes:
        raise DataError(f"calibration labels must lie in 0..{n_classes - 1}")
    k = min(competitors, n_classes - 1)
    run = _make_pass(float_model, names)
    batch = min(batch_size, len(x))
    margins, correct, rival_idx, sq = [], [], [], {n: [] for n in names}
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        rows, m = np.arange(len(xb)), len(xb)
        if m < batch:   # pad the last batch: one traced graph for every batch
            xb = np.concatenate([xb, np.zeros((batch - m,) + xb.shape[1:], np.float32)])
        yb_padded = np.concatenate([yb, np.zeros(batch - m, np.int64)])
        logits, rivals, grads = run(xb, yb_padded, k)
        order = rivals.numpy()[:m]
        logits = logits.numpy()[:m].astype(np.float64)
        margins.append(np.stack([logits[rows, yb] - logits[rows, order[:, r]] for r in range(k)]))
        correct.append(np.argmax(logits, axis=1) == yb)
        rival_idx.append(order[:, :k].T)
        for n in names:
            sq[n].append(grads[n].numpy()[:, :m].astype(np.float64))
    return Sensitivity(margins=np.concatenate(margins, axis=1), correct=np.concatenate(correct),
                       sq_grads={n: np.concatenate(v, axis=1) for n, v in sq.items()}, weights=weights,
                       rivals=np.concatenate(rival_idx, axis=1), labels=y, seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- configs

def tensor_specs(names: Sequence[str], cfg: QuantConfig) -> Dict[str, Optional[QuantSpec]]:
    """The QuantSpec each weight tensor gets under `cfg` (None = float), as `quantize_model` does."""
    if not isinstance(cfg, QuantConfig):
        raise rejected("cfg", cfg, "a qat.layers.model.QuantConfig")
    if cfg.quantizes_activations:
        raise ConfigError("predict models weight quantization only: expected act_bits=null and state_bits=null")
    unknown = sorted(set(cfg.overrides) - set(names))
    if unknown:
        raise ConfigError(f"override name(s) {unknown} are not allowed: expected names among {list(names)}")
    return {n: cfg.overrides.get(n, cfg.bias if n.endswith("/bias") else cfg.weights) for n in names}


def config_variance(sens: Sensitivity, cfg: QuantConfig) -> np.ndarray:
    """Total margin variance [k, i] of a config: the tensors' variances add."""
    total = np.zeros_like(sens.margins)
    for name, spec in tensor_specs(sens.names, cfg).items():
        if spec is not None:
            total = total + sens.tensor_variance(name, spec)
    return total


def predict_drop(float_model, x_calib: np.ndarray, y_calib: np.ndarray, cfg: QuantConfig,
                 sens: Optional[Sensitivity] = None) -> float:
    """Predicted test-accuracy drop (percentage points) of `float_model` with its weights quantized
    round-to-nearest as `cfg` says, from labelled calibration clips (validation or training, never
    test). Pass `sens` (from `sensitivity`) to reuse the gradient pass across configs."""
    sens = sens if sens is not None else sensitivity(float_model, x_calib, y_calib)
    return sens.drop(config_variance(sens, cfg))


VALIDATED_BITS = (3, 16)    # weight bits where the prediction's error was measured to be small (BENCHMARKS.md)


@dataclass(frozen=True)
class ValidatedRange:
    """Where the prediction of a run's own model was measured against test drops (BENCHMARKS.md,
    "Predicted degradation"), for one family of recipes: weight bits, and activation (layer inputs,
    gates) and state grids of at least these bits (None: measured float only). `recipes` names the
    family; a family measured nowhere has `bits` None (every run outside)."""

    recipes: str
    bits: Optional[Tuple[int, int]]
    act_bits: Optional[int] = None
    state_bits: Optional[int] = None

    def contains(self, cfg: QuantConfig) -> bool:
        weight_bits = [cfg.weights.bits, *(s.bits for s in cfg.overrides.values())]
        grid_ok = lambda specs, low: all(s is None or (low is not None and s.bits >= low) for s in specs)
        return self.bits is not None and all(self.bits[0] <= b <= self.bits[1] for b in weight_bits) \
            and grid_ok((cfg.inputs, cfg.gates), self.act_bits) and grid_ok((cfg.state, cfg.hidden), self.state_bits)

    def describe(self) -> str:
        if self.bits is None:
            return f"not measured for {self.recipes}"
        low, high = self.bits
        grid = lambda what, b: f"{what} float" + (f" or >= {b} bits" if b is not None else "")
        return f"{self.recipes}: {low}..{high} weight bits, {grid('activations', self.act_bits)}, " \
               f"{grid('state', self.state_bits)}"


PTQ_VALIDATED = ValidatedRange("ptq", (3, 8), act_bits=8, state_bits=4)
PTQ_SEED_VALIDATED = ValidatedRange("ptq_seed", (3, 8))       # weights only
QAT_VALIDATED = ValidatedRange("qat", (3, 8))                 # weights only
PTQ_TFLITE_VALIDATED = ValidatedRange("ptq_tflite", (3, 8))   # its grids are TFLite's: no act / state options
# The softmax temperature of the flip values in a run's prediction: the model's own confidence. A
# temperature fitted on the calibration labels (`margin_temperature`) predicted worse on the
# selection subset (seed 0 of the benchmark grid, BENCHMARKS.md).
RUN_MODEL_TEMPERATURE = 1.0


def predicted_model(cfg: QuantConfig) -> str:
    """What `predict_drop` predicts for `cfg`, in words."""
    w = cfg.weights
    return (f"{w.bits}-bit {w.granularity} {w.scheme} weights rounded to nearest ({w.estimator} ranges)"
            + (", activations and state float" if cfg.quantizes_activations else ""))


def predict_summary(float_model, feats, cfg: QuantConfig, spec: "PredictSpec", seed: int,
                    runs_predicted_model: bool, of: str = "") -> Dict[str, object]:
    """The `predict/*` summary keys of a run: `predict/degradation` (points) for the weights of
    `cfg` rounded to nearest, predicted from `spec.n_calib` labelled clips of `spec.calib`, and what
    it means: `predict/of` (the predicted model in words, `of` first: e.g. "the starting point of
    a search"), `predict/matches_run` (the run's model is that model: `runs_predicted_model`, and no
    activation / state quantization, which is not modelled) and `predict/in_validated_range`
    (weights bits in VALIDATED_BITS). `predict/weights_only` is true when `cfg` quantizes
    activations or state (the prediction covers its weights only). Costs one gradient pass
    (seconds). A model the predictor cannot follow gets no prediction (`predict/degradation` null)
    and the reason in `predict/unsupported`."""
    t0 = time.perf_counter()
    meaning = {"predict/of": f"{of}: {predicted_model(cfg)}" if of else predicted_model(cfg),
               "predict/matches_run": bool(runs_predicted_model and not cfg.quantizes_activations and not cfg.integer),
               "predict/in_validated_range": VALIDATED_BITS[0] <= cfg.weights.bits <= VALIDATED_BITS[1],
               "predict/validated_bits": list(VALIDATED_BITS)}
    x, y = calibration_set(feats.x[spec.calib], feats.y[spec.calib], spec.n_calib, seed)
    try:
        sens = derived(float_model, "sensitivity", lambda: sensitivity(float_model, x, y, spec.competitors), x, y,
                       spec.competitors)
        drop = predict_drop(float_model, x, y, cfg.weights_only(), sens)
    except UnsupportedModel as e:
        return {"predict/degradation": None, "predict/unsupported": str(e), "time/predict_s": time.perf_counter() - t0}
    return {"predict/degradation": drop, "predict/calibration_clips": len(x), "predict/calibration_split": spec.calib,
            "predict/weights_only": cfg.quantizes_activations, **meaning, "time/predict_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------- the run's own model

@dataclass(frozen=True)
class MarginFit:
    """How a quantized model moved the calibration margins, as the noise model sees it:
    m_q = shrink * m + noise, noise ~ N(0, noise_scale * s^2), with s^2 the round-to-nearest
    noise model's variance of each margin (all ones where the predictor cannot follow the model).

    `shrink` < 1 is a systematic loss of confidence (saturating gates at 2 bits, coarse activation
    grids); `noise_scale` says how much more (> 1: activation / state grids, coarser ranges) or less
    (< 1: GPTQ, refinement) the actual model moves the margins than independent round-to-nearest
    errors of the config would."""

    shrink: float
    noise_scale: float
    clips: int


def output_margins(outputs: np.ndarray, labels: np.ndarray, rivals: np.ndarray, softmax: bool) -> np.ndarray:
    """Margins [k, i] from a model's outputs: z_y - z_k, from log-probabilities for a softmax output
    (the normaliser cancels; probabilities are clipped at 1e-45, so margins saturate near 100, far
    from any decision)."""
    out = np.asarray(outputs, np.float64)
    if softmax:
        out = np.log(np.maximum(out, 1e-45))
    rows = np.arange(len(labels))
    return np.stack([out[rows, labels] - out[rows, r] for r in rivals])


def softmax_output(model) -> bool:
    """Whether the model's last layer ends in a softmax (its outputs are probabilities)."""
    return getattr(model.layers[-1], "activation", None) is keras.activations.softmax


def model_margins(model, x: np.ndarray, y: np.ndarray, rivals: np.ndarray) -> np.ndarray:
    """Margins [k, i] of a Keras model (float or quantized) on (x, y) to the given rivals, from its
    own outputs."""
    return output_margins(np.asarray(predict(model, x), np.float64), y, rivals, softmax_output(model))


def strongest_rivals(outputs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[k, i]: clip i's k strongest wrong classes by the model's outputs, strongest first."""
    scores = np.array(outputs, np.float64)
    scores[np.arange(len(labels)), labels] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].T


def floored_variance(variance: np.ndarray) -> np.ndarray:
    """Margin variances plus a floor of 1e-6 of their mean, so every spread s is > 0."""
    s2 = np.asarray(variance, np.float64)
    return s2 + 1e-6 * max(float(s2.mean()), 1e-12)


def fit_margins(float_margins: np.ndarray, quant_margins: np.ndarray, variance: np.ndarray) -> MarginFit:
    """Least squares of the z-scores: (m_q / s) on (m / s) without intercept gives `shrink`, the mean
    squared residual `noise_scale` (every clip and rival counts; a floor of 1e-6 of the mean keeps
    s > 0)."""
    s2 = floored_variance(variance)
    zf, zq = float_margins / np.sqrt(s2), quant_margins / np.sqrt(s2)
    shrink = float(np.sum(zf * zq) / max(np.sum(zf * zf), 1e-30))
    return MarginFit(shrink=shrink, noise_scale=float(np.mean((zq - shrink * zf) ** 2)),
                     clips=int(float_margins.shape[1]))


def fitted_drop(correct: np.ndarray, float_margins: np.ndarray, variance: np.ndarray, fit: MarginFit) -> float:
    """Predicted drop (points) under a fitted margin model: 100 * (mean correct - mean_i prod_k
    Phi(shrink * m_ik / sqrt(noise_scale * s_ik^2)))."""
    s2 = floored_variance(variance)
    p = probability_correct(fit.shrink * float_margins, fit.noise_scale * s2)
    return 100.0 * float(np.mean(correct) - p.mean())


def margin_temperature(float_margins: np.ndarray) -> float:
    """The softmax temperature T that best explains the calibration labels (maximum likelihood of
    the label among itself and its k rivals, p_y = 1 / (1 + sum_k exp(-m_k / T))): T > 1 where the
    model is over-confident. Searched on log T in [-3, 3]."""
    m = np.asarray(float_margins, np.float64)

    def nll(log_t: float) -> float:
        z = np.vstack([np.zeros((1, m.shape[1])), -m / np.exp(log_t)])
        return float(np.mean(logsumexp(z, axis=0)))

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def expected_drop(float_margins: np.ndarray, variance: np.ndarray, fit: MarginFit, temperature: float) -> float:
    """Predicted drop (points): the expected accuracy a model calibrated at `temperature` loses when
    its decision flips under the fitted margin model, 100 * mean_i P(flip_i) * (p_a - p_b)_i.

    a is the float model's class, b its runner-up (from the label and its rivals); a flip to b
    costs the clip P(a is right) - P(b is right), which the calibrated probabilities estimate. The
    labels enter only through the temperature and the fit, so a calibration set with a handful of
    boundary clips does not decide the prediction by which side of the boundary they happen to
    lie; a small perturbation flips only clips near the boundary, where p_a ~ p_b, and predicts
    ~0, as test sets measure. P(flip) = Phi(-shrink * u / sqrt(noise_scale * s^2)) with u = z_a - z_b."""
    m = np.asarray(float_margins, np.float64)
    s2 = floored_variance(variance)
    m0 = m[0]
    m1 = m[1] if len(m) > 1 else np.full_like(m0, -np.inf)
    correct = m0 > 0
    label_second = ~correct & (m1 > 0)          # wrong, the label is the runner-up
    u = np.where(correct, m0, np.where(label_second, -m0, m1 - m0))
    s2_u = np.where(correct | label_second, s2[0], s2[min(1, len(s2) - 1)])
    logits = np.vstack([np.zeros((1, m.shape[1])), -m / temperature])       # label, rivals (relative)
    p = np.exp(logits - logsumexp(logits, axis=0))
    p_r1 = p[2] if len(m) > 1 else np.zeros_like(m0)
    p_a = np.where(correct, p[0], p[1])
    p_b = np.where(correct, p[1], np.where(label_second, p[0], p_r1))
    with np.errstate(divide="ignore", invalid="ignore"):     # no noise: a hard decision, 0.5 at a tie
        flip = np.nan_to_num(ndtr(-fit.shrink * u / np.sqrt(fit.noise_scale * s2_u)), nan=0.5)
    return 100.0 * float(np.mean(flip * (p_a - p_b)))


def predict_run_model(float_model, qmodel, feats, cfg: QuantConfig, spec: "PredictSpec", seed: int,
                      validated: ValidatedRange, margins_file: Optional[str] = None) -> Dict[str, object]:
    """The `predict/*` summary keys for the model a run actually evaluates (`qmodel`, or a model of
    its logits: whatever rounding, GPTQ, refinement, bias correction, activation, gate and state
    grids it has), before any test clip is seen: the round-to-nearest noise model of the float
    model (`predict_summary`) gives each calibration margin its spread, one pass of `qmodel` over
    the same calibration clips fits how much it actually shrinks and spreads them (`MarginFit`),
    and the drop is the accuracy the float model, by its own softmax confidence, expects to lose to
    the decisions that fit flips (`expected_drop`).

    `predict/rtn_degradation` keeps the float-model-only prediction (round-to-nearest weights).
    A model the gradient pass cannot follow gets the same fit with equal spread for every margin
    (`predict/noise_shape` = "uniform"). `margins_file`: where to save the per-clip margins,
    variances and correctness (npz) for a study of the predictor. `validated`: where predictions of
    the run's recipe family were measured (`predict/in_validated_range`, `predict/validated_range`)."""
    t0 = time.perf_counter()
    x, y = calibration_set(feats.x[spec.calib], feats.y[spec.calib], spec.n_calib, seed)
    rtn = predict_summary(float_model, feats, cfg, spec, seed, False)
    float_out = np.asarray(predict(float_model, x), np.float64)
    k = min(spec.competitors, float_out.shape[1] - 1)
    if rtn["predict/degradation"] is None:
        rivals, variance = strongest_rivals(float_out, y, k), np.ones((k, len(y)))
    else:
        sens = derived(float_model, "sensitivity", lambda: sensitivity(float_model, x, y, spec.competitors), x, y,
                       spec.competitors)
        rivals, variance = sens.rivals, config_variance(sens, cfg.weights_only())
    quant_out = np.asarray(predict(qmodel, x), np.float64)
    m_float = output_margins(float_out, y, rivals, softmax_output(float_model))
    m_quant = output_margins(quant_out, y, rivals, softmax_output(qmodel))
    correct = np.argmax(float_out, axis=1) == y
    fit = fit_margins(m_float, m_quant, variance)
    drop = expected_drop(m_float, variance, fit, RUN_MODEL_TEMPERATURE)
    if margins_file is not None:
        with atomic_path(margins_file) as tmp:
            np.savez(tmp, float_margins=m_float, quant_margins=m_quant, variance=variance, correct=correct,
                     quant_correct=np.argmax(quant_out, axis=1) == y, labels=y, rivals=rivals)
    return {**{k_: v for k_, v in rtn.items() if k_ not in ("predict/degradation", "time/predict_s")},
            "predict/degradation": drop, "predict/rtn_degradation": rtn["predict/degradation"],
            "predict/shrink": fit.shrink, "predict/noise_scale": fit.noise_scale,
            "predict/noise_shape": "uniform" if rtn["predict/degradation"] is None else "gradients",
            "predict/of": f"the run's model, fitted on {len(y)} {spec.calib} clips", "predict/matches_run": True,
            "predict/weights_only": False, "predict/calibration_clips": len(y), "predict/calibration_split": spec.calib,
            "predict/in_validated_range": validated.contains(cfg),
            "predict/validated_bits": list(validated.bits) if validated.bits else None,
            "predict/validated_range": validated.describe(), "time/predict_s": time.perf_counter() - t0}


def weight_config(bits: int, granularity: str = "per_tensor", scheme: str = "asymmetric",
                  estimator: str = "minmax", bias: bool = True, overrides: Optional[Mapping] = None) -> QuantConfig:
    """The weight-only QuantConfig the PTQ recipes build (biases per tensor at the same bits)."""
    return QuantConfig(weights=QuantSpec(bits, scheme, granularity, -1, estimator),
                       bias=QuantSpec(bits, scheme, "per_tensor", -1, "minmax") if bias else None,
                       overrides=dict(overrides or {}))


def packed_size(sens: Sensitivity, cfg: QuantConfig) -> int:
    """Bytes of the weight tensors packed at their bit-widths with their scales and zero points
    (QuantSpec.packed_bytes, as qat.export stores them); tensors left float count 4 bytes a value."""
    total = 0
    for name, spec in tensor_specs(sens.names, cfg).items():
        w = sens.weights[name]
        if spec is None:
            total += 4 * w.size
        else:
            groups = w.shape[spec.axis] if spec.granularity == "per_channel" and w.ndim else 1
            total += spec.packed_bytes(w.size, groups)
    return total


def drop_table(sens: Sensitivity, bits: Iterable[int] = PREDICT_BITS,
               granularities: Sequence[str] = ("per_tensor", "per_channel"), scheme: str = "asymmetric",
               estimator: str = "minmax") -> List[dict]:
    """Rows {bits, granularity, predicted_drop, size_bytes} for every bit-width and granularity."""
    rows = []
    for b in bits:
        for g in granularities:
            cfg = weight_config(b, g, scheme, estimator)
            rows.append({"bits": b, "granularity": g, "predicted_drop": sens.drop(config_variance(sens, cfg)),
                         "size_bytes": packed_size(sens, cfg)})
    return rows


# ----------------------------------------------------------------------------------- mixed precision

@dataclass(frozen=True)
class MixedProposal:
    """Bits per weight tensor chosen under a predicted-drop budget."""

    bits: Dict[str, int]
    predicted_drop: float
    size_bytes: int
    max_drop: float
    config: QuantConfig
    uniform_bits: Optional[int]          # the smallest uniform bit-width within the budget (None: none is)
    uniform_size_bytes: Optional[int]
    uniform_predicted_drop: Optional[float]
    searched: int                        # configurations the predictor was evaluated on


def _spec_at(base: QuantSpec, bits: int) -> QuantSpec:
    return replace(base, bits=bits)


@dataclass(frozen=True)
class WeightOptions:
    """The weight tensors' options of a mixed-precision search: each searched tensor at each of
    `bits`, its margin variance and packed bytes there; biases fixed at `bias_bits` where given."""

    bits: Tuple[int, ...]
    base: QuantConfig                     # granularity, scheme, estimator of every tensor
    names: List[str]                      # the searched tensors
    specs: Dict[str, QuantSpec]           # searched tensor -> its spec (bits set per option)
    fixed: Dict[str, QuantSpec]           # tensors kept at their bits
    fixed_variance: np.ndarray            # [k, clips] of the fixed tensors
    variance: Dict[str, np.ndarray]       # searched tensor -> [len(bits), k, clips]
    size: Dict[str, np.ndarray]           # searched tensor -> packed bytes per option

    def config(self, choice: Sequence[int]) -> QuantConfig:
        """The weight QuantConfig of one option index per searched tensor."""
        return QuantConfig(weights=self.base.weights, bias=self.base.bias,
                           overrides={**{n: _spec_at(self.specs[n], self.bits[j]) for n, j in zip(self.names, choice)},
                                      **self.fixed})


def weight_options(sens: Sensitivity, bits: Sequence[int], granularity: str = "per_tensor",
                   scheme: str = "asymmetric", estimator: str = "minmax", bias_bits: Optional[int] = 8) -> WeightOptions:
    """Every weight tensor of `sens` at every bit-width of `bits` (biases at `bias_bits`, None: searched)."""
    bits = tuple(sorted({int(b) for b in bits}))
    if not bits:
        raise ConfigError("a mixed-precision proposal needs at least one bit-width to choose from")
    Nullable(Bits())("bias_bits", bias_bits)
    base = weight_config(bits[0], granularity, scheme, estimator)
    spec_of = {n: base.bias if n.endswith("/bias") else base.weights for n in sens.names}
    fixed = {n: _spec_at(spec_of[n], bias_bits) for n in sens.names if n.endswith("/bias") and bias_bits is not None}
    names = [n for n in sens.names if n not in fixed]
    size = {}
    for n in names:
        w, spec = sens.weights[n], spec_of[n]
        groups = w.shape[spec.axis] if spec.granularity == "per_channel" else 1
        size[n] = np.array([_spec_at(spec, b).packed_bytes(w.size, groups) for b in bits])
    return WeightOptions(
        bits=bits, base=base, names=names, specs={n: spec_of[n] for n in names}, fixed=fixed,
        fixed_variance=sum((sens.tensor_variance(n, s) for n, s in fixed.items()), np.zeros_like(sens.margins)),
        variance={n: np.stack([sens.tensor_variance(n, _spec_at(spec_of[n], b)) for b in bits]) for n in names},
        size=size)


def lower_greedily(costs: Sequence[np.ndarray], drop_of: Callable[[Sequence[int]], float],
                   max_drop: float) -> Tuple[Tuple[int, ...], int]:
    """Greedy choice of one option per element (`costs[t][j]`: element t's cost at option j, options
    in increasing cost): from the costliest option of every element, lower one element by one option
    at a time, the one that saves most cost per point of predicted drop while `drop_of(choice)` stays
    within `max_drop`. Returns (the choice, how many candidates were evaluated)."""
    current, searched = [len(c) - 1 for c in costs], 0
    while True:
        here, options = drop_of(current), []
        for t, c in enumerate(costs):
            if current[t] == 0:
                continue
            trial = current.copy()
            trial[t] -= 1
            searched += 1
            d = drop_of(trial)
            if d <= max_drop:
                options.append(((c[current[t]] - c[trial[t]]) / max(d - here, 1e-9), t))
        if not options:
            return tuple(current), searched
        current[max(options)[1]] -= 1


def propose_mixed(sens: Sensitivity, max_drop: float, bits: Sequence[int] = PREDICT_BITS,
                  granularity: str = "per_tensor", scheme: str = "asymmetric", estimator: str = "minmax",
                  bias_bits: Optional[int] = 8, exhaustive_limit: int = 100_000) -> MixedProposal:
    """Bits per weight tensor (from `bits`) with the smallest packed size whose predicted drop is at
    most `max_drop` points.

    `bias_bits`: biases are kept at this width (default 8; None = search them like the kernels).
    They are under 1 % of the weights, so low-bit biases save almost nothing, and their rounding
    error is the one the noise model predicts worst: a few hundred errors that shift every gate
    coherently (BENCHMARKS.md, "Predicted degradation").

    Exhaustive when there are at most `exhaustive_limit` combinations (5 tensors x 7 bit-widths =
    16,807: candidates are tried cheapest first, the first within budget wins), else greedy (lower
    the tensor that saves most bytes per point of predicted drop while the budget holds). The
    variances of tensors add, so every candidate costs one sum and one Phi over the clips."""
    MAX_DROP("max_drop", max_drop)
    opts = weight_options(sens, bits, granularity, scheme, estimator, bias_bits)
    bits, names, var, size = opts.bits, opts.names, opts.variance, opts.size

    def drop_of(choice) -> float:
        return sens.drop(opts.fixed_variance + sum(var[n][j] for n, j in zip(names, choice)))

    top = (len(bits) - 1,) * len(names)
    if drop_of(top) > max_drop:
        raise ConfigError(f"max_drop={max_drop} cannot be met: even {bits[-1]} bits on every tensor is "
                          f"predicted to lose {drop_of(top):.2f} points")
    searched, best = 0, None
    if len(bits) ** len(names) <= exhaustive_limit:
        choices = np.array(list(itertools.product(range(len(bits)), repeat=len(names))))
        total = sum(size[n][choices[:, t]] for t, n in enumerate(names))
        ordered = choices[np.argsort(total, kind="stable")]
        stacked = [var[n] for n in names]
        for start in range(0, len(ordered), 512):      # cheapest first, 512 candidates at a time
            chunk = ordered[start:start + 512]
            v = opts.fixed_variance + sum(stacked[t][chunk[:, t]] for t in range(len(names)))  # [cands, k, clips]
            drops = 100.0 * (sens.correct.mean() - probability_correct(
                np.broadcast_to(sens.margins, v.shape).transpose(1, 0, 2), v.transpose(1, 0, 2)).mean(axis=-1))
            ok = np.flatnonzero(drops <= max_drop)
            if ok.size:
                searched += int(ok[0]) + 1
                best = tuple(int(j) for j in chunk[ok[0]])
                break
            searched += len(chunk)
    else:
        best, searched = lower_greedily([size[n] for n in names], drop_of, max_drop)
    cfg = opts.config(best)
    uniform = [(b, sens.drop(config_variance(sens, weight_config(b, granularity, scheme, estimator)))) for b in bits]
    fits = [(b, d) for b, d in uniform if d <= max_drop]
    ub = fits[0] if fits else None
    return MixedProposal(
        bits={n: cfg.overrides[n].bits for n in sens.names}, predicted_drop=sens.drop(config_variance(sens, cfg)),
        size_bytes=packed_size(sens, cfg), max_drop=float(max_drop), config=cfg,
        uniform_bits=None if ub is None else ub[0],
        uniform_size_bytes=None if ub is None else packed_size(sens, weight_config(ub[0], granularity, scheme,
                                                                                   estimator)),
        uniform_predicted_drop=None if ub is None else ub[1], searched=searched)


# ----------------------------------------------------------------------------------- verification, runs

def measured_drop(float_model, cfg: QuantConfig, x: np.ndarray, y: np.ndarray,
                  calib: Optional[np.ndarray] = None) -> Dict[str, float]:
    """An actual PTQ evaluation of `cfg` (round to nearest, activation ranges calibrated on `calib`
    (training clips) where `cfg` quantizes activations, ranges frozen, as `ptq_seed` does) on (x, y):
    {float_acc, quant_acc, drop} (drop in points)."""
    qmodel = quantize_model(float_model, cfg)
    if cfg.quantizes_activations:
        if calib is None:
            raise ConfigError("measured_drop of a config that quantizes activations needs calibration clips")
        calibrate(qmodel, batches(calib))
    freeze_ranges(qmodel)
    acc_f = float(np.mean(predict_classes(float_model, x) == y))
    acc_q = float(np.mean(predict_classes(qmodel, x) == y))
    return {"float_acc": acc_f, "quant_acc": acc_q, "drop": 100.0 * (acc_f - acc_q)}


def calibration_set(x: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of n labelled clips (give it validation or training clips, never test)."""
    idx = calibration_indices(len(x), n, seed)
    return x[idx], y[idx]


CALIB_SPLITS = ("val", "train")


@dataclass(frozen=True)
class PredictSpec(Checked):
    """How degradation is predicted (conf/predict/*.yaml)."""

    section = "predict"

    calib: str = setting(OneOf(CALIB_SPLITS))   # split of the labelled calibration clips (never test)
    n_calib: int = setting(Integer(1))
    competitors: int = setting(Integer(1))       # rival classes per clip in the margin model
    scheme: str = setting(SCHEME)
    estimator: str = setting(ESTIMATOR)
    granularity: str = setting(GRANULARITY)      # of the mixed-precision proposal
    bits: Tuple[int, ...] = setting(ListOf(Bits()))
    bias_bits: Optional[int] = setting(Nullable(Bits()))   # biases in the mixed proposal (None: searched)
    act_granularity: str = setting(GRANULARITY)  # activation parts of the mixed proposal (asymmetric)
    act_estimator: str = setting(ESTIMATOR)
    act_percentile: float = setting(PERCENTILE)

    def act_spec(self, bits: int) -> QuantSpec:
        """The activation grid of the mixed proposal's parts at `bits`."""
        return QuantSpec(bits, "asymmetric", self.act_granularity, -1, self.act_estimator, self.act_percentile)
