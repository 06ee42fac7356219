"""Run a study: every job is a worker process (``python -m robust_amo.worker``) given a typed
request (:mod:`robust_amo.jobs`): a :class:`~robust_amo.jobs.TrainRequest` training each run in
its own run folder, then an :class:`~robust_amo.jobs.EvalJobRequest` (an
:class:`~robust_amo.evaluation.EvalRequest`) evaluating each cell's selected runs; results are
rewritten after every finished job. No command line of ``robust-amo`` is spelt here.

Finished runs (all epochs in metrics.jsonl) and finished evaluations (a report) are skipped; a
run with a checkpoint or metrics, and an evaluation with a state file, are continued (the
requests' ``resume``), so a killed study resumes where it stopped. ``workers`` processes run at
once, each limited to ``threads`` CPU threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), so N
workers do not oversubscribe the cores.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from robust_amo.config import HeldOutSplit, TrainConfig, check_at_least, check_int, save_yaml
from robust_amo.data import dataset_info, load_dataset
from robust_amo.errors import ConfigError, DataError, OutputError
from robust_amo.evaluation import EvalRequest
from robust_amo.jobs import EvalJobRequest, Request, TrainRequest, write_request
from robust_amo.outputs import folder_lock, lock_holder, writable_dir
from robust_amo.runs import RunDir
from robust_amo.runtime import die_with_parent, sigterm_as_interrupt, stop_group

from .results import REPORT, RunState, Selection, metric_source, refresh, write_results
from .spec import EvalSpec, Grid, Run, StudySpec, base_config, expand, resolve_run, train_numbers

log = logging.getLogger(__name__)

CELL_CONFIG = "cell.yaml"
"""The resolved config the runner writes into a run folder and trains with."""
WORKER = "robust_amo.worker"
"""The module a job's process runs with its request file."""
ORPHAN_WAIT_S = 30.0
"""How long a runner waits for a job left running by an earlier runner to end (it got
SIGTERM when that runner died, and may still be saving) before it reports the process."""
STOP_WAIT_S = 30.0
"""How long a stopping runner waits for its jobs after SIGTERM before it kills them."""


@dataclass
class Options:
    """How to run a study (the ``robust-amo reproduce`` flags)."""

    out: Path
    grid: Grid = "quick"
    seeds: list[int] | None = None
    only: dict[str, set[str]] | None = None
    select: HeldOutSplit | None = None
    sets: list[dict[str, Any]] = field(default_factory=list)
    workers: int = 1
    threads: int | None = None
    device: str = "auto"
    data_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_at_least("workers", self.workers)
        check_at_least("threads", self.threads)
        for s in self.seeds or []:
            check_int("seeds", s)


@dataclass
class Job:
    """One worker process to start: training a run or evaluating it."""

    state: RunState
    request: Request
    """What the worker runs, written to :attr:`request_path` as it starts."""

    @property
    def kind(self) -> str:
        """``train`` or ``eval``: the request's kind."""
        return self.request.KIND

    @property
    def log_path(self) -> Path:
        """RUN/KIND.log: the output of every start of the job, appended."""
        return self.state.folder / f"{self.kind}.log"

    @property
    def request_path(self) -> Path:
        """RUN/KIND-request.json: the request of the job's latest start."""
        return self.state.folder / f"{self.kind}-request.json"

    @property
    def argv(self) -> list[str]:
        """The worker's command line: this Python, the worker module, the request file."""
        return [sys.executable, "-m", WORKER, str(self.request_path)]

    def describe(self) -> str:
        """What the job runs, in one line (``--dry-run``): its kind and the request's fields
        (an evaluation's own fields in place of their dict), those left unset (None) omitted."""
        fields = dataclasses.asdict(self.request)
        if isinstance(self.request, EvalJobRequest):
            fields = fields["evaluation"]
        return " ".join([self.kind, *(f"{k}={v}" for k, v in fields.items() if v is not None)])


