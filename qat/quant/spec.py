"""How one tensor is quantized: `QuantSpec` (bit-width, scheme, granularity, range estimator).

Affine quantization with b bits (the study's formula, generalised):

    scale = (hi - lo) / (qmax - qmin)        zero_point = qmin + round(-lo / scale)
    q     = clip(round(x / scale + zero_point), qmin, qmax)
    x_hat = scale * (q - zero_point)

asymmetric: [qmin, qmax] = [0, 2^b - 1]; symmetric: zero_point = 0, scale = max(|lo|, |hi|) / qmax,
[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1], or [-(2^(b-1) - 1), 2^(b-1) - 1] with narrow_range.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from qat.checks import Bits, Checked, Flag, Integer, Number, OneOf, setting
from qat.errors import ConfigError
from qat.quant.scale_codes import SCALE_BITS

SCHEMES = ("asymmetric", "symmetric")
GRANULARITIES = ("per_tensor", "per_channel")
ESTIMATORS = ("minmax", "percentile", "mse")

SCHEME = OneOf(SCHEMES)
GRANULARITY = OneOf(GRANULARITIES)
ESTIMATOR = OneOf(ESTIMATORS)
PERCENTILE = Number(50, 100, low_open=True)


@dataclass(frozen=True)
class QuantSpec(Checked):
    """How one tensor is quantized: bit-width, scheme, granularity and range estimator."""

    bits: int = setting(Bits())
    scheme: str = setting(SCHEME, default="asymmetric")
    granularity: str = setting(GRANULARITY, default="per_tensor")
    axis: int = setting(Integer(), default=-1)   # channel axis for per_channel (kernels: -1 = output unit)
    estimator: str = setting(ESTIMATOR, default="minmax")
    percentile: float = setting(PERCENTILE, default=99.99)   # estimator="percentile": keep [100-p, p]
    narrow_range: bool = setting(Flag(), default=False)      # symmetric only: [-(2^(b-1)-1), 2^(b-1)-1]
    scale_bits: Optional[int] = setting(SCALE_BITS, default=None)   # weights: scales as k-bit codes (None: float32)

    def check(self) -> None:
        if self.narrow_range and self.scheme != "symmetric":
            raise ConfigError("narrow_range=True is not allowed with scheme='asymmetric': it needs scheme='symmetric'")

    @property
    def qmin(self) -> int:
        if self.scheme == "asymmetric":
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if self.scheme == "asymmetric" else 2 ** (self.bits - 1) - 1

    def packed_bytes(self, values: int, groups: int) -> int:
        """Bytes of a tensor of `values` in `groups` quantization groups in a packed file
        (qat.export.packed), at most: codes at `bits`, a scale per group at `scale_bits` (float32 where
        None) and, asymmetric, a zero point per group at no more than `bits` (the file stores them at
        the width their spread needs)."""
        zero_points = 0 if self.scheme == "symmetric" else -(-groups * self.bits // 8)
        scales = 4 * groups if self.scale_bits is None else -(-groups * self.scale_bits // 8)
        return -(-values * self.bits // 8) + scales + zero_points

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any, owner: str = "") -> "QuantSpec":
        """Accept a QuantSpec, a dict of its fields, or None (no quantization)."""
        if config is None or isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"quantization spec {config!r} is not allowed: expected a QuantSpec, a dict or None")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"quantization spec key(s) {unknown} are not allowed: "
                              f"expected {', '.join(cls.__dataclass_fields__)}")
        return cls(**config)
