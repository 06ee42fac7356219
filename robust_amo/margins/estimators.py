"""Margins of a trained classifier: output, all-layer, adversarial all-layer, κ, κ_adv, input.

Wei & Ma 2020 (ICLR), Sections 2–4 and Appendix C/E, as restated in docs/algorithms.md
("All-layer margin", "Adversarial all-layer margin", "kappa and kappa_adv"); Sokolić et al. 2017
for the
input-space margin. Every function takes a batch and works on the batch's device; the model is put
in eval mode for the computation and its mode is restored afterwards.

What each estimate means (docs/margins.md has the long version):

- :func:`output_margin`: gamma(F(x), y) = F(x)_y − max_{j≠y} F(x)_j, exact.
- :func:`all_layer_margin`: m_F(x, y) (eq. 2.2) estimated **from above**: every radius it returns
  is the norm of a concatenated δ that was checked to misclassify. A bisection on the radius r
  runs a projected normalised-gradient attack on δ inside ‖δ‖₂ ≤ r, ascending
  max_{j≠y} F_j − F_y. 0 for misclassified examples.
- :func:`input_margin`: the same bisection with an L2 PGD on the input (clipped to [0, 1]):
  an estimate from above of the smallest L2 input perturbation that misclassifies.
- :func:`kappa`: the leading term κ_i = s_i(x)·κ_{k←i}(x)/gamma per perturbation point i, with the
  spectral norm κ_{k←i} of the logits' Jacobian at point i computed exactly from the C×C Gram
  matrix of C vector-Jacobian products; 1/‖κ‖₂ is a first-order approximation of m_F, not a
  rigorous bound for ReLU networks.
- :func:`adversarial_margins`: m_adv = min over the PGD neighbourhood of the m_F estimate (0 as
  soon as one candidate is misclassified; still an estimate from above) and κ_adv,i = max over the
  same candidates of κ_i (an estimate from below of the true maximum).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from robust_amo.attacks import PGD, attack_loss, l2_attack_at_radius, margin_loss
from robust_amo.attacks.core import per_example
from robust_amo.perturb import concat_norm, delta_step, perturb
from robust_amo.runtime import eval_mode

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    """How the attack-based margin estimates search (all-layer and input margins).

    Attributes:
        steps: attack steps at each radius (default 20).
        rounds: bisection rounds after a misclassifying radius is found (default 10).
        rtol: stop bisecting an example once (hi − lo) ≤ rtol·hi (default 0.01).
        max_expand: how often the radius may double while no misclassifying δ is found; an
            example still unbroken after that gets +inf ("not covered", default 16).
        step_scale: the step is step_scale·r/steps (Madry et al.'s 2.5, default 2.5).
    """

    steps: int = 20
    rounds: int = 10
    rtol: float = 0.01
    max_expand: int = 16
    step_scale: float = 2.5

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rounds < 0 or self.max_expand < 0:
            raise ValueError("SearchOptions needs steps >= 1, rounds >= 0 and max_expand >= 0")
        if not (self.rtol >= 0 and self.step_scale > 0):
            raise ValueError("SearchOptions needs rtol >= 0 and step_scale > 0")


@dataclass
class MarginEstimate:
    """Result of a bisection search, per example.

    Attributes:
        value: (B,) the estimate from above: the norm of a misclassifying perturbation that was
            found; 0 where already misclassified; +inf where none was found (within ``upper``
            when one was given, else within the largest radius tried).
        lower: (B,) the largest radius at which the attack failed (0 if none): not a bound, the
            attack may be too weak, but it says how far the bisection narrowed the gap.
        witness: the misclassifying perturbation of norm ``value``: for the all-layer margin a
            list of δ's, one per point (zeros where ``value`` is 0 or +inf); for the input margin
            the perturbed input x' (x itself where ``value`` is 0 or +inf). Only filled when
            asked for.
    """

    value: torch.Tensor
    lower: torch.Tensor
    witness: list[torch.Tensor] | torch.Tensor | None = None


@dataclass
class Kappa:
    """κ terms at one batch of points x (Wei & Ma Lemma 3.1, Appendix C).

    Attributes:
        names: perturbation points, in forward order (P of them).
        gamma: (B,) output margin gamma(F(x), y).
        scales: (B, P) s_i(x) = ‖h_i(x)‖₂, the norm that scales δ_i.
        jac_norms: (B, P) κ_{k←i}(x), spectral norm of ∂F/∂h_i.
        kappa: (B, P) κ_i = s_i·κ_{k←i}/gamma where gamma > 0, +inf elsewhere (the limit as
            gamma → 0+, so that 1/‖κ‖₂ = 0 = m_F for misclassified points).
    """

    names: list[str]
    gamma: torch.Tensor
    scales: torch.Tensor
    jac_norms: torch.Tensor
    kappa: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        """‖(κ_1, …, κ_P)‖₂ per example (B,)."""
        return torch.linalg.vector_norm(self.kappa, dim=1)

    @property
    def first_order_margin(self) -> torch.Tensor:
        """1/‖κ‖₂ (B,): first-order approximation of m_F, 0 where misclassified."""
        return 1.0 / self.norm


@dataclass
class AdversarialMargins:
    """Margins over the PGD neighbourhood of x, per example.

    Attributes:
        margin: (B,) m_adv estimate (from above); 0 where a candidate is misclassified.
        kappa_adv: (B, P) max of κ_i over the candidates (from below); +inf where a candidate is
            misclassified.
        robust: (B,) no candidate (x itself included) is misclassified.
        candidates: how many points were examined per example (x and every PGD iterate).
    """

    margin: torch.Tensor
    kappa_adv: torch.Tensor
    robust: torch.Tensor
    candidates: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def kappa_adv_norm(self) -> torch.Tensor:
        """‖κ_adv‖₂ per example (B,)."""
        return torch.linalg.vector_norm(self.kappa_adv, dim=1)


def output_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """gamma(F(x), y) = F(x)_y − max_{j≠y} F(x)_j per example, float32 (B,).

    Positive iff correctly classified (ties count as wrong). Unlike the paper's γ this is not
    clipped at 0, so it also says how badly an example is misclassified.
    """
    return -margin_loss(logits.float(), y)


AttackAt = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, object]]


def _bisect(
    attack_at: AttackAt,
    start: torch.Tensor,
    opts: SearchOptions,
    upper: torch.Tensor | None,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, object]]:
    """Bisection on a per-example radius; ``attack_at(idx, r)`` attacks examples ``idx``.

    ``attack_at`` returns (success (n,), witness norm (n,), witnesses) for the examples ``idx``
    at radii ``r``. The upper end ``hi`` is always the smallest witness norm seen, so it is an
    estimate from above whatever the attack's strength. With ``keep`` the best witness of each
    example is remembered (else nothing is held between rounds).
    """
    n = len(start)
    dev = start.device
    lo = torch.zeros(n, device=dev)
    hi = torch.full((n,), math.inf, device=dev)
    found: dict[int, object] = {}  # example -> (attack output, row in it) of its best witness

    def record(idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        ok, norm, wit = attack_at(idx, r)
        better = ok & (norm < hi[idx])
        hi[idx[better]] = norm[better]
        if keep:
            for k in better.nonzero().flatten().tolist():
                found[int(idx[k])] = (wit, k)
        return ok

    r = start.clone()
    expand = torch.ones(n, dtype=torch.bool, device=dev)
    if upper is not None:
        bounded = torch.isfinite(upper)
        r = torch.where(bounded, upper, r)
        expand &= ~bounded
    for k in range(opts.max_expand + 1):
        # first round: everyone at its starting radius; later rounds: double the failures
        todo = torch.isinf(hi) & expand if k else torch.ones_like(expand)
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        ok = record(idx, r[idx])
        failed = idx[~ok]
        lo[failed] = r[failed]
        r[failed] = r[failed] * 2
    lo = torch.minimum(lo, hi)
    for _ in range(opts.rounds):
        todo = torch.isfinite(hi) & (hi - lo > opts.rtol * hi)
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        ok = record(idx, mid)
        lo[idx[~ok]] = mid[~ok]
    return hi, torch.minimum(lo, hi), found


def _delta_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, opts: SearchOptions
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Projected normalised-gradient ascent of max_{j≠y} F_j − F_y over ‖δ‖₂ ≤ radius.

    Starts at δ = 0 (deterministic). An example stops at its first misclassifying iterate.

    Returns:
        (success (B,), ‖δ‖₂ of the misclassifying iterate (B,), the δ's kept per point).
    """
    alpha = opts.step_scale * radius / opts.steps
    with torch.enable_grad(), perturb(model) as p:
        model(x)  # creates zero δ's with the activation shapes
        deltas = [d.detach() for d in p.deltas]
        done = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        for _ in range(opts.steps):
            p.deltas = [d.requires_grad_(True) for d in deltas]
            logits = model(x)
            loss = attack_loss(logits, y, "cw")
            grads = torch.autograd.grad(loss.sum(), p.deltas)
            done |= logits.detach().argmax(1) != y
            gnorm = concat_norm(list(grads)).clamp_min(1e-30)
            step = torch.where(done, 0.0, alpha / gnorm)
            deltas = delta_step(p.deltas, grads, step, requires_grad=False)
            shrink = (radius / concat_norm(deltas).clamp_min(1e-30)).clamp(max=1.0)
            deltas = [d * per_example(shrink, d) for d in deltas]
        with torch.no_grad():
            p.deltas = deltas
            done |= model(x).argmax(1) != y
    return done, concat_norm(deltas), deltas


def _input_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, opts: SearchOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 PGD on the input from x itself, radius per example, clipped to [0, 1]."""
    return l2_attack_at_radius(model, x, y, radius, opts.steps, opts.step_scale)


def _search(
    attack: Callable[..., tuple[torch.Tensor, torch.Tensor, object]],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    opts: SearchOptions,
    upper: torch.Tensor | None,
    witness: bool,
    zero_witness: Callable[[], object],
) -> MarginEstimate:
    """Shared driver of the all-layer and input margins: skip misclassified, bisect the rest."""
    x, y = x.detach(), y.detach()
    with eval_mode(model), torch.no_grad():
        correct = model(x).argmax(1) == y
    value = torch.zeros(len(y), device=x.device)
    lower = torch.zeros(len(y), device=x.device)
    if upper is not None:
        correct &= upper > 0
    act = correct.nonzero().flatten()
    found: dict[int, object] = {}
    if act.numel():
        xa, ya = x[act], y[act]

        def attack_at(idx: torch.Tensor, r: torch.Tensor):
            return attack(model, xa[idx], ya[idx], r, opts)

        up = upper[act] if upper is not None else None
        r0 = start[act].float()
        r0 = torch.where(torch.isfinite(r0) & (r0 > 0), r0, torch.ones_like(r0))
        with eval_mode(model):
            hi, lo, found = _bisect(attack_at, r0, opts, up, witness)
        value[act], lower[act] = hi, lo
    if upper is not None:
        value = torch.where(upper <= 0, torch.zeros_like(value), value)
    out = MarginEstimate(value, lower)
    if witness:
        out.witness = _gather_witness(zero_witness(), found, act)
    return out


def _gather_witness(base, found: dict[int, object], act: torch.Tensor):
    """Place each example's best witness (a slice of an attack's output) into ``base``."""
    for i, (wit, k) in found.items():
        j = int(act[i])
        if isinstance(base, list):
            for b, w in zip(base, wit, strict=True):
                b[j] = w[k]
        else:
            base[j] = wit[k]
    return base


def _activation_shapes(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    with eval_mode(model), torch.no_grad(), perturb(model, requires_grad=False) as p:
        model(x)
        return [d.shape for d in p.deltas]


def all_layer_margin(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opts: SearchOptions | None = None,
    *,
    start: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    witness: bool = False,
) -> MarginEstimate:
    """Estimate from above of the all-layer margin m_F(x, y) (Wei & Ma eq. 2.2).

    δ is applied with the Algorithm 1 scaling h_j ← h_j + ‖h_j‖₂·δ_j at the model's perturbation
    points (:mod:`robust_amo.perturb`); ‖δ‖₂ is over all points concatenated.

    Args:
        model: a registered model (declares ``perturbation_points()``).
        x: inputs (B, C, H, W) in [0, 1]; y: labels (B,).
        opts: attack steps, bisection rounds, tolerance (default :class:`SearchOptions`).
        start: first radius tried per example (B,) (default 1; the first-order margin
            1/‖κ‖₂ is a good start).
        upper: only look for margins below this (B,): the first attack runs at ``upper`` and an
            example whose attack fails there gets +inf (used by :func:`adversarial_margins` to
            skip candidates that cannot lower the minimum).
        witness: also return the misclassifying δ's (``MarginEstimate.witness``).

    Returns:
        :class:`MarginEstimate` with ``value`` (B,): 0 where misclassified, +inf where no
        misclassifying δ was found.
    """
    opts = opts or SearchOptions()
    start = torch.ones(len(y), device=x.device) if start is None else start.to(x.device)
    shapes = _activation_shapes(model, x) if witness else []

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros(s, device=x.device) for s in shapes]

    return _search(_delta_attack, model, x, y, start, opts, upper, witness, zeros)


def input_margin(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opts: SearchOptions | None = None,
    *,
    start: torch.Tensor | None = None,
    witness: bool = False,
) -> MarginEstimate:
    """Estimate from above of the L2 input margin min ‖x' − x‖₂ s.t. F(x') misclassifies.

    The input-space margin of Sokolić et al. 2017, found by L2 PGD (x' kept in [0, 1]) inside a
    bisection on the radius, so it can be put beside the output and all-layer margins.

    Args:
        model, x, y, opts, witness: as in :func:`all_layer_margin` (the witness is x').
        start: first radius per example (default: the linearised margin gamma/‖∇_x gamma‖₂).

    Returns:
        :class:`MarginEstimate` in input (pixel, [0, 1]) units.
    """
    opts = opts or SearchOptions()
    if start is None:
        with eval_mode(model), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            gamma = output_margin(model(xg), y)
            (g,) = torch.autograd.grad(gamma.sum(), xg)
        start = (gamma.detach().abs() / g.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(1e-3, 1)
    return _search(_input_attack, model, x, y, start, opts, None, witness,
                   lambda: x.detach().clone())


def kappa(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Kappa:
    """κ_i(x, y) = s_i(x)·κ_{k←i}(x)/gamma(F(x), y) at every perturbation point (Lemma 3.1).

    With δ_i scaled by s_i = ‖h_i‖₂, ∂F/∂δ_i at δ = 0 is s_i·∂F/∂h_i exactly, so one backward per
    class c through the zero δ's gives row c of s_i·J_i for every point at once. J_i has C rows,
    hence its spectral norm is the square root of the largest eigenvalue of the C×C Gram matrix
    J_i J_iᵀ (float64); no power iteration. Cost: one forward and C backward passes; memory: C
    copies of the activations (lower the batch size for wide networks with many classes).

    Args:
        model: a registered model; x: (B, C, H, W) in [0, 1]; y: (B,).

    Returns:
        :class:`Kappa` with (B, P) scales, Jacobian norms and κ's.
    """
    x, y = x.detach(), y.detach()
    with eval_mode(model), torch.enable_grad(), perturb(model) as p:
        logits = model(x).float()
        scales = torch.stack([s.detach() for s in p.scales], 1)
        num_classes = logits.shape[1]
        rows: list[list[torch.Tensor]] = [[] for _ in p.deltas]
        for c in range(num_classes):
            grads = torch.autograd.grad(logits[:, c].sum(), p.deltas,
                                        retain_graph=c < num_classes - 1)
            for i, g in enumerate(grads):
                rows[i].append(g.flatten(1))
        names = list(p.names)
    gamma = output_margin(logits.detach(), y)
    norms = []
    for r in rows:
        m = torch.stack(r, 1).double()  # (B, C, D_i) = s_i·J_i per example
        gram = m @ m.transpose(1, 2)
        norms.append(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt().float())
    s_jac = torch.stack(norms, 1)  # s_i·κ_{k←i}
    jac = s_jac / scales.clamp_min(1e-30)
    kap = torch.where(per_example(gamma > 0, s_jac), s_jac / gamma.clamp_min(1e-30)[:, None],
                      torch.full_like(s_jac, math.inf))
    return Kappa(names, gamma, scales, jac, kap)


def pgd_neighbourhood(attack: PGD, x: torch.Tensor, y: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every iterate of every restart of ``attack`` on (x, y): the candidates x' of B_adv(x).

    Uses the attack's own hyperparameters and generator (:meth:`robust_amo.attacks.PGD.iterates`);
    the random start x_0 of each restart is a candidate too.
    No early stop: a misclassified iterate is still a candidate (it makes m_adv 0). The model is
    in eval mode while the attack computes its gradients.

    Yields:
        (B, C, H, W) tensors in B_adv(x), ``restarts·(steps + 1)`` of them.
    """
    return attack.iterates(x, y)


def adversarial_margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: PGD,
    opts: SearchOptions | None = None,
    *,
    clean_margin: torch.Tensor | None = None,
    clean_kappa: Kappa | None = None,
) -> AdversarialMargins:
    """m_adv and κ_adv over the PGD neighbourhood (Wei & Ma Section 4, Theorem 4.1, Lemma E.2).

    Candidates are x itself and every PGD iterate (:func:`pgd_neighbourhood`). m_adv is the
    smallest all-layer margin estimate over them, 0 as soon as one is misclassified; each
    candidate is first attacked at the current minimum and bisected only if it can lower it.
    κ_adv,i is the largest κ_i over them, +inf as soon as one is misclassified (κ_i → ∞ as
    gamma → 0+ on the way to the boundary).

    Args:
        model: a registered model; x, y: the batch.
        attack: the PGD that defines B_adv (eps, steps, restarts, norm, generator).
        opts: search options of the all-layer margin estimate.
        clean_margin, clean_kappa: the values at x when already computed (saves the work).

    Returns:
        :class:`AdversarialMargins`.
    """
    opts = opts or SearchOptions()
    x, y = x.detach(), y.detach()
    kap = clean_kappa if clean_kappa is not None else kappa(model, x, y)
    if clean_margin is None:
        clean_margin = all_layer_margin(model, x, y, opts, start=kap.first_order_margin).value
    best = clean_margin.clone()
    kadv = kap.kappa.clone()
    robust = kap.gamma > 0
    count = 1
    for xc in pgd_neighbourhood(attack, x, y):
        count += 1
        kc = kappa(model, xc, y)
        kadv = torch.maximum(kadv, kc.kappa)
        robust &= kc.gamma > 0
        best = torch.where(kc.gamma > 0, best, torch.zeros_like(best))
        est = all_layer_margin(model, xc, y, opts, start=kc.first_order_margin, upper=best)
        best = torch.minimum(best, est.value)
    return AdversarialMargins(best, kadv, robust, count, kap.names)


def margins_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: PGD | None,
    opts: SearchOptions | None = None,
    *,
    input_l2: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every per-example quantity of ``robust-amo margins`` for one batch.

    Args:
        model, x, y: as in :func:`all_layer_margin`.
        attack: the PGD defining the neighbourhood for m_adv and κ_adv (None: skip them).
        opts: search options of the attack-based estimates.
        input_l2: also estimate the L2 input margin.

    Returns:
        ``(columns, names)``: columns of shape (B,) or (B, P) keyed ``pred``, ``output_margin``,
        ``all_layer_margin``, ``all_layer_margin_lower``, ``first_order_margin``,
        ``kappa_norm``, ``scale``, ``jac_norm``, ``kappa`` and, when asked for,
        ``input_margin_l2``, ``adv_all_layer_margin``, ``robust``, ``kappa_adv``,
        ``kappa_adv_norm``, ``first_order_adv_margin``; ``names`` are the P points.
    """
    opts = opts or SearchOptions()
    x, y = x.detach(), y.detach()
    with eval_mode(model), torch.no_grad():
        logits = model(x).float()
    kap = kappa(model, x, y)
    alm = all_layer_margin(model, x, y, opts, start=kap.first_order_margin)
    cols: dict[str, torch.Tensor] = {
        "pred": logits.argmax(1),
        "output_margin": output_margin(logits, y),
        "all_layer_margin": alm.value,
        "all_layer_margin_lower": alm.lower,
        "first_order_margin": kap.first_order_margin,
        "kappa_norm": kap.norm,
        "scale": kap.scales,
        "jac_norm": kap.jac_norms,
        "kappa": kap.kappa,
    }
    if input_l2:
        cols["input_margin_l2"] = input_margin(model, x, y, opts).value
    if attack is not None:
        adv = adversarial_margins(model, x, y, attack, opts, clean_margin=alm.value,
                                  clean_kappa=kap)
        cols.update(adv_all_layer_margin=adv.margin, robust=adv.robust,
                    kappa_adv=adv.kappa_adv, kappa_adv_norm=adv.kappa_adv_norm,
                    first_order_adv_margin=1.0 / adv.kappa_adv_norm)
    return cols, kap.names