def plan(spec: StudySpec, opts: Options) -> list[RunState]:
    """The study's runs with their resolved configs and folders (nothing is written).

    Every run's config is checked here, before anything starts: the base file is read once,
    and the runs of one cell and grid point, which differ only in their seed and folder, are
    resolved once.

    Raises:
        RobustAmoError: a config error of a run, naming the study file, the cell and the
            grid point; a metric that ``select`` cannot measure; an ``only`` that leaves no
            run.
    """
    select = opts.select or spec.select.split
    root = opts.out / ("runs" if select == "test" else "runs-val")
    runs: list[Run] = expand(spec, opts.grid, opts.seeds, opts.only, select, opts.sets)
    if not runs:
        raise ConfigError("only leaves no run of the study", params=("only",))
    for m in spec.metrics:
        metric_source(m, select)  # fails early for a metric --select val cannot measure
    base = base_config(spec)
    resolved: dict[tuple[tuple[str, ...], tuple[tuple[str, Any], ...]], TrainConfig] = {}
    states = []
    for r in runs:
        folder = r.folder(root)
        key = (r.cell, r.point)
        if key not in resolved:
            resolved[key] = resolve_run(spec, r, folder, base)
        # the seed and the folder are the runs' last overrides (the seed a checked int):
        # nothing else differs; the configs share their unchanged sections, which nothing
        # mutates
        cfg = dataclasses.replace(resolved[key], seed=r.seed, out=str(folder))
        states.append(refresh(RunState(r, folder, cfg), spec.select.by))
    return states


def list_estimate(spec: StudySpec, grid: Grid,
                  base: dict[str, Any] | None = None) -> tuple[int, float]:
    """The number of runs of the whole study on ``grid`` and the seconds they would take on
    the study's cost device, from the study file alone (no config is resolved and no run
    folder read: what ``--list`` shows); ``base``: the study's :func:`base_config`, when read
    already."""
    runs = expand(spec, grid)
    base = base_config(spec) if base is None else base
    c = spec.cost
    total = 0.0
    for r in runs:
        epochs, subset = train_numbers(base, r)
        total += epochs * c.epoch_s * _scale(c.reference_examples, subset) * r.cost
    if eval_spec(spec, spec.select.split) is not None:
        total += len({r.cell for r in runs}) * max(1, len({r.seed for r in runs})) * c.eval_s
    return len(runs), total


def _scale(reference: int | None, subset: int | None) -> float:
    """How much longer than the cost's reference an epoch of ``subset`` examples takes."""
    return subset / reference if reference and subset else 1.0


def check_data(states: list[RunState], data_dir: str | None = None) -> None:
    """The data every run reads is there: each run's data folder (``data_dir`` when given,
    else its config's ``data.data_dir``) exists, and a dataset read from files has one.

    Checked before the first run (and by ``--dry-run``), so a missing folder is one line
    rather than a failure of every run.

    Raises:
        DataError: naming the folder, the dataset, how many runs read it and the fix.
    """
    needs: dict[tuple[str, str | None, int | None], int] = {}
    for s in states:
        key = (s.cfg.dataset, data_dir or s.cfg.data.data_dir, s.cfg.data.image_size)
        needs[key] = needs.get(key, 0) + 1
    for (dataset, folder, image_size), n in needs.items():
        if folder is not None:
            where = Path(folder).expanduser()
            if not where.exists():
                raise DataError(f"data_dir {where} does not exist ({dataset}, read by {n} "
                                "runs); give the folder that holds the dataset's files",
                                params=("data_dir",))
            dataset_info(dataset, where, image_size)  # an image folder's classes
        else:
            # a dataset of files refuses at once without a folder; a bundled one loads
            load_dataset(dataset, None, image_size=image_size)


def eval_spec(spec: StudySpec, select: HeldOutSplit) -> EvalSpec | None:
    """The study's eval step; under ``val`` at least the clean test accuracy."""
    if spec.eval is not None:
        return spec.eval
    if select == "val":
        return EvalSpec(attacks=["clean"], n_examples=None)
    return None


def train_job(state: RunState, opts: Options) -> Job:
    """A worker training the run from RUN/cell.yaml, resuming when the folder holds a run."""
    request = TrainRequest(config=str(state.folder / CELL_CONFIG),
                           resume=RunDir(state.folder).holds_run(), device=opts.device,
                           data_dir=opts.data_dir, progress=False)
    return Job(state, request)


