"""Whole-model quantization: which tensors of a model are quantized (`QuantConfig`), the fake-quant twin
of a float model (`quantize_model`), freezing its ranges, and its quantized weights as integer codes.

`quantize_model` swaps every `LSTM` for QLSTM, every `GRU` for QGRU (also inside `Bidirectional`, both
directions, any merge mode), every `Dense` for QDense and every Conv1D / Conv2D / DepthwiseConv2D for
its quantized twin (qat.layers.conv; fold BatchNormalization into them first, qat.layers.fold) (same names, float weights copied, weight
ranges fitted with each spec's estimator) and copies all other layers as they are. The layers of a
Bidirectional are addressed by their own names (`forward_lstm`, `backward_lstm`): `leaf_layers`. The twin trains with `model.fit` (straight-through gradients) and saves / loads as .keras.
Activation ranges come from calibration (qat.algorithms.calibration); before it the activation
quantizers pass data through.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.checks import rejected
from qat.errors import ConfigError
from qat.layers.base import QuantizedLayer, float_source
from qat.layers.conv import CONVOLUTIONS, kernel_name
from qat.layers.dense import QDense
from qat.layers.gru import QGRU
from qat.layers.lstm import QLSTM
from qat.layers.recurrent import QuantizedRNN
from qat.quant.integer import IntegerMode
from qat.quant.quantizers import RANGE, Strategy
from qat.quant.spec import QuantSpec

SPEC_FIELDS = ("weights", "bias", "inputs", "gates", "state", "hidden")


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized at which spec (None = keep float), and by which quantizer strategy."""

    weights: Optional[QuantSpec] = None   # LSTM / GRU kernel + recurrent kernel, Dense and convolution kernels
    bias: Optional[QuantSpec] = None      # LSTM, GRU, Dense and convolution biases
    inputs: Optional[QuantSpec] = None    # layer inputs (act_bits); a Dense input is always per tensor:
                                          # per-feature ranges of a flattened LSTM sequence would cost
                                          # two floats per input, more than the weights they serve
    gates: Optional[QuantSpec] = None     # the gate activations: LSTM i, f, c, o; GRU z, r, h (act_bits)
    state: Optional[QuantSpec] = None     # LSTM cell state c and hidden state h; GRU h (state_bits)
    hidden: Optional[QuantSpec] = None    # the hidden state h where it differs from `state` (None: as state)
    strategy: Strategy = RANGE            # qat.quant.quantizers.RANGE or LSQ (learned step sizes)
    integer: bool = False                 # integer mode (qat.layers.integer): act_bits = inputs.bits, cell
                                          # state at state.bits; weights symmetric, no bias spec
    overrides: Mapping[str, QuantSpec] = field(default_factory=dict)  # e.g. {"lstm/kernel": QuantSpec(3)}

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in SPEC_FIELDS and v is not None and not isinstance(v, QuantSpec):
                raise rejected(f"QuantConfig.{f.name}", v, "a QuantSpec or None")
        if not isinstance(self.strategy, Strategy):
            raise ConfigError(f"QuantConfig.strategy={self.strategy!r} is not allowed: expected "
                              "qat.quant.quantizers.RANGE or LSQ")
        for name, spec in dict(self.overrides).items():
            if not isinstance(spec, QuantSpec):
                raise rejected(f"QuantConfig.overrides[{name!r}]", spec, "a QuantSpec")
        if self.integer and (self.inputs is None or self.state is None):
            raise ConfigError("QuantConfig.integer=True needs `inputs` (act_bits) and `state` (cell-state bits) specs")
        if self.integer and self.hidden is not None:
            raise ConfigError("QuantConfig.hidden is not allowed with integer=True: the integer kernel's h sits on "
                              "the act_bits grid")

    @property
    def quantizes_activations(self) -> bool:
        """Whether any layer input, gate or state is quantized (then the model needs calibration)."""
        return any(s is not None for s in (self.inputs, self.gates, self.state, self.hidden))

    def weights_only(self) -> "QuantConfig":
        """The same config with activations, gates and state left float (so not in integer mode)."""
        return replace(self, inputs=None, gates=None, state=None, hidden=None, integer=False)


# float recurrent layer type -> its quantized twin
RECURRENT = {keras.layers.LSTM: QLSTM, keras.layers.GRU: QGRU}
# every float layer type quantize_model quantizes -> its quantized twin (Bidirectional: see _clone)
TWINS = {**RECURRENT, keras.layers.Dense: QDense, **CONVOLUTIONS}
QUANTIZED_LAYERS = tuple(TWINS.values())


