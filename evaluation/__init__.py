"""Robustness evaluation (``robust_amo.evaluation``): PGD-K × R, AutoAttack, reports.

One call: :func:`evaluate` (any ``nn.Module``), :func:`evaluate_checkpoint` (an
:class:`EvalRequest`: what ``robust-amo eval`` runs) and :func:`measure_checkpoint` (margins),
each returning a typed result (:class:`Report`); :mod:`.api`.

The per-example evaluators take tensors and return boolean masks (:func:`pgd_robust`,
:func:`autoattack_robust`); the registry of evaluation attacks (:mod:`.attacks`) names what
``--attack`` can run; :func:`evaluate_attacks` runs a list of them chunk by chunk with a
resumable state; :mod:`.report` reduces the masks to accuracies, runs the sanity checks and
writes the report; :func:`load_for_analysis` turns any checkpoint into model + examples + threat
model. ``robust-amo eval`` is :mod:`robust_amo.cli.eval`. Protocol: docs/evaluation.md.
"""

from robust_amo.config import ThreatModel

from .api import (
    CheckpointRequest,
    EvalRequest,
    MarginsRequest,
    evaluate,
    evaluate_checkpoint,
    measure_checkpoint,
    run_evaluation,
)
from .attacks import (
    EVAL_ATTACKS,
    EVAL_STEP_FRACTION,
    AutoAttackEval,
    CleanAccuracy,
    EvalAttack,
    EvalOptions,
    PGDAttack,
    eval_step_size,
    parse_attack,
    register_eval_attack,
)
from .autoattack_adapter import AutoAttackResult, AutoAttackSettings, autoattack_robust
from .loading import (
    Analysis,
    EvalData,
    load_eval_data,
    load_external,
    load_for_analysis,
    load_model,
    threat_model,
)
from .outcome import AttackOutcome, summarize
from .pgd_eval import PGDResult, PGDSettings, pgd_robust
from .report import AttackReport, Report, SanityCheck
from .runner import evaluate_attacks, large_eps_accuracy, model_digest

__all__ = [
    "EVAL_ATTACKS",
    "EVAL_STEP_FRACTION",
    "Analysis",
    "AttackOutcome",
    "AttackReport",
    "CheckpointRequest",
    "EvalRequest",
    "MarginsRequest",
    "Report",
    "SanityCheck",
    "AutoAttackEval",
    "AutoAttackResult",
    "AutoAttackSettings",
    "CleanAccuracy",
    "EvalAttack",
    "EvalData",
    "EvalOptions",
    "PGDAttack",
    "PGDResult",
    "PGDSettings",
    "ThreatModel",
    "autoattack_robust",
    "eval_step_size",
    "evaluate",
    "evaluate_attacks",
    "evaluate_checkpoint",
    "large_eps_accuracy",
    "load_eval_data",
    "load_external",
    "load_for_analysis",
    "load_model",
    "measure_checkpoint",
    "model_digest",
    "parse_attack",
    "pgd_robust",
    "register_eval_attack",
    "run_evaluation",
    "summarize",
    "threat_model",
]
