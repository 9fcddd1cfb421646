"""BatchNormalization folded into the convolution (or Dense) before it, as every int8 deployment flow
does before quantization: with s = gamma / sqrt(moving_variance + epsilon),

    W' = W * s (per output channel)        b' = (b - moving_mean) * s + beta

so the folded layer computes what conv -> BN computes at inference, and the quantizer sees the
weights the device will hold. QAT then trains the folded layer (the BN statistics are frozen at
their trained values).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qat.errors import ConfigError
from qat.layers.conv import kernel_name

FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _producer(layer):
    nodes = layer._inbound_nodes
    if len(nodes) != 1:
        return None
    inbound = nodes[0].inbound_layers
    return inbound if not isinstance(inbound, (list, tuple)) else None


def foldable_pairs(model) -> List[Tuple[object, object]]:
    """(layer, batch norm) pairs where a BatchNormalization over the last axis reads only the output
    of a convolution / Dense with no activation, which nothing else reads."""
    pairs = []
    for bn in model.layers:
        if type(bn) is not keras.layers.BatchNormalization:
            continue
        axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
        rank = len(bn.input.shape)
        layer = _producer(bn)
        if (layer is None or type(layer) not in FOLDABLE or list(axis) not in ([-1], [rank - 1])
                or keras.activations.serialize(layer.activation) != "linear" or len(layer._outbound_nodes) != 1):
            continue
        pairs.append((layer, bn))
    return pairs


def folded_weights(layer, bn) -> Tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of `layer` with the batch norm `bn` folded in."""
    kernel = getattr(layer, kernel_name(layer)).numpy()
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    bias = layer.bias.numpy() if layer.use_bias else np.zeros_like(mean)
    gamma = bn.gamma.numpy() if bn.scale else np.ones_like(mean)
    beta = bn.beta.numpy() if bn.center else np.zeros_like(mean)
    s = (gamma / np.sqrt(var + bn.epsilon)).astype(np.float32)
    scaled = kernel * (s.reshape(kernel.shape[-2:]) if isinstance(layer, keras.layers.DepthwiseConv2D) else s)
    return scaled.astype(np.float32), ((bias - mean) * s + beta).astype(np.float32)


def fold_batch_norms(model):
    """(model with every foldable BatchNormalization folded, names of the folded batch norms). The
    model is returned as it is when there is nothing to fold; a folded layer keeps its name and gets a
    bias. Models whose layers are called more than once are refused."""
    pairs = foldable_pairs(model)
    if not pairs:
        return model, []
    shared = [l.name for l in model.layers if len(l._inbound_nodes) > 1]
    if shared or len(model.inputs) != 1:
        raise ConfigError(f"cannot fold batch norms of model '{model.name}': layers {shared} are called more than "
                          "once (expected each layer called once, one input)")
    folded = {id(layer): bn for layer, bn in pairs}
    skipped = {id(bn) for _, bn in pairs}
    inputs = keras.Input(batch_shape=model.inputs[0].shape, name=model.inputs[0].name.split(":")[0])
    tensors = {id(model.inputs[0]): inputs}
    new_layers = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        source = tf.nest.map_structure(lambda t: tensors[id(t)], layer.input)
        if id(layer) in skipped:
            tensors[id(layer.output)] = source
            continue
        config = layer.get_config()
        if id(layer) in folded:
            config["use_bias"] = True
        clone = layer.__class__.from_config(config)
        tensors[id(layer.output)] = clone(source)
        new_layers[id(layer)] = clone
    out = keras.Model(inputs, tf.nest.map_structure(lambda t: tensors[id(t)], model.outputs), name=model.name)
    for layer in model.layers:
        clone = new_layers.get(id(layer))
        if clone is None:
            continue
        if id(layer) in folded:
            kernel, bias = folded_weights(layer, folded[id(layer)])
            getattr(clone, kernel_name(clone)).assign(kernel)
            clone.bias.assign(bias)
        elif layer.weights:
            clone.set_weights(layer.get_weights())
    return out, [bn.name for _, bn in pairs]
