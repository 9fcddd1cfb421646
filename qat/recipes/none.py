"""`quant=none`: the float model is the result (its weights are 32-bit floats)."""
from __future__ import annotations

from qat.recipes.base import Recipe, RecipeContext, RecipeResult, register


class FloatOnly(Recipe):
    def run(self, ctx: RecipeContext, options) -> RecipeResult:
        return RecipeResult(ctx.float_model, {"bits": 32})


register(FloatOnly("none"))
