"""Random input sequences for the recurrent-layer tests: batch B of T frames of F features, U units."""
import numpy as np

T, F, U, B = 12, 10, 8, 5


def sequences(seed=0, shape=(B, T, F)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_ranges(layer, granularity: str, seed: int = 5) -> dict:
    """Set every activation quantizer of a quantized recurrent layer to a random range around zero
    (one per channel with per_channel); returns {name: (lo, hi)}."""
    rng = np.random.default_rng(seed)
    ranges = {}
    for name, aq in layer.activation_quantizers.items():
        n = F if name == "input" else U
        lo = -rng.uniform(0.5, 1.5, size=n if granularity == "per_channel" else ()).astype(np.float32)
        hi = rng.uniform(0.5, 1.5, size=lo.shape).astype(np.float32)
        aq.set_range(lo, hi)
        ranges[name] = (lo, hi)
    return ranges
