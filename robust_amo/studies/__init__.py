"""Paper reproductions as studies: a YAML file per table or figure, run cell by cell as ordinary
training runs, summarised as results.csv, table.md and a plot (``robust-amo reproduce``).
docs/reproductions.md."""

from .results import RunState, select, write_results
from .runner import Options, estimate_s, plan, run_study
from .spec import (
    StudySpec,
    expand,
    find_study,
    list_study_files,
    load_study,
    parse_only,
)

__all__ = ["Options", "RunState", "StudySpec", "estimate_s", "expand", "find_study",
           "list_study_files", "load_study", "parse_only", "plan", "run_study", "select",
           "write_results"]