def eval_request(state: RunState, spec: StudySpec, opts: Options) -> EvalRequest:
    """The evaluation of the run's checkpoint on the test split into RUN/eval/study.json,
    resuming when an interrupted one left its state file."""
    ev = eval_spec(spec, opts.select or spec.select.split)
    if ev is None:
        raise ConfigError(f"study {spec.name!r} has no eval step")
    out = state.folder / REPORT
    return EvalRequest(
        checkpoint=str(state.folder), which=ev.which, split="test", out=str(out),
        batch_size=ev.batch_size, n_examples=ev.n_examples, device=opts.device,
        data_dir=opts.data_dir, progress=False,
        # a study file may comma-separate attacks, as the eval command reads them
        attacks=[a for v in ev.attacks for a in v.split(",")],
        # the large-eps check is about attacks
        sanity=not all(a == "clean" for a in ev.attacks),
        resume=out.with_suffix(".state.pt").exists())


def eval_job(state: RunState, spec: StudySpec, opts: Options) -> Job:
    """A worker evaluating the run (:func:`eval_request`)."""
    return Job(state, EvalJobRequest(eval_request(state, spec, opts).to_dict()))


def check_out(out: Path, spec: StudySpec) -> None:
    """The study's output folder: writable, and not another study's (``study.json``)."""
    writable_dir(out)
    marker = out / "study.json"
    if marker.is_file():
        try:
            name = json.loads(marker.read_text()).get("name")
        except (json.JSONDecodeError, AttributeError):
            name = None
        if name != spec.name:
            raise OutputError(f"{out} holds the results of study {name!r}, not {spec.name!r}; "
                              "choose another out", params=("out",))
    else:
        marker.write_text(json.dumps({"name": spec.name, "study_file": spec.path}) + "\n")


def estimate_s(spec: StudySpec, states: list[RunState], eval_runs: int | None = None) -> float:
    """Seconds the runs not yet done would take on the study's cost device (a rough guide)."""
    c = spec.cost
    total = 0.0
    for s in states:
        left = max(0, s.cfg.epochs - s.epochs_done)
        total += left * c.epoch_s * _scale(c.reference_examples, s.cfg.data.train_subset) \
            * s.run.cost
    if eval_runs is None:
        n_cells = len({s.run.cell_key for s in states})
        eval_runs = n_cells * max(1, len({s.run.seed for s in states}))
    if eval_spec(spec, spec.select.split) is not None:
        total += eval_runs * c.eval_s
    return total


