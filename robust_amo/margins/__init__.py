"""Margins of a trained classifier (Wei & Ma 2020; Sokolić et al. 2017): the estimators
(:mod:`.estimators`), all of them in one call (:func:`measure`) and what ``robust-amo margins``
writes (:mod:`.report`).

docs/margins.md says which estimate bounds from above or below; docs/algorithms.md states them.
"""

from .estimators import (
    AdversarialMargins,
    Kappa,
    MarginEstimate,
    SearchOptions,
    adversarial_margins,
    all_layer_margin,
    input_margin,
    kappa,
    margins_batch,
    output_margin,
    pgd_neighbourhood,
)
from .measure import MarginsResult, measure

__all__ = [
    "AdversarialMargins",
    "Kappa",
    "MarginEstimate",
    "MarginsResult",
    "SearchOptions",
    "adversarial_margins",
    "all_layer_margin",
    "input_margin",
    "kappa",
    "margins_batch",
    "measure",
    "output_margin",
    "pgd_neighbourhood",
]
