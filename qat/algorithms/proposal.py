"""What `evaluate.py predict_only=true` reports for a float model: the predicted-drop table, and under
a budget (`max_drop`, points) two mixed-precision proposals, each verified by running it:

- bits per weight tensor (`propose_mixed`: weights only, packed size minimised), and
- bits per weight tensor *and* per activation part (`propose_with_parts`): layer inputs, gate
  activations, cell state, hidden state.

Activation parts are measured rather than modelled (`measure_part_noise`): each part is quantized
alone at each candidate bit-width (weights float, ranges calibrated on training clips and frozen), the
model runs on the calibration clips, and the squared change of every margin, (m_q - m)^2, is that
part's variance for that clip and rival: the part's own clip-by-clip pattern, its systematic shift
included. Variances of weight tensors (the noise model of qat.algorithms.predict) and of parts add; a
candidate's drop is 100 * (mean correct - mean_i prod_k Phi(m_ik / sqrt(v_ik))).

The cost a joint proposal minimises is the bytes of one inference: the packed weights plus every value
an activation quantizer rounds for one clip (each time step of each gate and state) at its part's
bits. Searched greedily from the widest config (`lower_greedily`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from qat.algorithms.calibration import batches, calibrate, calibration_clips, values_per_clip
from qat.algorithms.predict import (MAX_DROP, PredictSpec, Sensitivity, calibration_set, drop_table,
                                    lower_greedily, measured_drop, model_margins, packed_size, propose_mixed,
                                    sensitivity,
                                    weight_config, weight_options)
from qat.errors import ConfigError
from qat.layers.model import QuantConfig, freeze_ranges, quantize_model
from qat.layers.recurrent import HIDDEN
from qat.quant.spec import QuantSpec

# QuantConfig field of each activation part -> what it is
PARTS = {"inputs": "layer inputs", "gates": "gate activations", "state": "cell state", "hidden": "hidden state"}
NEAR_FLOAT_BITS = 16      # h while the cell state is measured alone (`hidden` None would mean "as the state")
PART_CALIBRATION_CLIPS = 512


def part_config(part: str, spec: QuantSpec) -> QuantConfig:
    """Only `part` quantized, at `spec`; weights float."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r} is not allowed: expected one of {', '.join(PARTS)}")
    if part == "state":
        return QuantConfig(state=spec, hidden=replace(spec, bits=NEAR_FLOAT_BITS))
    return QuantConfig(**{part: spec})


@dataclass(frozen=True)
class PartNoise:
    """Measured margin variances of each activation part a model has, alone, at each of `bits`."""

    bits: Tuple[int, ...]
    variance: Dict[str, np.ndarray]    # part -> [len(bits), k, clips]
    values: Dict[str, int]             # part -> values its quantizers round per clip
    seconds: float


