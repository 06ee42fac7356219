"""``torch.compile`` for the training step, with a clean fallback to eager execution.

Two things can go wrong with a compiled model, and both are handled here:

- Compilation or the compiled backward fails. Double back-propagation (the Jacobian regularizer
  of Sokolić et al. differentiates an input gradient) is not supported by AOTAutograd:
  "torch.compile with aot_autograd does not currently support double backward".
  :func:`probe` runs one training step of the method on a real batch before training; if it
  raises, compilation is switched off with a logged warning and training runs eagerly.
- Forward hooks installed *after* compilation are silently skipped by the compiled graph
  (dynamo does not guard on module hooks). The all-layer perturbations of (robust) AMO are such
  hooks (``robust_amo.perturb``), so :class:`CompiledModel` runs the eager model whenever any
  submodule has a hook, and the compiled one otherwise (PGD steps, clean forwards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def has_hooks(module: nn.Module) -> bool:
    """True when any submodule of ``module`` has a forward or forward-pre hook installed."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class CompiledModel(nn.Module):
    """A model whose forward runs through ``torch.compile`` unless hooks are installed.

    Args:
        module: the plain model (parameters are shared, not copied).
        backend: ``torch.compile`` backend (default ``"inductor"``; ``"aot_eager"`` compiles
            quickly and is what the CPU tests use).
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``...).

    Attributes:
        module: the plain model (``robust_amo.perturb`` and checkpoints look for it here).
        enabled: False after :meth:`disable`; the forward is then plain eager.
    """

    def __init__(self, module: nn.Module, backend: str = "inductor", mode: str | None = None):
        super().__init__()
        self.module = module
        self.enabled = True
        # not registered as a submodule: the parameters belong to self.module once
        object.__setattr__(self, "_compiled", torch.compile(module, backend=backend, mode=mode))

    def disable(self) -> None:
        """Run eagerly from now on."""
        self.enabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if self.enabled and not has_hooks(self.module):
            return self._compiled(*args, **kwargs)
        return self.module(*args, **kwargs)


def probe(
    model: CompiledModel,
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Callable[[], Any],
) -> bool:
    """Try one forward+backward of ``objective`` through ``model``; disable compilation on error.

    The model's parameters, buffers (BatchNorm statistics) and gradients and the global RNG
    state are restored afterwards, so the probe leaves no trace on training. (Generators owned by
    the attack are reseeded at every epoch by the trainer.)

    Returns:
        True when the compiled step works; False (and ``model`` disabled) otherwise.
    """
    saved = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    rng = torch.get_rng_state()
    # x's GPU only: get_rng_state_all would create a context on every GPU of the node
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    try:
        with amp():
            loss, _ = objective(model, x, y)
        loss.backward()
        ok = True
    except Exception as e:  # any failure of the compiled step means: run eagerly
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.warning("torch.compile does not work for this training step (%s: %s); training "
                    "without compilation", type(e).__name__, first[:300])
        model.disable()
        ok = False
    finally:
        model.module.load_state_dict(saved)
        for p in model.module.parameters():
            p.grad = None
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, x.device)
    if ok:
        log.info("torch.compile: the compiled training step works")
    return ok
