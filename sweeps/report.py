"""Create the W&B Report of a sweep (qat.sweep_report): accuracy, degradation and size against bits,
one curve per recipe preset with seed spread, from the runs of one W&B group.

    python sweeps/report.py <entity>/<project> --group ptq_vs_qat_fsdd          # saves it, prints its URL
    python sweeps/report.py <entity>/<project> --group ptq_vs_qat_fsdd --offline --out report.json

Online needs `wandb login` and the synced runs (`wandb sync <run dir>/wandb/offline-run-*`). With
--offline the report object is built without a network and its definition written to --out.
"""
import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from qat.errors import UserError  # noqa: E402
from qat.io import write_json  # noqa: E402
from qat.sweep_report import ReportSpec, build_report, definition  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="<entity>/<project> holding the sweep's runs")
    p.add_argument("--group", help="the W&B run group of the sweep (logger.group); default: every run of the project")
    p.add_argument("--preset", action="append", default=[], help="only this recipe preset (repeatable)")
    p.add_argument("--title", help="report title (default: named after the group)")
    p.add_argument("--offline", action="store_true", help="build the report without a network; needs --out")
    p.add_argument("--out", help="write the report's definition (JSON) to this file")
    args = p.parse_args()
    entity, _, project = args.path.partition("/")
    try:
        if args.offline and not args.out:
            raise UserError("--offline needs --out FILE: where to write the report's definition")
        if not project or "/" in project:
            raise UserError(f"path={args.path!r} is not allowed: expected <entity>/<project>")
        report = build_report(ReportSpec(entity, project, args.group, tuple(args.preset), args.title))
        if args.out:
            write_json(Path(args.out), definition(report))
            print(f"report definition -> {args.out}")
        if not args.offline:
            report.save()
            print(f"report -> {report.url}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # W&B: not logged in, no network, unknown project
        print(f"error: could not save the report to W&B ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"log in with `wandb login`, or build it with --offline --out FILE", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
