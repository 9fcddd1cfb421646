"""Aggregate a sweep: collect every run's summary under the given folders, write a CSV and a markdown
table (mean ± sd over seeds per method x bits) and the accuracy-vs-bits figure (PNG + PDF), and
optionally log them to W&B.

    python sweeps/aggregate.py multirun/2026-11-23/12-00-00 [more folders] [--out DIR] [--wandb offline]
"""
import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from omegaconf import OmegaConf  # noqa: E402

from qat.aggregate import collect, figure, markdown, table, write_csv  # noqa: E402
from qat.tracking import LoggerSpec, start_run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", help="multirun / run folders to search for summary.json")
    p.add_argument("--out", help="where to write results (default: the first folder)")
    p.add_argument("--metric", default="quant/test_acc", choices=["quant/test_acc", "quant/degradation"])
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], default="disabled",
                   help="also log the table and figure as a W&B run")
    args = p.parse_args()
    try:
        found = collect(args.roots)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not found.runs:
        print(f"error: no finished run (summary.json) under {', '.join(args.roots)}; "
              f"{len(found.incomplete)} incomplete", file=sys.stderr)
        return 2
    out = Path(args.out or args.roots[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = table(found.runs)
    write_csv(found.runs, out / "runs.csv")
    md = markdown(rows, found.incomplete)
    (out / "table.md").write_text(md)
    pictures = figure(rows, out / "accuracy_vs_bits", args.metric)
    print(md)
    print(f"{len(found.runs)} runs, {len(found.incomplete)} incomplete -> {out / 'runs.csv'}, {out / 'table.md'}, "
          + ", ".join(str(p) for p in pictures))
    if args.wandb != "disabled":
        logger = {**OmegaConf.to_container(OmegaConf.load(CONF / "logger" / "wandb.yaml")),
                  "mode": args.wandb, "job_type": "aggregate", "tags": []}
        tracker = start_run(LoggerSpec.from_config(logger), str(out), {"roots": args.roots})
        tracker.image("sweep/accuracy_vs_bits", str(pictures[0]))
        cols = [k for k in rows[0] if k != "seeds"]
        tracker.table("sweep/table", cols, [[r[c] for c in cols] for r in rows])
        tracker.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
