"""`qat_tfmot`: QAT through tfmot's `quantize_apply` with the project's n-bit QuantizeConfigs
(qat.layers.tfmot), for comparison with tfmot's own machinery. tfmot cannot quantize the recurrent
state, learn step sizes or lower bits progressively; those options are refused when the config is
read."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from qat.algorithms.predict import PREDICT_MARGINS_FILE, predict_run_model
from qat.algorithms.report import max_levels
from qat.data.augment import training_data
from qat.errors import ConfigError
from qat.layers.tfmot import tfmot_quantize
from qat.recipes.base import BitWidths, Recipe, RecipeContext, RecipeResult, register
from qat.recipes.qat import QatOptions
from qat.training.fit import fit, set_seed
from qat.training.models import ModelSpec


class QatTfmot(Recipe):
    options_type = QatOptions

    def check(self, opts: QatOptions, bits: BitWidths) -> None:
        super().check(opts, bits)
        unsupported = {"state_bits": bits.state_bits, "quant.progressive_bits": list(opts.progressive_bits) or None,
                       "quant.learned": opts.learned or None, "quant.integer": opts.integer or None, "quant.freeze_ranges_after": opts.freeze_ranges_after,
                       "quant.scale_bits": opts.scale_bits, "quant.tensor_bits": opts.tensor_bits,
                       "quant.gate_bits": opts.gate_bits, "quant.hidden_bits": opts.hidden_bits}
        for name, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"{name}={value} is not allowed with quant.method={self.name}: tfmot cannot do it "
                                  "(use quant=qat or quant=qat_lsq)")

    def check_model(self, model: ModelSpec, options) -> None:
        if model.bidirectional:
            raise ConfigError(f"model.bidirectional=true is not allowed with quant.method={self.name}: tfmot has no "
                              "QuantizeConfig for Bidirectional (use quant=qat or quant=qat_lsq)")

    def run(self, ctx: RecipeContext, opts: QatOptions) -> RecipeResult:
        model, feats, bits = ctx.float_model, ctx.feats, ctx.bits
        set_seed(ctx.seed)
        qmodel = tfmot_quantize(model, bits.bits, bits.act_bits, per_channel=opts.granularity == "per_channel",
                                symmetric=opts.scheme == "symmetric", narrow_range=opts.narrow_range)
        train_data, steps, _ = training_data(None, None, ctx.trainer, feats, ctx.seed)
        epochs, learning_rate, learning_rate_key = opts.schedule(bits)
        result = fit(qmodel, feats.x["train"], feats.y["train"], feats.x["val"], feats.y["val"], ctx.trainer,
                     epochs=epochs, learning_rate=learning_rate, what="QAT fine-tuning",
                     learning_rate_key=learning_rate_key, verbose=ctx.verbose, train_data=train_data,
                     steps_per_epoch=steps, **opts.fit_kwargs(model),
                     on_epoch=lambda e, logs: ctx.tracker.log({f"qat/train/{k}": v for k, v in logs.items()} |
                                                              {"qat/epoch": e + 1}))
        summary: Dict[str, Any] = {"qat/epochs": result["epochs"], "qat/sec_per_epoch": result["sec_per_epoch"]}
        levels_ok, n_bits = True, 0
        for layer in qmodel.layers:
            for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
                wq = quantizer(weight, False, weights=qvars).numpy()
                levels = max_levels(wq, opts.granularity == "per_channel")
                name = weight.name.split(":")[0].replace("/lstm_cell", "").replace("/gru_cell", "")
                summary[f"quant/weights/{name}/levels"] = levels
                summary[f"quant/weights/{name}/mse"] = float(np.mean((wq - weight.numpy()) ** 2))
                levels_ok &= levels <= 2 ** bits.bits
                n_bits += wq.size
        n_float = sum(int(np.prod(w.shape)) for w in model.weights) - n_bits
        summary["quant/levels_ok"] = bool(levels_ok)
        # tfmot keeps float shadow weights: the deployable size is b bits per quantized weight, float32 biases.
        summary["quant/size_bytes"] = int(np.ceil(n_bits * bits.bits / 8) + 4 * n_float)
        summary.update(predict_run_model(model, qmodel, feats, opts.quant_config(bits), ctx.predict, ctx.seed,
                                         self.validated, str(ctx.run_dir / PREDICT_MARGINS_FILE)))
        return RecipeResult(qmodel, summary)


register(QatTfmot("qat_tfmot"))