@dataclass(frozen=True)
class QuantizedTensor:
    """One exported weight tensor: integer codes plus what is needed to read them back."""

    codes: np.ndarray        # int32, same shape as the weight
    scale: np.ndarray        # float32, broadcastable to the weight (one per quantization group)
    zero_point: np.ndarray   # float32 holding integers, same shape as scale
    spec: QuantSpec
    values: np.ndarray       # float32 dequantized weight = scale * (codes - zero_point), as the model uses it


def leaf_layers(model) -> list:
    """The model's layers in order, each Bidirectional replaced by its forward and backward layers."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            out += [layer.forward_layer, layer.backward_layer]
        else:
            out.append(layer)
    return out


def find_layer(model, name: str):
    """A layer of `leaf_layers(model)` by name."""
    for layer in leaf_layers(model):
        if layer.name == name:
            return layer
    raise ConfigError(f"layer {name!r} is not in model '{model.name}': expected one of "
                      f"{[l.name for l in leaf_layers(model)]}")


def input_tap(model, layer):
    """The symbolic tensor that feeds `layer` (a leaf layer) in `model`: its own input, or the input of
    the Bidirectional that holds it."""
    for top in model.layers:
        if top is layer or (isinstance(top, keras.layers.Bidirectional)
                            and layer in (top.forward_layer, top.backward_layer)):
            return top.input
    raise ConfigError(f"layer {layer.name!r} is not in model '{model.name}'")


def output_taps(model, layer) -> list:
    """[the symbolic input of `layer`, its symbolic output] for a top-level layer; [the input] for a
    layer inside a Bidirectional (it has no output in the model's graph: call it on its input)."""
    return [input_tap(model, layer)] + ([layer.output] if any(top is layer for top in model.layers) else [])


def _weight_names(layer) -> List[str]:
    if isinstance(layer, (*RECURRENT, QuantizedRNN)):
        names = ["kernel", "recurrent_kernel"] + (["bias"] if layer.use_bias else [])
    elif type(layer) in (keras.layers.Dense, QDense, *CONVOLUTIONS, *CONVOLUTIONS.values()):
        names = [kernel_name(layer)] + (["bias"] if layer.use_bias else [])
    else:
        return []
    return [f"{layer.name}/{n}" for n in names]


def weight_tensor_names(model) -> List[str]:
    """Names of the quantizable weight tensors ("<layer>/<weight>"), in layer order; the keys of
    QuantConfig.overrides and of `quantized_weights`."""
    return [n for layer in leaf_layers(model) for n in _weight_names(layer)]


def float_weight(model, name: str) -> np.ndarray:
    """A float model's weight by its "<layer>/<weight>" name."""
    layer, weight = name.split("/")
    return getattr(float_source(find_layer(model, layer)), weight).numpy()


INTEGER_TOPOLOGY = "Input -> [Normalization] -> LSTM / GRU (one or more) -> [Flatten] -> Dense"


def integer_modes(model, cfg: QuantConfig) -> Dict[str, IntegerMode]:
    """Layer name -> IntegerMode of every layer of `model` in integer mode (empty unless cfg.integer):
    the first LSTM reads the model input through its input quantizer, every later layer the hidden
    states of the LSTM below it. A one-line ConfigError for a model integer inference cannot run."""
    if not cfg.integer:
        return {}
    act, state = cfg.inputs.bits, cfg.state.bits
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    modes: Dict[str, IntegerMode] = {}
    sequence = False      # the last LSTM returns its whole sequence

    def refuse(layer, why: str):
        raise ConfigError(f"layer '{layer.name}' ({type(layer).__name__}) cannot run in integer mode ({why}): "
                          f"expected {INTEGER_TOPOLOGY}")

    for k, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Normalization) and not modes:
            continue     # float statistics before the integer part: they shape the int8 input features
        if type(layer) in RECURRENT:
            if modes and not sequence:
                refuse(layer, "the LSTM below it returns its last state only")
            if layer.go_backwards:
                refuse(layer, "it reads the clip backwards; the integer kernel streams frames forwards")
            if type(layer) is keras.layers.GRU and not layer.reset_after:
                refuse(layer, "reset_after=False; the integer GRU is Keras' default reset_after=True")
            if (keras.activations.serialize(layer.cell.activation) != "tanh"
                    or keras.activations.serialize(layer.cell.recurrent_activation) != "sigmoid"):
                refuse(layer, "its activations are not tanh / sigmoid, the kernel's tables")
            modes[layer.name] = IntegerMode(act, state, act if modes else None)
            sequence = layer.return_sequences
        elif type(layer) in (keras.layers.Flatten, keras.layers.Dropout) and modes:
            sequence = sequence and type(layer) is keras.layers.Dropout
        elif type(layer) is keras.layers.Dense and modes and k == len(layers) - 1 and not sequence:
            if keras.activations.serialize(layer.activation) not in ("softmax", "linear"):
                refuse(layer, "its activation is not softmax or linear")
            modes[layer.name] = IntegerMode(act, state, act)
        else:
            refuse(layer, "not part of the integer topology here")
    if not modes or type(layers[-1]) is not keras.layers.Dense:
        raise ConfigError(f"model '{model.name}' cannot run in integer mode: expected {INTEGER_TOPOLOGY}")
    return modes