def measure_part_noise(float_model, sens: Sensitivity, x: np.ndarray, calib: np.ndarray,
                       act: Callable[[int], QuantSpec], bits: Sequence[int]) -> PartNoise:
    """Each part of PARTS the model has (a GRU has no cell state), quantized alone at each of `bits`
    with `act(bits)`, calibrated on `calib` (training clips), run on the calibration clips `x` of
    `sens`: the squared change of each margin to `sens`'s rivals."""
    t0 = time.perf_counter()
    bits = tuple(sorted({int(b) for b in bits}))
    y = sens.labels
    m_float = model_margins(float_model, x, y, sens.rivals)
    variance, values = {}, {}
    for part in PARTS:
        rows = []
        for b in bits:
            qmodel = quantize_model(float_model, part_config(part, act(b)))
            if not rows:
                counts = values_per_clip(qmodel, x[0])
                values[part] = sum(n for (_, key), n in counts.items() if not (part == "state" and key == HIDDEN))
                if values[part] == 0:
                    del values[part]
                    break
            calibrate(qmodel, batches(calib))
            freeze_ranges(qmodel)
            rows.append((model_margins(qmodel, x, y, sens.rivals) - m_float) ** 2)
        if rows:
            variance[part] = np.stack(rows)
    return PartNoise(bits=bits, variance=variance, values=values, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class PartProposal:
    """Bits per weight tensor and per activation part under a predicted-drop budget."""

    weights: Dict[str, int]
    parts: Dict[str, int]
    predicted_drop: float
    weight_bytes: int
    activation_bytes: int              # per clip: every quantized activation value at its part's bits
    max_drop: float
    config: QuantConfig
    searched: int


def propose_with_parts(sens: Sensitivity, noise: PartNoise, max_drop: float, act: Callable[[int], QuantSpec],
                       granularity: str = "per_tensor", scheme: str = "asymmetric", estimator: str = "minmax",
                       bias_bits: Optional[int] = 8) -> PartProposal:
    """The smallest bytes per inference (packed weights + activation values of one clip) whose
    predicted drop is at most `max_drop` points, choosing each weight tensor's and each part's bits
    from `noise.bits`."""
    MAX_DROP("max_drop", max_drop)
    opts = weight_options(sens, noise.bits, granularity, scheme, estimator, bias_bits)
    parts = list(noise.variance)
    variances = [opts.variance[n] for n in opts.names] + [noise.variance[p] for p in parts]
    costs = [opts.size[n] for n in opts.names] + [np.array([noise.values[p] * b / 8 for b in noise.bits])
                                                  for p in parts]

    def drop_of(choice) -> float:
        return sens.drop(opts.fixed_variance + sum(v[j] for v, j in zip(variances, choice)))

    widest = [len(c) - 1 for c in costs]
    if drop_of(widest) > max_drop:
        raise ConfigError(f"max_drop={max_drop} cannot be met: even {noise.bits[-1]} bits on every tensor and "
                          f"activation part is predicted to lose {drop_of(widest):.2f} points")
    choice, searched = lower_greedily(costs, drop_of, max_drop)
    w_choice, p_choice = choice[:len(opts.names)], choice[len(opts.names):]
    weights = opts.config(w_choice)
    part_bits = {p: noise.bits[j] for p, j in zip(parts, p_choice)}
    specs = {p: act(b) for p, b in part_bits.items()}
    cfg = replace(weights, **specs)
    return PartProposal(
        weights={n: weights.overrides[n].bits for n in sens.names}, parts=part_bits,
        predicted_drop=drop_of(choice), weight_bytes=packed_size(sens, weights),
        activation_bytes=int(np.ceil(sum(costs[len(opts.names) + t][j] for t, j in enumerate(p_choice)))),
        max_drop=float(max_drop), config=cfg, searched=searched)


def predict_run(float_model, feats, spec: PredictSpec, seed: int = 0,
                max_drop: Optional[float] = None, verify: bool = True) -> Dict[str, object]:
    """Everything `evaluate.py predict_only=true` reports for one float model: the predicted-drop
    table (bits x granularity), and with `max_drop` the weights-only and the weights + parts
    proposals, each verified by an actual PTQ evaluation on the test split unless verify=False.
    Returns a dict; `format_report` turns it into text."""
    t0 = time.perf_counter()
    x, y = calibration_set(feats.x[spec.calib], feats.y[spec.calib], spec.n_calib, seed)
    sens = sensitivity(float_model, x, y, spec.competitors)
    rows = drop_table(sens, spec.bits, ("per_tensor", "per_channel"), spec.scheme, spec.estimator)
    out: Dict[str, object] = {"calib": spec.calib, "n_calib": len(x), "calib_acc": float(sens.correct.mean()),
                              "table": rows, "float_bytes": int(sum(4 * w.size for w in sens.weights.values())),
                              "sensitivity_s": sens.seconds, "predict_s": time.perf_counter() - t0}
    if max_drop is None:
        return out
    prop = propose_mixed(sens, float(max_drop), spec.bits, spec.granularity, spec.scheme, spec.estimator,
                         spec.bias_bits)
    out["proposal"] = prop
    out["propose_s"] = time.perf_counter() - t0 - out["predict_s"]
    calib = calibration_clips(feats.x["train"], PART_CALIBRATION_CLIPS, seed)
    noise = measure_part_noise(float_model, sens, x, calib, spec.act_spec, spec.bits)
    joint = propose_with_parts(sens, noise, float(max_drop), spec.act_spec, spec.granularity, spec.scheme,
                               spec.estimator, spec.bias_bits)
    out.update(part_proposal=joint, part_noise_s=noise.seconds)
    if verify:
        test = feats.x["test"], feats.y["test"]
        out["verified"] = measured_drop(float_model, prop.config, *test)
        if prop.uniform_bits is not None:
            out["verified_uniform"] = measured_drop(
                float_model, weight_config(prop.uniform_bits, spec.granularity, spec.scheme, spec.estimator), *test)
        out["verified_parts"] = measured_drop(float_model, joint.config, *test, calib=calib)
    return out


def format_report(r: Dict[str, object]) -> str:
    """Markdown text of a `predict_run` result."""
    lines = [f"predicted test-accuracy drop (points) from {r['n_calib']} {r['calib']} clips "
             f"(float acc on them {100 * r['calib_acc']:.1f}%), weights round-to-nearest; "
             f"{r['predict_s']:.1f} s", "",
             "| bits | per_tensor drop | per_channel drop | per_tensor KiB | per_channel KiB |", "|---|---|---|---|---|"]
    table = {(row["bits"], row["granularity"]): row for row in r["table"]}
    for b in sorted({row["bits"] for row in r["table"]}):
        pt, pc = table[(b, "per_tensor")], table[(b, "per_channel")]
        lines.append(f"| {b} | {pt['predicted_drop']:.2f} | {pc['predicted_drop']:.2f} | "
                     f"{pt['size_bytes'] / 1024:.1f} | {pc['size_bytes'] / 1024:.1f} |")
    lines.append(f"\nfloat32 weights: {r['float_bytes'] / 1024:.1f} KiB")
    prop = r.get("proposal")
    if prop is None:
        return "\n".join(lines)
    lines += ["", f"mixed precision under a predicted drop of {prop.max_drop:g} points "
                  f"({prop.config.weights.granularity}, {prop.searched} configurations searched):",
              "  " + ", ".join(f"{n}={b}" for n, b in prop.bits.items()),
              f"  predicted drop {prop.predicted_drop:.2f} points, {prop.size_bytes / 1024:.1f} KiB"]
    if prop.uniform_bits is not None:
        lines.append(f"  smallest uniform bit-width within the budget: {prop.uniform_bits} bits, "
                     f"{prop.uniform_size_bytes / 1024:.1f} KiB, predicted drop {prop.uniform_predicted_drop:.2f}")
    v = r.get("verified")
    if v is not None:
        lines.append(f"  verified by PTQ on the test split: float acc {100 * v['float_acc']:.2f}%, quantized "
                     f"{100 * v['quant_acc']:.2f}%, measured drop {v['drop']:+.2f} points")
    u = r.get("verified_uniform")
    if u is not None:
        lines.append(f"  (uniform {prop.uniform_bits} bits measured: drop {u['drop']:+.2f} points)")
    joint = r["part_proposal"]
    lines += ["", f"weights and activation parts under a predicted drop of {joint.max_drop:g} points "
                  f"(part noise measured in {r['part_noise_s']:.1f} s, {joint.searched} configurations searched):",
              "  " + ", ".join(f"{n}={b}" for n, b in joint.weights.items()),
              "  " + ", ".join(f"{PARTS[p]}={b}" for p, b in joint.parts.items()),
              f"  predicted drop {joint.predicted_drop:.2f} points, weights {joint.weight_bytes / 1024:.1f} KiB, "
              f"activations {joint.activation_bytes / 1024:.1f} KiB per clip"]
    vp = r.get("verified_parts")
    if vp is not None:
        lines.append(f"  verified by PTQ on the test split: quantized {100 * vp['quant_acc']:.2f}%, "
                     f"measured drop {vp['drop']:+.2f} points")
    return "\n".join(lines)
