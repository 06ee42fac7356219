"""Robustness evaluation: PGD-K × R with per-example worst case, AutoAttack, reports.

The per-example evaluators take tensors and return boolean masks
(:func:`pgd_robust`, :func:`autoattack_robust`); :func:`evaluate_attacks` runs a list of attacks
chunk by chunk with a resumable state; :mod:`evaluation.report` reduces the masks to accuracies,
runs the sanity checks and writes the report. ``robust-amo eval`` lives in
:mod:`evaluation.commands`. Protocol: docs/evaluation.md.
"""

from .autoattack_adapter import AutoAttackResult, AutoAttackSettings, autoattack_robust
from .loading import EvalData, load_eval_data, load_model
from .pgd_eval import PGDResult, PGDSettings, pgd_robust
from .runner import AttackOutcome, AttackSpec, evaluate_attacks, parse_attack, summarize

__all__ = [
    "AttackOutcome",
    "AttackSpec",
    "AutoAttackResult",
    "AutoAttackSettings",
    "EvalData",
    "PGDResult",
    "PGDSettings",
    "autoattack_robust",
    "evaluate_attacks",
    "load_eval_data",
    "load_model",
    "parse_attack",
    "pgd_robust",
    "summarize",
]
