"""``python -m robust_amo.worker REQUEST.json``: run one job a study runner asked for.

The runner writes a typed request (:mod:`robust_amo.jobs`) into the run folder and starts this
module as its own process, so jobs run in parallel and a SIGTERM stops one cleanly. The worker
reads the request, logs as the ``robust-amo`` command does, calls the library (``train``,
``evaluate_checkpoint``: no command line in between) and exits as the command would: 0 when
done, 2 with one line for an error the user can fix (:class:`robust_amo.errors.RobustAmoError`),
130 on SIGINT or SIGTERM.

Each kind of request has one function here, listed in :data:`HANDLERS`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RobustAmoError
from .evaluation import evaluate_checkpoint
from .evaluation.report import markdown
from .jobs import EvalJobRequest, Request, TrainRequest, read_request
from .resolve import resolve
from .runtime import sigterm_as_interrupt
from .train import train

log = logging.getLogger(__name__)

INTERRUPTED = 130
"""Exit status after SIGINT or SIGTERM (as a shell reports a process ended by Ctrl-C)."""
USER_ERROR = 2
"""Exit status after an error the user can fix."""


def run_train(request: TrainRequest) -> None:
    """Resolve the request's config with its device and data folder, and train."""
    override: dict[str, Any] = {"device": request.device}
    if request.data_dir is not None:
        override["data"] = {"data_dir": request.data_dir}
    cfg = resolve(request.config, [override])
    metrics = train(cfg, resume=request.resume, progress=request.progress)
    log.info("done: run folder %s; last epoch %s", cfg.out, metrics)


def run_eval(request: EvalJobRequest) -> None:
    """Evaluate the checkpoint (:func:`robust_amo.evaluation.evaluate_checkpoint`, which
    checks the request's fields) and log the report's table, as ``robust-amo eval`` prints it."""
    report = evaluate_checkpoint(request.evaluation)
    log.info("done: clean accuracy %.4f, robust accuracy %.4f\n%s", report.clean_accuracy,
             report.robust_accuracy, markdown(report))


HANDLERS: dict[type, Callable[[Any], None]] = {TrainRequest: run_train, EvalJobRequest: run_eval}
"""The function that runs each kind of request."""


def configure_logging(verbose: bool = False) -> None:
    """The ``robust-amo`` command's logging: warnings from everyone, info from robust_amo."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("robust_amo").setLevel(logging.DEBUG if verbose else logging.INFO)


def run(request: Request) -> None:
    """Run one request in this process."""
    HANDLERS[type(request)](request)


def main(argv: Sequence[str] | None = None) -> int:
    """Read the request file named by the one argument and run it; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if len(args) != 1:
        log.error("usage: python -m robust_amo.worker REQUEST.json")
        return USER_ERROR
    try:
        with sigterm_as_interrupt():
            run(read_request(args[0]))
    except RobustAmoError as e:
        log.error("%s", e)
        return USER_ERROR
    except KeyboardInterrupt:
        log.error("interrupted; to continue, run the request again with \"resume\": true (a "
                  "study runner does so by itself)")
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
