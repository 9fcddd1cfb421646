"""TFLite's own post-training modes (`tflite_dynamic`, `tflite_float16`, `tflite_int8`): the float
model converted by the TFLite converter and evaluated through the stock interpreter, clip by clip.
`bits` in the summary is what the mode stores weights in."""
from __future__ import annotations

import dataclasses

import numpy as np

from qat.algorithms.calibration import calibration_clips
from qat.checks import Checked, Flag, Integer, setting
from qat.export.tflite import tflite_model
from qat.io import write_bytes
from qat.recipes.base import Recipe, RecipeContext, RecipeResult, register


@dataclasses.dataclass(frozen=True)
class TfliteOptions(Checked):
    section = "quant"

    latency_clips: int = setting(Integer(1))   # validation clips whose interpreter latency is measured


@dataclasses.dataclass(frozen=True)
class TfliteInt8Options(TfliteOptions):
    representative_size: int = setting(Integer(1))   # training clips of the converter's calibration
    int8_io: bool = setting(Flag())                  # int8 input and output tensors too


class Tflite(Recipe):
    def __init__(self, name: str, mode: str, weight_bits: int, options_type=TfliteOptions):
        super().__init__(name)
        self.mode, self.weight_bits, self.options_type = mode, weight_bits, options_type

    def run(self, ctx: RecipeContext, opts: TfliteOptions) -> RecipeResult:
        int8_io = getattr(opts, "int8_io", False)
        representative = calibration_clips(ctx.feats.x["train"], opts.representative_size, ctx.seed) \
            if isinstance(opts, TfliteInt8Options) else None
        tflite, info = tflite_model(ctx.float_model, self.mode, representative, int8_io)
        path = ctx.run_dir / f"model_{self.mode}.tflite"
        write_bytes(path, tflite.flatbuffer)
        tflite.predict(ctx.feats.x["val"][:opts.latency_clips])
        return RecipeResult(tflite, {"bits": self.weight_bits, "quant/size_bytes": info["size_bytes"],
                                     "quant/convert_s": info["convert_s"],
                                     "quant/latency_ms": float(np.median(tflite.latencies_ms)),
                                     "quant/int8_io": int8_io}, {"tflite": path})


register(Tflite("tflite_dynamic", "dynamic", 8))
register(Tflite("tflite_float16", "float16", 16))
register(Tflite("tflite_int8", "int8", 8, TfliteInt8Options))