def integer_layout(qmodel) -> Optional[dict]:
    """What integer inference of an integer-mode twin needs besides its tensors (None for other
    models): the input shape, and per layer in order its kind (lstm / gru / dense), name, units, mode and
    sequence options; the first LSTM's input spec (its range is in the tensors)."""
    layers = [layer for layer in quantized_layers(qmodel) if layer.integer is not None]
    if not layers:
        return None
    out = []
    for layer in layers:
        entry = {"name": layer.name, "units": int(layer.units), **layer.integer.to_config()}
        if isinstance(layer, QuantizedRNN):
            entry.update(kind="lstm" if isinstance(layer, QLSTM) else "gru", return_sequences=layer.return_sequences)
            if layer.integer.input_bits is None:
                entry["input_spec"] = layer.specs["input"].to_config()
        else:
            entry.update(kind="dense", activation=keras.activations.serialize(layer.activation))
        out.append(entry)
    return {"input_shape": [int(d) for d in qmodel.inputs[0].shape[1:]], "layers": out}


def _layer_specs(layer, cfg: QuantConfig, modes: Mapping[str, IntegerMode]) -> dict:
    names = {n.split("/")[-1]: n for n in _weight_names(layer)}
    specs = {w: cfg.overrides.get(full, cfg.bias if w == "bias" else cfg.weights) for w, full in names.items()}
    specs["input"] = cfg.inputs
    mode = modes.get(layer.name)
    if mode is not None:
        specs["integer"] = mode
        if mode.input_bits is not None:
            specs["input"] = None
    if type(layer) in RECURRENT:
        specs.update(gate=cfg.gates, state=cfg.state, hidden=cfg.hidden)
    elif specs["input"] is not None and specs["input"].granularity == "per_channel":
        specs["input"] = replace(specs["input"], granularity="per_tensor")
    kernel = specs.get("depthwise_kernel")
    if type(layer) is keras.layers.DepthwiseConv2D and kernel is not None and kernel.granularity == "per_channel" \
            and f"{layer.name}/depthwise_kernel" not in cfg.overrides:
        specs["depthwise_kernel"] = replace(kernel, axis=-2)   # [kh, kw, channels, multiplier]: per channel
    return specs


def _twin(layer, cfg: QuantConfig, name: str):
    twin = RECURRENT[type(layer)].from_float(layer, _layer_specs(layer, cfg, {}), cfg.strategy)
    twin._name = name
    return twin


def _clone(layer, cfg: QuantConfig, modes: Mapping[str, IntegerMode]):
    if type(layer) in RECURRENT:
        return RECURRENT[type(layer)].from_float(layer, _layer_specs(layer, cfg, modes), cfg.strategy)
    if type(layer) is keras.layers.Bidirectional and type(layer.forward_layer) in RECURRENT:
        # Bidirectional names its layers forward_<name> / backward_<name> itself
        fw, bw = layer.forward_layer, layer.backward_layer
        return keras.layers.Bidirectional(_twin(fw, cfg, fw.name[len("forward_"):]),
                                          backward_layer=_twin(bw, cfg, bw.name[len("backward_"):]),
                                          merge_mode=layer.merge_mode, name=layer.name)
    if type(layer) in TWINS:
        return TWINS[type(layer)].from_float(layer, _layer_specs(layer, cfg, modes), cfg.strategy)
    return layer.__class__.from_config(layer.get_config())


QUANTIZABLE_TYPES = ("LSTM", "GRU", "Bidirectional(LSTM / GRU)", "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D",
                     "BatchNormalization after a convolution or Dense (folded)", "Normalization (kept float)",
                     "layers without weights")


