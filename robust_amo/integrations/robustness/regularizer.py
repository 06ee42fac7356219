"""The Jacobian large-margin penalty (Sokolić et al. 2017 eq. 26) as robustness's
``args.regularizer``."""

from __future__ import annotations

import torch
from robustness.attacker import AttackerModel
from torch import nn

from robust_amo.methods.jacobian_lm import Variant, jacobian_penalty


class _InputSpace(nn.Module):
    """The classifier seen from robustness's input space: ``model((x − mean) / std)``.

    ``module`` points at the registered model, so robust-amo helpers that look for its
    classifier through wrappers find it. robustness's normaliser also clamps x to [0, 1], a no-op
    on its inputs but one whose gradient is zero at pixels equal to 0 or 1; the penalty is the
    norm of ∇_x F(x)_c of the network itself, so the clamp is left out.
    """

    def __init__(self, attacker_model: AttackerModel) -> None:
        super().__init__()
        self.normalizer = attacker_model.normalizer
        self.module = attacker_model.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.module((x - self.normalizer.new_mean) / self.normalizer.new_std)


def _attacker_model(model: nn.Module) -> AttackerModel:
    inner = model
    while not isinstance(inner, AttackerModel):
        inner = getattr(inner, "module", None)
        if inner is None:
            raise TypeError(f"expected a robustness AttackerModel (or DataParallel of one), got "
                            f"{type(model).__name__}")
    return inner


class JacobianLMRegularizer:
    """Sokolić et al. 2017 eq. (26) as robustness's ``args.regularizer``.

    ``regularizer(model, inp, target)`` returns ``weight · mean_i penalty(inp_i)`` with the
    penalty of :func:`robust_amo.methods.jacobian_lm.jacobian_penalty` taken w.r.t. the [0, 1]
    input, through the AttackerModel's normaliser, differentiable (double backpropagation). It
    returns 0 outside training: when gradients are disabled (robustness's clean validation loop)
    and when the model is in eval mode (its adversarial validation loop, which runs with
    gradients enabled).
    robustness passes the clean batch, so the penalty is taken at clean inputs; the per-example
    gradients assume the examples do not interact (no train-mode BatchNorm).

    Args:
        weight: λ_LM, the weight of the batch-mean penalty.
        variant: ``"all"`` (sum over classes, default) or ``"random"`` (one class per example).
        generator: source of the random classes (default: torch's global generator).
    """

    def __init__(self, weight: float, variant: Variant = "all",
                 generator: torch.Generator | None = None) -> None:
        if weight < 0:
            raise ValueError(f"the Jacobian-LM weight must be >= 0, got {weight}")
        self.weight, self.variant, self.generator = float(weight), variant, generator

    def __repr__(self) -> str:
        return f"JacobianLMRegularizer(weight={self.weight:g}, variant={self.variant})"

    def __call__(self, model: nn.Module, inp: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor | float:
        """The regularisation term for robustness's loop (a scalar tensor, or 0.0)."""
        if not torch.is_grad_enabled() or self.weight == 0 or not model.training:
            return 0.0
        net = _InputSpace(_attacker_model(model))
        pen = jacobian_penalty(net, inp, variant=self.variant, generator=self.generator,
                               create_graph=True)
        return self.weight * pen.mean()
