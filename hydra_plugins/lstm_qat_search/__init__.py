"""Hydra's Optuna sweeper for conf/hparams_search/, ending a search in which every trial failed with
the list of failed jobs and exit code 1 instead of Optuna's "No trials are completed yet" traceback.
A Hydra plugin must live in the `hydra_plugins` namespace (Hydra refuses a sweeper from elsewhere);
it imports only what the plugin scan of every Hydra start can afford (no TensorFlow)."""
import sys
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from qat.io import list_failed_jobs


class OptunaSearch(OptunaSweeper):
    def sweep(self, arguments):
        try:
            return super().sweep(arguments)
        except ValueError as e:
            if "No trials are completed" not in str(e):
                raise
            print("error: every trial of the search failed", file=sys.stderr)
            list_failed_jobs(Path(str(self.sweeper.config.hydra.sweep.dir)))
            sys.exit(1)