def unquantizable_layers(model) -> List[str]:
    """Names of the layers of a float model that hold weights quantize_model cannot quantize (after
    folding batch norms: qat.layers.fold): they would compute in float."""
    out = []
    for layer in model.layers:
        if type(layer) in TWINS or isinstance(layer, (keras.layers.InputLayer, keras.layers.Normalization)):
            continue
        if type(layer) is keras.layers.Bidirectional and type(layer.forward_layer) in RECURRENT \
                and type(layer.backward_layer) in RECURRENT:
            continue
        if layer.weights or isinstance(layer, (keras.layers.RNN, keras.layers.Wrapper)):
            out.append(layer.name)
    return out


def check_quantizable(model, keep_float: bool) -> None:
    """A one-line ConfigError naming the first layer of `model` quantize_model cannot quantize and the
    types it can, unless `keep_float` (those layers then stay float and `float_layers` lists them)."""
    bad = unquantizable_layers(model)
    if bad and not keep_float:
        layer = model.get_layer(bad[0])
        raise ConfigError(f"layer '{layer.name}' ({type(layer).__name__}) of model '{model.name}' cannot be quantized: "
                          f"expected {', '.join(QUANTIZABLE_TYPES)} (model.keep_float=true keeps such layers float)")


def quantize_model(float_model, cfg: QuantConfig):
    """The fake-quant twin of `float_model`: LSTM -> QLSTM, GRU -> QGRU, Dense -> QDense, convolutions ->
    qat.layers.conv, with the quantizers `cfg` asks for, float weights copied, weight ranges initialised
    from the float weights with each spec's estimator; other layers (Normalization, Flatten, Dropout,
    ...) copied as they are (`float_layers` lists those with parameters; `check_quantizable` refuses them)."""
    if not isinstance(cfg, QuantConfig):
        raise rejected("cfg", cfg, "a qat.layers.model.QuantConfig")
    valid = weight_tensor_names(float_model)
    unknown = sorted(set(cfg.overrides) - set(valid))
    if unknown:
        raise ConfigError(f"override name(s) {unknown} are not allowed: expected names among {valid}")
    modes = integer_modes(float_model, cfg)
    qmodel = keras.models.clone_model(float_model, clone_function=lambda layer: _clone(layer, cfg, modes))
    for layer in leaf_layers(float_model):
        twin = find_layer(qmodel, layer.name)
        if isinstance(twin, QuantizedLayer):
            twin.copy_float_weights(layer)
        elif layer.weights:
            twin.set_weights(layer.get_weights())
    return qmodel


def quantized_layers(qmodel) -> List[QuantizedLayer]:
    return [layer for layer in leaf_layers(qmodel) if isinstance(layer, QuantizedLayer)]


def float_layers(qmodel) -> List[str]:
    """Names of the layers of a twin that compute with parameters in float: not quantized layers that
    hold weights (e.g. a convolution), and normalisation (its statistics are float constants)."""
    return [layer.name for layer in leaf_layers(qmodel) if not isinstance(layer, QuantizedLayer)
            and (layer.weights or isinstance(layer, keras.layers.Normalization))]


def freeze_ranges(qmodel) -> None:
    """Fix every quantization range of a fake-quant model where it is now: weight quantizers keep
    their current scale / zero point instead of following the weights, learned scales stop training.
    After this the model computes exactly what its exported integer weights compute. Quantizers
    already frozen are left as they are, so this can be called again after changing other weights."""
    for layer in quantized_layers(qmodel):
        for name, q in layer.weight_quantizers.items():
            if float(q.frozen.numpy()) == 0.0:
                q.freeze(getattr(layer, name))
        for q in layer.activation_quantizers.values():
            q.freeze()


def quantized_weights(qmodel) -> Dict[str, QuantizedTensor]:
    """Every quantized weight tensor of a `quantize_model` twin, as integer codes + scale/zero point,
    computed exactly as the forward pass does (float weights left float are not included)."""
    out = {}
    for layer in quantized_layers(qmodel):
        for name, q in layer.weight_quantizers.items():
            w = tf.convert_to_tensor(getattr(layer, name))
            scale, zp = q.scale_zero_point(w)
            codes = tf.clip_by_value(tf.round(w / scale + zp), q.spec.qmin, q.spec.qmax)
            out[f"{layer.name}/{name}"] = QuantizedTensor(codes.numpy().astype(np.int32), scale.numpy(),
                                                          zp.numpy(), q.spec, q(w).numpy())
    return out
