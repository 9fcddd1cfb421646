"""Quantization recipes, one module each, registered by name (`quant.method`) in
qat.recipes.base.RECIPES: `none`, `ptq` (ptq, ptq_seed), `tflite` (tflite_dynamic, tflite_float16,
tflite_int8), `tflite_trained` (ptq_tflite, qat_tflite), `qat` (qat, qat_lsq), `qat_tfmot`. Importing this package registers them all."""
from qat.recipes import none, ptq, qat, qat_tfmot, tflite, tflite_trained  # noqa: F401  (each module registers its recipes)
