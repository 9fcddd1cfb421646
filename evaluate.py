"""Re-evaluate a finished train.py run: reload its float model and config, run its recipe (or the
one given here, at any bit-width), print and log the same figures. The run folder is only read;
results go to this command's own output folder.

    python evaluate.py run_dir=outputs/2026-11-23/12-00-00-none-b4-s0
    python evaluate.py run_dir=... quant=ptq bits=3
    python evaluate.py run_dir=... predict_only=true [max_drop=1.0] [verify=false]
    python evaluate.py run_dir=... export=c      # an integer-mode run (quant.integer=true) as C99

`predict_only=true` prints the predicted drop for bits 2..8, per tensor and per channel, from the
run's float model and labelled validation clips (qat.algorithms.predict; seconds, nothing quantized
is run); `max_drop=<points>` adds two mixed-precision configs under that predicted drop: bits per
weight tensor, and bits per weight tensor and per activation part (layer inputs, gates, cell state,
hidden state; qat.algorithms.proposal, about a minute: each part is measured at each bit-width),
each verified by an actual PTQ evaluation on the test split unless verify=false.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("LSTM_QAT_REPO", os.path.dirname(os.path.abspath(__file__)))

from qat.runtime import start_tensorflow_quietly  # noqa: E402

start_tensorflow_quietly()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qat.config import job, logger_spec, proposal_commands, quant_preset, run_spec, saved_config  # noqa: E402
from qat.errors import ConfigError  # noqa: E402
from qat.experiment import export_saved_run, load_run, predict_saved_run, run_experiment  # noqa: E402
from qat.tracking import start_run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@job
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("run_dir is missing: expected run_dir=<the output folder of a train.py run>")
    saved = load_run(cfg.run_dir)
    config = saved_config(cfg.run_dir)
    config["predict"] = OmegaConf.to_container(cfg.predict, resolve=True)
    config["verbose"] = cfg.verbose
    if cfg.get("quant") is not None:
        config["quant"] = OmegaConf.to_container(cfg.quant, resolve=True)
    for key in ("bits", "act_bits", "state_bits"):
        if cfg.get(key) is not None:
            config[key] = cfg[key]
    preset = quant_preset() if cfg.get("quant") is not None else saved.get("preset", saved["method"])
    spec = run_spec(config, preset)
    if cfg.predict_only:
        report, r = predict_saved_run(spec, cfg.run_dir, cfg.max_drop, cfg.verify)
        print(report + proposal_commands(cfg.run_dir, r))
        return
    if cfg.export is not None:
        r = export_saved_run(spec, cfg.run_dir, cfg.export)
        print(f"C export in {os.path.join(cfg.run_dir, 'c')}: agreement with the numpy reference {r['agreement']}, "
              f"{r['weight_bytes']} B flash, {r['ram_bytes']} B RAM, {r['macs_per_clip']} MACs, "
              f"{r['us_per_clip']} us per clip (TFLite int8 interpreter: {r['tflite_int8_us_per_clip']:.1f} us)")
        return
    out_dir = HydraConfig.get().runtime.output_dir
    # The run's own W&B project / group / tags, so the evaluation sits next to it; mode from here.
    logger = {**config["logger"], "mode": cfg.logger.mode, "job_type": "evaluate"}
    logger = logger_spec({"logger": logger}).for_run(spec.recipe.preset, spec.recipe.bits.bits, spec.data.name)
    tracker = start_run(logger, out_dir, {**config, "preset": spec.recipe.preset, "source_run": cfg.run_dir},
                        name=f"eval-{os.path.basename(os.path.normpath(cfg.run_dir))}")
    with tracker.scope():
        s = run_experiment(spec, out_dir, tracker, float_from=cfg.run_dir)
    print(f"run {cfg.run_dir} ({saved.get('preset', saved['method'])} bits={saved['bits']}): saved float acc "
          f"{100 * saved['float/test_acc']:.2f}%, saved quant acc {100 * saved['quant/test_acc']:.2f}%")
    print(f"re-evaluated ({s['preset']} bits={s['bits']}): float acc {100 * s['float/test_acc']:.2f}% "
          f"| quant acc {100 * s['quant/test_acc']:.2f}% | degradation {s['quant/degradation']:+.2f} pts | {out_dir}")


if __name__ == "__main__":
    main()