def describe(spec: StudySpec, states: list[RunState], opts: Options) -> str:
    """The header of table.md: study, paper, grid, seeds, machine."""
    seeds = sorted({s.run.seed for s in states})
    return (f"Study `{spec.name}` ({spec.path}); paper: {spec.paper or 'none'}. "
            f"Grid `{opts.grid}`, seeds {seeds}, {len(states)} runs; results of "
            f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")


def wait_for_orphans(states: list[RunState], timeout_s: float = ORPHAN_WAIT_S) -> None:
    """Wait until no run folder of ``states`` is held by another process (a job an earlier
    runner left behind stops on its own once that runner died), at most ``timeout_s``.

    Raises:
        OutputError: a folder still held then, naming the folder, the pid and the fix.
    """
    deadline = time.monotonic() + timeout_s
    for s in states:
        holder = lock_holder(s.folder)
        if holder is not None:
            log.warning("%s is in use by process %s; waiting up to %.0f s for it to end",
                        s.folder, holder, max(0.0, deadline - time.monotonic()))
        while holder is not None and time.monotonic() < deadline:
            time.sleep(0.2)
            holder = lock_holder(s.folder)
        if holder is not None:
            raise OutputError(
                f"run folder {s.folder} is in use by process {holder} (a job left running "
                f"by an earlier runner, or another command on that run); wait for it to end "
                f"or stop it (kill {holder}), then run again")


def run_study(spec: StudySpec, opts: Options) -> int:
    """Train and evaluate every run not yet done; returns the number of failed jobs.

    The study folder is locked while the runner works (:func:`robust_amo.outputs.folder_lock`):
    a second runner on the same folder is refused rather than training the same runs twice.
    SIGTERM stops the runner as Ctrl-C does: its processes are terminated, not orphaned.
    Each job runs in its own process group, which the runner stops as a whole, and on Linux
    gets SIGTERM from the kernel when the runner dies in any way (``kill -9`` too:
    :func:`robust_amo.runtime.die_with_parent`). A run folder still held by a job of an earlier
    runner is waited for, then reported (:func:`wait_for_orphans`).
    """
    states = plan(spec, opts)
    check_data(states, opts.data_dir)
    with folder_lock(opts.out, "robust-amo reproduce"), sigterm_as_interrupt():
        return _run(spec, opts, states)


def _stop(running: dict[subprocess.Popen, Job]) -> None:
    """Stop the process groups of the jobs still running (Ctrl-C, SIGTERM or an error of the
    runner): SIGTERM, then SIGKILL after :data:`STOP_WAIT_S`."""
    for proc in running:
        stop_group(proc.pid)
    deadline = time.monotonic() + STOP_WAIT_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("job %s did not stop after SIGTERM; killing it", proc.pid)
            stop_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _run(spec: StudySpec, opts: Options, states: list[RunState]) -> int:
    select = opts.select or spec.select.split
    check_out(opts.out, spec)
    wait_for_orphans(states)  # before cell.yaml is rewritten under a job still running
    for s in states:
        writable_dir(s.folder)
        save_yaml(s.cfg, s.folder / CELL_CONFIG)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // max(1, opts.workers))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    ev = eval_spec(spec, select)
    child_setup = die_with_parent()

    scheduled: set[Path] = set()
    seeds: dict[str, set[int]] = {}
    for s in states:
        seeds.setdefault(s.run.cell_key, set()).add(s.run.seed)
    # eval jobs a cell will need once its runs are done: one per seed, unless already evaluated
    expected = {} if ev is None else {s.run.cell_key: len(seeds[s.run.cell_key])
                                      for s in states if not s.evaluated}

    def publish() -> dict[str, Selection]:
        """Rewrite results.csv, table.md and the plot; the selection per cell."""
        return write_results(opts.out, spec, states, select, describe(spec, states, opts))

    def evals_due(sel: Selection) -> list[Job]:
        """The eval jobs of a cell once its selection is final (all its runs finished)."""
        if ev is None or not sel.complete:
            return []
        jobs = [eval_job(s, spec, opts) for s in sel.runs
                if not s.evaluated and not s.failed and s.folder not in scheduled]
        scheduled.update(j.state.folder for j in jobs)
        return jobs

    queue: deque[Job] = deque(train_job(s, opts) for s in states if not s.finished)
    n_train = len(queue)
    for cell, sel in publish().items():
        if sel.complete:
            expected.pop(cell, None)  # its eval jobs are known now (or done)
        queue.extend(evals_due(sel))
    bar = tqdm(total=len(queue) + sum(expected.values()), unit="job", desc=spec.name,
               disable=not opts.progress)
    log.info("%s: %d runs (%d to train), %d eval jobs ready, %d workers x %d threads; "
             "estimated %.1f h on %s", spec.name, len(states), n_train, len(queue) - n_train,
             opts.workers, threads, estimate_s(spec, states) / 3600, spec.cost.device)
    running: dict[subprocess.Popen, Job] = {}
    failed = 0
    try:
        while queue or running:
            while queue and len(running) < max(1, opts.workers):
                job = queue.popleft()
                job.log_path.parent.mkdir(parents=True, exist_ok=True)
                write_request(job.request, job.request_path)
                with job.log_path.open("ab") as f:
                    f.write(f"$ {' '.join(job.argv)}\n".encode())
                    f.flush()
                    # its own process group, stopped as one; SIGTERM when the runner dies
                    proc = subprocess.Popen(job.argv, stdout=f, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True,
                                            preexec_fn=child_setup)
                running[proc] = job
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job = running.pop(proc)
                refresh(job.state, spec.select.by)
                ok = proc.returncode == 0 and (job.state.finished if job.kind == "train"
                                               else job.state.evaluated)
                if not ok:
                    failed += 1
                    job.state.failed = f"{job.kind} exited {proc.returncode}"
                    log.error("%s of %s failed (exit %s); see %s", job.kind, job.state.folder,
                              proc.returncode, job.log_path)
                bar.update(1)
                cell = job.state.run.cell_key
                new = evals_due(publish()[cell])
                if cell in expected and (new or all(s.finished or s.failed for s in states
                                                    if s.run.cell_key == cell)):
                    bar.total += len(new) - expected.pop(cell)  # the estimate becomes real
                    bar.refresh()
                queue.extend(new)
    finally:
        _stop(running)
        bar.close()
    publish()
    done = sum(s.finished for s in states)
    log.info("%s: %d/%d runs finished, %d failed jobs; %s", spec.name, done, len(states),
             failed, opts.out / "table.md")
    return failed
