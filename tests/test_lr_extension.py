"""Resuming with more epochs keeps the learning-rate schedule the run was planned with: the
added epochs keep its final rate (``lr_extension: final``, the default, with a warning) or run
the schedule again (``restart``), the same rule for every schedule, and never the jump of a
stretched schedule (issue 20, item 2)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.cli import main
from robust_amo.errors import ConfigError
from robust_amo.resolve import resolve
from robust_amo.train import LRSchedule, lr_lambda, train
from tests.helpers import tiny_run

SPE = 4  # iterations per epoch

SCHEDULES = {
    "multistep": {"schedule": "multistep", "milestones": [5, 10], "gamma": 0.1},
    "cosine": {"schedule": "cosine"},
    "constant": {"schedule": "constant"},
    "cosine-warmup": {"schedule": "cosine", "warmup_epochs": 2},
    "multistep-warmup": {"schedule": "multistep", "milestones": [12], "gamma": [0.5],
                         "warmup_epochs": 1},
}


def _scheduler(optim: dict, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    cfg = resolve(None, [{"epochs": epochs, "optim": {"lr": 1.0, **optim}}])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, SPE))


def _run(sched, iterations: int) -> list[float]:
    """The rate each of ``iterations`` optimiser steps uses, stepping as the trainer does."""
    used = []
    for _ in range(iterations):
        used.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return used


def _resumed(optim: dict, first, epochs: int, how: str | None):
    """A scheduler of a run resumed with ``epochs`` from the optimiser and scheduler of
    ``first`` (saved and read back as a checkpoint is), extended as the trainer does."""
    buf = io.BytesIO()
    torch.save({"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()},
               buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    sched = _scheduler(optim, epochs)
    sched.optimizer.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    schedule = sched.lr_lambdas[0]
    assert isinstance(schedule, LRSchedule) and schedule.planned_epochs == 15
    if how is not None:
        schedule.extend(epochs, how)
        lr = schedule(sched.last_epoch)
        sched.optimizer.param_groups[0]["lr"] = lr
    return sched


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_resuming_15_to_20_epochs_keeps_the_plan_for_every_schedule(name):
    optim = SCHEDULES[name]
    first = _scheduler(optim, 15)
    planned = _run(first, 15 * SPE)
    end = first.optimizer.param_groups[0]["lr"]  # the rate the schedule ends with

    # the plan is saved with the scheduler: a resume with the same epochs is the same run
    same = _resumed(optim, first, 15, None)
    assert same.optimizer.param_groups[0]["lr"] == end

    # final: the 5 added epochs keep the last rate of the 15-epoch schedule, no jump
    final = _run(_resumed(optim, first, 20, "final"), 5 * SPE)
    assert final == [end] * (5 * SPE)

    # restart: the added epochs are the schedule once more, over 5 epochs
    fresh = _run(_scheduler(optim, 5), 5 * SPE)
    again = _run(_resumed(optim, first, 20, "restart"), 5 * SPE)
    assert again == pytest.approx(fresh, abs=0, rel=1e-12)
    # and the first 15 epochs were the 15-epoch schedule, untouched by the extensions
    assert planned == _run(_scheduler(optim, 15), 15 * SPE)


def test_a_second_extension_builds_on_the_first():
    schedule = LRSchedule(resolve(None, [{"epochs": 4}]).optim, 4, SPE)
    schedule.extend(6, "restart")
    schedule.extend(8, "final")
    assert schedule.segments == [[0, 4, "plan"], [4, 6, "restart"], [6, 8, "final"]]
    # final after a restart keeps the restarted schedule's last rate
    assert schedule(7 * SPE) == schedule(6 * SPE) == LRSchedule(
        resolve(None, [{"epochs": 2}]).optim, 2, SPE)(2 * SPE)


def _cosine(out, **kw):
    return tiny_run(out, **kw)  # TINY_RUN: cosine, 2 epochs


def _lrs(run):
    return [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_trainer_keeps_the_final_rate_by_default_or_restarts_when_asked(tmp_path, capsys,
                                                                           caplog):
    run = tmp_path / "run"
    train(_cosine(run))
    assert _lrs(run)[-1] == 0.0  # cosine ends at 0

    # the case: a cosine run resumed with more epochs jumped back up; now the added
    # epochs keep the final rate, and the log says so and names the other choice
    final = tmp_path / "final"
    assert main(["train", "--dataset", "digits", "--out", str(final), "--epochs", "2",
                 "--batch-size", "64", "--lr", "0.05", "--set", "data.augment=false",
                 "--set", "data.train_subset=200", "--set", "optim.schedule=cosine",
                 "--eps", "0.1", "--set", "attack.step_size=0.05", "--set", "attack.steps=2",
                 "--n-examples", "32", "--set", "eval.steps=2", "--no-progress"]) == 0
    caplog.clear()
    assert main(["train", "--dataset", "digits", "--out", str(final), "--resume", "--epochs",
                 "4", "--batch-size", "64", "--lr", "0.05", "--set", "data.augment=false",
                 "--set", "data.train_subset=200", "--set", "optim.schedule=cosine",
                 "--eps", "0.1", "--set", "attack.step_size=0.05", "--set", "attack.steps=2",
                 "--n-examples", "32", "--set", "eval.steps=2", "--no-progress"]) == 0
    assert _lrs(final) == [_lrs(run)[0], 0.0, 0.0, 0.0]  # no jump after epoch 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("epochs 3-4 go past the 2 epochs" in w and "lr_extension restart" in w
               for w in warned)

    restart = tmp_path / "restart"
    train(_cosine(restart))
    train(_cosine(restart, epochs=4), resume=True, lr_extension="restart")
    # epochs 3-4 are a 2-epoch cosine again: the rates of epochs 1-2
    assert _lrs(restart) == pytest.approx(_lrs(run) * 2, rel=1e-12)


def test_a_checkpoint_without_a_saved_plan_keeps_the_epochs_it_was_started_with(tmp_path):
    """Checkpoints of earlier versions saved no plan: it is the saved config's epochs."""
    run = tmp_path / "run"
    train(_cosine(run))
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["scheduler"]["lr_lambdas"] = [None]
    torch.save(ck, run / "checkpoint.pt")
    train(_cosine(run, epochs=3), resume=True)
    assert _lrs(run)[1:] == [0.0, 0.0]
    assert math.isfinite(ckpt_io.load_checkpoint(run)["best_robust_acc"])


def test_an_unknown_extension_is_refused():
    with pytest.raises(ConfigError, match="lr_extension: 'linear' is not one of final, restart"):
        train(_cosine("unused"), lr_extension="linear")
