"""Train the float model (or reuse its cached checkpoint), run the configured quantization recipe,
evaluate both and log the run to W&B.

    python train.py                                   # default config
    python train.py quant=qat bits=3
    python train.py -m quant=ptq,qat bits=2,3,4,8 seed=0,1,2
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("LSTM_QAT_REPO", os.path.dirname(os.path.abspath(__file__)))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qat.config import job, logger_spec, quant_preset, run_spec  # noqa: E402
from qat.experiment import run_experiment  # noqa: E402
from qat.tracking import start_run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@job
def main(cfg: DictConfig) -> float:
    config = OmegaConf.to_container(cfg, resolve=True)
    spec = run_spec(config, quant_preset())
    run_dir = HydraConfig.get().runtime.output_dir
    logger = logger_spec(config).for_run(spec.recipe.preset, spec.recipe.bits.bits, spec.data.name)
    tracker = start_run(logger, run_dir, {**config, "preset": spec.recipe.preset}, name=os.path.basename(run_dir))
    with tracker.scope():
        s = run_experiment(spec, run_dir, tracker)
    print(f"[{s['preset']} bits={s['bits']} seed={s['seed']} {s['task']}] float acc {100 * s['float/test_acc']:.2f}% "
          f"| quant acc {100 * s['quant/test_acc']:.2f}% | degradation {s['quant/degradation']:+.2f} pts "
          f"| {s['time/total_s']:.0f}s | {run_dir}")
    return s["quant/val_acc"]      # what a Hydra sweeper optimises: validation, never test


if __name__ == "__main__":
    main()
