"""robust-amo inside MadryLab's ``robustness`` (1.2.1.post2): the only module that imports it.

What it offers (docs/robustness_plugin.md):

- our registered architectures for ``make_and_restore_model`` (:func:`architecture`,
  :func:`robustness_dataset`, :func:`make_model`);
- robust AMO (Wei & Ma 2020, ALGORITHMS.md "Robust AMO") inside ``robustness.train.train_model``
  through :class:`RobustAMOAttackerModel`, an ``AttackerModel`` subclass: during training its
  attack moves x' exactly as robustness's PGD does (robustness's own ``AttackerStep`` for the
  ``constraint``, so ``eps``, ``attack_lr``, ``attack_steps``, ``random_start`` and ``use_best``
  keep their meaning) and, from the same backward, the all-layer perturbations δ by
  δ ← ρ·δ + η_δ·∇_δ ℓ; the training forward then runs at (x', δ). Validation attacks are
  robustness's plain PGD;
- the Jacobian large-margin penalty (Sokolić et al. 2017 eq. 26) as ``args.regularizer``
  (:class:`JacobianLMRegularizer`);
- checkpoints both ways (:mod:`robust_amo.robustness_checkpoint`, re-exported here).

Compatibility shim: robustness imports ``torchvision.models.utils``, which torchvision removed in
0.13 (its ``load_state_dict_from_url`` moved to ``torch.hub``). When that module is missing,
importing this plugin registers an alias module of that name holding only
``load_state_dict_from_url = torch.hub.load_state_dict_from_url``, then imports robustness. It
changes nothing else. Import this module before any ``robustness.datasets``/``robustness.train``
import.

robustness hard-codes ``.cuda()`` in its training loop and attacker, so ``train_model`` needs a
CUDA device; the pieces of this module work on any device and add no ``.cuda()`` of their own.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SHIM_MODULE = "torchvision.models.utils"


def _install_torchvision_shim() -> bool:
    """Register the ``torchvision.models.utils`` alias robustness needs; True if installed."""
    import importlib

    try:
        importlib.import_module(SHIM_MODULE)
        return False
    except ModuleNotFoundError:
        pass
    import torch.hub

    shim = types.ModuleType(SHIM_MODULE, "robust-amo alias: torchvision.models.utils was removed "
                                         "in torchvision 0.13; robustness 1.2.1 imports it")
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules[SHIM_MODULE] = shim
    return True


SHIM_INSTALLED = _install_torchvision_shim()

from robustness.attacker import STEPS, AttackerModel  # noqa: E402
from robustness.datasets import DataSet  # noqa: E402

from .data import Loader, dataset_info, load_dataset, normalize_dataset_name  # noqa: E402
from .errors import CheckpointError  # noqa: E402
from .methods import jacobian_penalty  # noqa: E402
from .models import RobustModel, create_model  # noqa: E402
from .perturb import perturb  # noqa: E402
from .robustness_checkpoint import (  # noqa: E402
    convert_checkpoint,
    from_robustness,
    load_error_summary,
    read_checkpoint,
    to_robustness,
)

__all__ = [
    "JacobianLMRegularizer",
    "RobustAMOAttackerModel",
    "architecture",
    "convert_checkpoint",
    "from_robustness",
    "make_model",
    "read_checkpoint",
    "robustness_dataset",
    "to_robustness",
]

DELTA_GRADS = ("mean", "sum")

# robustness's datasets do not record their image size
_INPUT_SHAPES = {
    "cifar": (3, 32, 32), "cinic": (3, 32, 32), "imagenet": (3, 224, 224),
    "restricted_imagenet": (3, 224, 224), "custom_imagenet": (3, 224, 224),
    "places365": (3, 224, 224), "openimages": (3, 224, 224),
}


def _is_identity_normalization(model: nn.Module) -> bool:
    norm = getattr(model, "normalize", None)
    if norm is None:
        return True
    return bool((norm.mean == 0).all() and (norm.std == 1).all())


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, RobustModel):
        raise TypeError(
            f"robust AMO needs a registered robust-amo architecture (a RobustModel declaring its "
            f"perturbation points), got {type(model).__name__}; build one with "
            "robustness_plugin.architecture(name, dataset)"
        )
    if not _is_identity_normalization(model):
        raise ValueError(
            "the model normalises its inputs itself, and robustness's AttackerModel normalises "
            "them again; create it with mean=None, std=None (robustness_plugin.architecture does)"
        )


def architecture(
    arch: str,
    dataset: DataSet,
    *,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> RobustModel:
    """A registered architecture sized for a robustness dataset, with identity normalisation.

    robustness's ``AttackerModel`` normalises inputs with ``dataset.mean``/``dataset.std`` before
    the classifier, so the model itself must not (it is created with ``mean=None, std=None``).

    Args:
        arch: registry name, e.g. ``"wrn28-10"`` (``robust-amo archs`` lists them).
        dataset: a robustness ``DataSet`` (gives ``num_classes``).
        input_shape: (C, H, W); default: the dataset's (CIFAR/CINIC 3x32x32, ImageNet-like
            3x224x224, or ``dataset.input_shape`` from :func:`robustness_dataset`).
        **kwargs: architecture options (e.g. ``dropout``).

    Returns:
        the model, ready for ``make_and_restore_model(arch=model, dataset=dataset)``.
    """
    shape = input_shape or getattr(dataset, "input_shape", None) or _INPUT_SHAPES.get(
        getattr(dataset, "ds_name", ""))
    if shape is None:
        raise ValueError(
            f"robustness dataset {getattr(dataset, 'ds_name', dataset)!r} does not say its image "
            "size; pass input_shape=(C, H, W)"
        )
    return create_model(arch, dataset.num_classes, input_shape=shape, mean=None, std=None,
                        **kwargs)


class RobustAmoDataSet(DataSet):
    """A robustness ``DataSet`` over robust-amo's in-memory datasets and architectures.

    ``get_model(name)`` builds our registered architectures, so that
    ``make_and_restore_model(arch="tiny-cnn", dataset=ds)`` works with a name, and
    ``make_loaders`` returns robust-amo's device-resident :class:`~robust_amo.data.Loader` s.
    """

    def __init__(self, name: str, data_path: str | None = None,
                 device: torch.device | str | None = None) -> None:
        name = normalize_dataset_name(name)
        info = dataset_info(name)
        super().__init__(name, data_path, num_classes=info.num_classes,
                         mean=torch.tensor(info.mean), std=torch.tensor(info.std),
                         transform_train=None, transform_test=None)
        self.input_shape = info.input_shape
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")

    def get_model(self, arch: str, pretrained: bool) -> RobustModel:  # noqa: D102
        if pretrained:
            raise ValueError("robust-amo architectures have no pretrained weights")
        return architecture(arch, self)

    def make_loaders(self, workers: int, batch_size: int, data_aug: bool = True,
                     subset: int | None = None, val_batch_size: int | None = None,
                     only_val: bool = False, shuffle_train: bool = True,
                     shuffle_val: bool = False, seed: int = 0,
                     val_subset: int | None = None) -> tuple[Loader | None, Loader]:
        """``(train_loader, val_loader)`` on ``self.device``, as robustness's ``make_loaders``.

        ``workers`` is not used (the data is in memory); ``subset``/``val_subset`` keep the first
        examples of the training/test split; ``data_aug`` is robust-amo's crop and flip.
        """
        train, test = load_dataset(self.ds_name, self.data_path)
        if subset is not None:
            train = train.subset(torch.arange(min(subset, len(train))))
        if val_subset is not None:
            test = test.subset(torch.arange(min(val_subset, len(test))))
        val = Loader(test, val_batch_size or batch_size, self.device, shuffle=shuffle_val,
                     seed=seed)
        if only_val:
            return None, val
        return Loader(train, batch_size, self.device, shuffle=shuffle_train, augment=data_aug,
                      seed=seed, drop_last=len(train) > batch_size), val


def robustness_dataset(name: str, data_path: str | None = None,
                       device: torch.device | str | None = None) -> RobustAmoDataSet:
    """A robustness dataset for a robust-amo dataset name (``digits``, ``mnist``, ``cifar10``...).

    Args:
        name: robust-amo dataset name (``robust_amo.data.DATASETS``).
        data_path: folder with the data (not needed for ``digits``).
        device: where its loaders put batches (default CUDA when available).
    """
    return RobustAmoDataSet(name, data_path, device)


class RobustAMOAttackerModel(AttackerModel):
    """robustness's ``AttackerModel`` whose training attack is robust AMO's joint x'/δ update.

    In train mode with ``make_adv=True`` (robustness's training loop) the forward runs the joint
    attack (model in eval mode during it) and returns the logits of F(x', δ) with x' and δ
    detached, so that ``train_model`` trains on ℓ(F(x', δ), y) (ALGORITHMS.md "Robust AMO").
    Everything else (eval mode, ``make_adv=False``) is robustness's ``AttackerModel``: validation
    uses its plain PGD. The state dict is the parent's, so checkpoints load either way.

    Args:
        model: a registered architecture with identity normalisation (:func:`architecture`).
        dataset: the robustness dataset (its mean/std normalise inputs).
        rho: ρ, δ's shrink factor per step (default 0.92, Wei & Ma F.2).
        eta_delta: η_δ, δ's step size (default 6.4e-3, F.2). With 0 the training step is
            robustness's PGD step exactly.
        delta_grad: ``"mean"`` (default): ∇_δ of the batch-mean attack loss (robustness averages
            the loss, as the authors' code); ``"sum"``: of the summed loss.

    Attributes:
        last_adv: the x' of the latest training step (detached), for inspection.
        last_deltas: the δ's of the latest training step (detached, one per perturbation point).
            Under multi-GPU ``DataParallel`` both are set on the replicas, not on this module.
    """

    def __init__(self, model: RobustModel, dataset: DataSet, *, rho: float = 0.92,
                 eta_delta: float = 6.4e-3, delta_grad: str = "mean") -> None:
        _check_model(model)
        if rho < 0 or eta_delta < 0:
            raise ValueError(f"robust AMO needs rho >= 0 and eta_delta >= 0, got {rho}, "
                             f"{eta_delta}")
        if delta_grad not in DELTA_GRADS:
            raise ValueError(f"delta_grad must be one of {DELTA_GRADS}, got {delta_grad!r}")
        super().__init__(model, dataset)
        self.rho, self.eta_delta, self.delta_grad = float(rho), float(eta_delta), delta_grad
        self.last_adv: torch.Tensor | None = None
        self.last_deltas: list[torch.Tensor | None] | None = None

    def extra_repr(self) -> str:  # noqa: D102
        return f"rho={self.rho:g}, eta_delta={self.eta_delta:g}, delta_grad={self.delta_grad}"

    def forward(self, inp: torch.Tensor, target: torch.Tensor | None = None,
                make_adv: bool = False, with_latent: bool = False, fake_relu: bool = False,
                no_relu: bool = False, with_image: bool = True, **attacker_kwargs: Any):
        """robustness's ``AttackerModel.forward``; robust AMO when training with ``make_adv``."""
        if not (make_adv and self.training):
            return super().forward(inp, target, make_adv, with_latent, fake_relu, no_relu,
                                   with_image, **attacker_kwargs)
        if target is None:
            raise ValueError("make_adv=True needs the labels (target)")
        if no_relu and fake_relu:
            raise ValueError("options no_relu and fake_relu are exclusive")
        self.eval()
        try:
            x_adv, deltas = self.joint_attack(inp, target, **attacker_kwargs)
        finally:
            self.train()
        self.last_adv, self.last_deltas = x_adv, deltas
        with perturb(self.model, deltas, requires_grad=False):
            output = self.model(self.normalizer(x_adv), with_latent=with_latent,
                                fake_relu=fake_relu, no_relu=no_relu)
        return (output, x_adv) if with_image else output

    def _losses(self, x: torch.Tensor, target: torch.Tensor,
                custom_loss: Callable | None) -> torch.Tensor:
        xn = self.normalizer(x)
        if custom_loss is not None:
            # robustness's contract: custom_loss(model, normalised input, target) -> (losses, _)
            return custom_loss(self.model, xn, target)[0]
        return F.cross_entropy(self.model(xn).float(), target, reduction="none")

    def joint_attack(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        constraint: str | type,
        eps: float,
        step_size: float,
        iterations: int,
        random_start: bool = False,
        random_restarts: int | bool = False,
        use_best: bool = True,
        custom_loss: Callable | None = None,
        orig_input: torch.Tensor | None = None,
        do_tqdm: bool = False,
        targeted: bool = False,
        should_normalize: bool = True,
        return_image: bool = True,
        est_grad: Any = None,
        mixed_precision: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Robust AMO's joint attack with robustness's attack arguments.

        Per step, one forward of F(x', δ) and one backward of the batch-mean loss give ∇_{x'}
        and ∇_δ; x' takes robustness's step and projection for ``constraint`` (its random start,
        from torch's global RNG as in robustness) and δ ← ρ·δ + η_δ·∇_δ. With ``use_best`` the
        (x', δ) pair of the highest per-example loss is kept, the final pair included, as
        robustness does for x'. The arguments mean what they mean in robustness's
        ``Attacker.forward``; restarts, targeted attacks, gradient estimation and mixed
        precision are not part of robust AMO training and are refused.

        Returns:
            ``(x_adv, deltas)``, detached: (B, C, H, W) and one δ per perturbation point
            (``None`` entries when ``iterations == 0``).
        """
        refused = {"random_restarts": random_restarts, "targeted": targeted,
                   "est_grad": est_grad is not None, "mixed_precision": mixed_precision,
                   "should_normalize=False": not should_normalize,
                   "return_image=False": not return_image}
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ValueError(f"robust AMO training does not support {', '.join(bad)}; "
                             "use robustness's AttackerModel for such attacks")
        step_cls = STEPS[constraint] if isinstance(constraint, str) else constraint
        orig = (x if orig_input is None else orig_input).detach()
        step = step_cls(eps=eps, orig_input=orig, step_size=step_size)
        if not step.use_grad:
            raise ValueError(f"constraint {constraint!r} takes no gradient steps; robust AMO "
                             "needs one ('inf' or '2')")
        x = x.detach()
        if random_start:
            x = step.random_perturb(x)
        best: tuple[torch.Tensor, torch.Tensor, list] | None = None
        with perturb(self.model) as p, torch.enable_grad():
            for _ in range(iterations):
                x = x.clone().detach().requires_grad_(True)
                losses = self._losses(step.to_image(x), target, custom_loss)
                grads = torch.autograd.grad(losses.mean(), [x, *p.deltas])
                with torch.no_grad():
                    if use_best:
                        best = _keep_best(best, losses, x, p.deltas)
                    x = step.project(step.step(x, grads[0]))
                    eta = self.eta_delta * (len(target) if self.delta_grad == "sum" else 1)
                    p.deltas = [(self.rho * d + eta * g).requires_grad_(True)
                                for d, g in zip(p.detached(), grads[1:], strict=True)]
            deltas = p.detached()
            if use_best and iterations > 0:
                with torch.no_grad():
                    losses = self._losses(step.to_image(x), target, custom_loss)
                    _, x, deltas = _keep_best(best, losses, x, deltas)
        return step.to_image(x).detach(), deltas


def _keep_best(best, losses, x, deltas):
    """robustness's ``use_best`` bookkeeping, extended to carry δ with x'."""
    losses = losses.detach()
    if best is None:
        return losses.clone(), x.detach().clone(), [d.detach().clone() for d in deltas]
    b_loss, b_x, b_d = best
    better = b_loss < losses
    b_loss[better] = losses[better]
    b_x[better] = x.detach()[better]
    for bd, d in zip(b_d, deltas, strict=True):
        bd[better] = d.detach()[better]
    return b_loss, b_x, b_d


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
    penalty of :func:`robust_amo.methods.jacobian_penalty` taken w.r.t. the [0, 1] input, through
    the AttackerModel's normaliser, differentiable (double backpropagation). It returns 0 outside
    training: when gradients are disabled (robustness's clean validation loop) and when the model
    is in eval mode (its adversarial validation loop, which runs with gradients enabled).
    robustness passes the clean batch, so the penalty is taken at clean inputs; the per-example
    gradients assume the examples do not interact (no train-mode BatchNorm).

    Args:
        weight: λ_LM, the weight of the batch-mean penalty.
        variant: ``"all"`` (sum over classes, default) or ``"random"`` (one class per example).
        generator: source of the random classes (default: torch's global generator).
    """

    def __init__(self, weight: float, variant: str = "all",
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


def make_model(
    *,
    arch: str | RobustModel,
    dataset: DataSet,
    resume_path: str | None = None,
    robust_amo: bool = True,
    rho: float = 0.92,
    eta_delta: float = 6.4e-3,
    delta_grad: str = "mean",
    device: torch.device | str | None = None,
    parallel: bool = False,
    input_shape: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> tuple[AttackerModel, dict[str, Any] | None]:
    """Like robustness's ``make_and_restore_model``, for our architectures and robust AMO.

    Args:
        arch: a registry name or a model built by :func:`architecture`.
        dataset: a robustness dataset.
        resume_path: a robustness checkpoint or a robust-amo checkpoint/run folder.
        robust_amo: wrap in :class:`RobustAMOAttackerModel` (default) or robustness's
            ``AttackerModel``.
        rho, eta_delta, delta_grad: robust AMO's options (see the class).
        device: where the model goes (default CUDA when available, else CPU).
        parallel: wrap in ``DataParallel``.
        input_shape, **model_kwargs: passed to :func:`architecture` for a name.

    Returns:
        ``(model, checkpoint)``; the checkpoint is in robustness's format (``None`` without
        ``resume_path``) and can be given to ``train_model(checkpoint=...)`` to resume.
    """
    net = architecture(arch, dataset, input_shape=input_shape, **model_kwargs) if isinstance(
        arch, str) else arch
    if isinstance(net, RobustModel) and not _is_identity_normalization(net):
        _check_model(net)  # raises: robustness would normalise twice
    if robust_amo:
        model: AttackerModel = RobustAMOAttackerModel(net, dataset, rho=rho, eta_delta=eta_delta,
                                                      delta_grad=delta_grad)
    else:
        model = AttackerModel(net, dataset)
    checkpoint = None
    if resume_path:
        checkpoint = read_checkpoint(resume_path)
        if checkpoint.get("format") == "robust-amo-checkpoint":
            checkpoint = to_robustness(checkpoint)
        sd = checkpoint.get("model", checkpoint.get("state_dict"))
        if sd is None:
            raise CheckpointError(f"{resume_path} holds no model state dict")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"{resume_path} does not fit this architecture "
                                  f"({load_error_summary(e)})") from None
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev)
    if parallel:
        model = nn.DataParallel(model)
    return model, checkpoint
