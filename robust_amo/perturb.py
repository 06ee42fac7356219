"""All-layer perturbations through forward hooks (Wei & Ma 2020, Algorithm 1 FORWARDPERTURB).

Inside ``with perturb(model) as p:`` every perturbation point j declared by the model computes
h_j ← h_j + ‖h_j‖₂ · δ_j, where ‖h_j‖₂ is the L2 norm of each example's whole activation
(flattened) and stays in the autograd graph (docs/algorithms.md, "Perturbation points"). The
architectures stay plain: nothing changes once the context exits, also on error.

δ_j has the shape of h_j (channels_last preserved) and is created zero-filled and requiring grad at
the first forward unless given. By default it is kept in float32 even when the forward runs under
bf16 autocast (float64 for a float64 model); ``perturb(..., delta_dtype="activation")`` stores a
created δ_j in bf16 when h_j is bf16 (robust AMO's joint attack does: half the memory of δ and
of ∇δ), the norm, the product and the δ update still computed in float32. With every δ_j = 0 the
perturbed forward equals the plain forward exactly, in either dtype.

The point operation runs in one of two equivalent kernels: the reference (plain torch ops, autograd
differentiates the norm, the product and the sum separately) or the fused
:class:`PerturbPoint` (one autograd node per point whose backward is three elementwise passes
over the activation, written in torch ops so that double backward works). :func:`fused_hook`
chooses between them; docs/benchmarks.md has the measurements behind the default. Inside
``compiled_hook(True)`` the fused point's elementwise passes run as ``torch.compile`` kernels
(:func:`compiled_hook`): the same formulas, one loop each instead of a dozen small ops, with a
clean fallback to the eager ops wherever compilation is unavailable or fails.

:func:`delta_step` is the one update of δ that robust AMO, clean AMO, the margin estimates and
the robustness integration share: δ_j ← shrink·δ_j + step·∇δ_j.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DeltaDtype = Literal["wide", "activation"]
"""Dtype of a created δ_j: ``"wide"``, float32 or wider (the activation's work dtype);
``"activation"``, bf16 where the activation is bf16 (else as ``"wide"``)."""


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision activations, the activation's own dtype otherwise (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _delta_dtype(activation: torch.dtype, kind: DeltaDtype) -> torch.dtype:
    """The dtype of a δ created for an activation of dtype ``activation``.

    Only bf16 is stored narrow: it has float32's exponent range, so the small δ steps of a
    batch-mean loss cannot underflow as they could in float16.
    """
    if kind == "activation" and activation == torch.bfloat16:
        return activation
    return _work_dtype(activation)


def example_norm(h: torch.Tensor) -> torch.Tensor:
    """‖h‖₂ per example over all non-batch dimensions, in float32 or wider: (B,)."""
    return torch.linalg.vector_norm(h.to(_work_dtype(h.dtype)), dim=tuple(range(1, h.dim())))


def _per_example(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) viewed as (B, 1, ..., 1) to broadcast over ``like``."""
    return s.view(-1, *([1] * (like.dim() - 1)))


def perturb_reference(h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + ‖h‖₂·δ, ‖h‖₂)`` in plain torch ops (the reference the fused kernel is tested on).

    Args:
        h: the activation (B, ...), any float dtype; d: δ, same shape, float32 or wider, or
            bf16 (then s·δ is still formed in float32 and rounded once, into h's dtype).

    Returns:
        the perturbed activation in ``h``'s dtype, and the per-example norm (B,) in float32 or
        wider, both in the autograd graph.
    """
    s = example_norm(h)
    return _perturbed(h, d, s), s


def _perturbed(h: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """h + s·δ with s·δ formed in float32 or wider and rounded once into h's dtype."""
    return h + (_per_example(s, h) * d).to(h.dtype)


class PerturbPoint(torch.autograd.Function):
    """Fused ``(h, δ) -> (h + ‖h‖₂·δ, ‖h‖₂)``: one autograd node instead of five.

    Forward: the same ops as :func:`perturb_reference` (bit-identical outputs). Backward, with
    g the gradient of the output, g_s that of the norm, s = ‖h‖₂ and c = (⟨g, δ⟩ + g_s)/s
    (0 where s = 0, as torch's norm backward):

        ∇δ = s·g,   ∇h = g + c·h.

    Only h, δ and s are saved (h in its own dtype: under bf16 the reference saves a float32 copy
    of h for the norm backward). The backward is written in differentiable torch ops on saved
    inputs and outputs, so a second backward (``create_graph=True``, as the Jacobian penalty
    over a perturbed forward needs) is exact; ``generate_vmap_rule`` lets it run under
    ``torch.func`` transforms and batched gradients.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return perturb_reference(h, d)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output) -> None:
        h, d = inputs
        ctx.save_for_backward(h, d, output[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_s: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, d, s = ctx.saved_tensors
        return _point_backward(ctx.needs_input_grad, g, g_s, h, d, s, from_output=False)


def _point_backward(needs: tuple[bool, ...], g: torch.Tensor, g_s: torch.Tensor,
                    saved: torch.Tensor, d: torch.Tensor, s: torch.Tensor, from_output: bool,
                    backend: str | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∇h and ∇δ of the point operation (see :class:`PerturbPoint`) from the saved h, or from
    the saved output out = h + s·δ when ``from_output``: then ∇h = g + c·out − (c·s)·δ, the
    same formula with h = out − s·δ expanded so that no h is materialised.

    ``backend``: run the formulas as one ``torch.compile`` kernel of that backend where
    possible (:func:`compiled_hook`); a backward that builds a graph (``create_graph=True``)
    always runs the differentiable eager ops, as compiled backwards are not differentiable.
    """
    args = (g, g_s, saved, d, s, bool(needs[0]), bool(needs[1]), from_output)
    if backend is not None and not torch.is_grad_enabled():
        return _run(backend, "backward", _point_backward_ops, *args)
    return _point_backward_ops(*args)


def _point_backward_ops(g: torch.Tensor, g_s: torch.Tensor, saved: torch.Tensor,
                        d: torch.Tensor, s: torch.Tensor, need_h: bool, need_d: bool,
                        from_output: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The formulas of :func:`_point_backward` in differentiable torch ops."""
    h_dtype = saved.dtype
    work = _work_dtype(h_dtype)
    gw = g.to(work)
    grad_h = grad_d = None
    if need_d:
        grad_d = (gw * _per_example(s, gw)).to(d.dtype)
    if need_h:
        dims = tuple(range(1, gw.dim()))
        c = (gw * d).sum(dims) + g_s
        # the divisor is 1 where s = 0 so that no 0/0 reaches a second backward either
        pos = s > 0
        c = torch.where(pos, c / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(c))
        grad_h = torch.addcmul(gw, saved.to(work), _per_example(c, gw))
        if from_output:
            grad_h = torch.addcmul(grad_h, d.to(work), _per_example(-c * s, gw))
        grad_h = grad_h.to(h_dtype)
    return grad_h, grad_d


class PerturbPointSavingOutput(PerturbPoint):
    """:class:`PerturbPoint` that saves its output instead of h: its backward uses
    h = out − ‖h‖₂·δ, expanded as ∇h = g + c·out − (c·‖h‖₂)·δ (float32 or wider).

    Where the next layer saves its input anyway (a BatchNorm, a convolution, a linear layer,
    a max-pool), autograd shares that storage, so the point keeps one activation fewer alive
    (docs/benchmarks.md, "Robust AMO's memory"). The h it stands for differs from h by the
    rounding of the output (half an ulp of h's dtype); the formula is the same and stays
    differentiable, so double backward is exact. The output must not be changed in place
    afterwards (autograd then raises at the backward): :func:`perturb` uses it only on request
    (``save_output=True``), which robust AMO makes for the package's own architectures.
    """

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output) -> None:
        h, d = inputs
        ctx.save_for_backward(output[0], d, output[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_s: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        out, d, s = ctx.saved_tensors
        return _point_backward(ctx.needs_input_grad, g, g_s, out, d, s, from_output=True)


def _forward(h: torch.Tensor, d: torch.Tensor, backend: str | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The point's forward, :func:`perturb_reference`, as one compiled kernel of ``backend``
    (None: eager ops): the norm's reduction reads h once, in its own dtype, instead of an eager
    float32 copy. The casts round where the eager ops round (``emulate_precision_casts``); the
    norm's summation order is the kernel's, so s and the output equal the eager ones up to
    that rounding (with δ = 0 the output is h exactly either way).
    """
    if backend is None:
        return perturb_reference(h, d)
    return _run(backend, "forward", perturb_reference, h, d)


_CLASSES: dict[tuple[bool, str], type[PerturbPoint]] = {}


def compiled_point(save_output: bool, backend: str) -> type[PerturbPoint]:
    """:class:`PerturbPoint` (or :class:`PerturbPointSavingOutput`) whose forward (norm, product
    and sum) and backward passes run as ``torch.compile`` kernels of ``backend``
    (:func:`compiled_hook`).

    The same formulas and roundings: the norm, the output, ∇δ and ∇h equal the eager ones up to
    the summation order of the norm and of ⟨g, δ⟩ (with δ = 0 the output is h exactly); a
    backward that builds a graph (double backward) runs the eager ops. One class per
    (save_output, backend), named ``Compiled<base>``.
    """
    key = (save_output, backend)
    if key not in _CLASSES:
        base = PerturbPointSavingOutput if save_output else PerturbPoint

        def forward(h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _forward(h, d, backend)

        def backward(ctx: Any, g: torch.Tensor, g_s: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            saved, d, s = ctx.saved_tensors
            return _point_backward(ctx.needs_input_grad, g, g_s, saved, d, s,
                                   from_output=save_output, backend=backend)

        _CLASSES[key] = type(f"Compiled{base.__name__}", (base,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
            "__doc__": f"{base.__name__} with {backend} kernels (see compiled_point)."})
    return _CLASSES[key]


# the torch.compile backend of the hook kernels, or None (eager ops) while compiled_hook is off
_COMPILED: list[str | None] = [None]
# backend -> kernel name -> compiled callable; a backend whose compilation failed maps to None
_KERNELS: dict[str, dict[str, Callable[..., Any]] | None] = {}


def compiled_hook_backend() -> str | None:
    """The ``torch.compile`` backend of the fused points created now, None for eager ops
    (:func:`compiled_hook`; off by default)."""
    return _COMPILED[-1]


@contextlib.contextmanager
def compiled_hook(enabled: bool, backend: str = "inductor") -> Iterator[None]:
    """Within the block, fused perturbation points installed without an explicit ``compiled=``
    run their elementwise passes as ``torch.compile`` kernels: the forward's norm, s·δ and sum
    as one reduction and one loop, the backward's ∇δ, ⟨g, δ⟩ and ∇h as one reduction and one
    loop, and :func:`delta_step` as one call for every point (docs/benchmarks.md, "Robust AMO's
    memory"). The results equal the eager ones up to the summation order of the reductions;
    the output at δ = 0 and the δ update bit for bit. Off by default.

    What stays eager: any backward that builds a graph (double backward stays exact), anything
    under ``torch.func`` transforms or inside a compiled region, and everything once a compilation
    has failed for this backend (one logged warning; the eager ops give the same results). The
    first use compiles (up to a minute on a CPU: inductor builds C++), so it pays off over a
    training run, not over one batch.

    Args:
        enabled: compiled kernels (True) or the eager ops (False).
        backend: the ``torch.compile`` backend (default ``"inductor"``; ``"aot_eager"``
            compiles in a second and runs the eager kernels, for tests).
    """
    _COMPILED.append(backend if enabled else None)
    try:
        yield
    finally:
        _COMPILED.pop()


def _run(backend: str, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through its compiled kernel, or eagerly where compiling is impossible or
    has failed (logged once per backend)."""
    kernels = _KERNELS.setdefault(backend, {})
    if kernels is None or torch.compiler.is_compiling() \
            or torch._C._are_functorch_transforms_active():
        return fn(*args)
    try:
        if name not in kernels:
            # dynamic shapes: one kernel for every point's shape and batch size; casts rounded
            # where the eager ops round them, so the outputs agree bit for bit where they can
            options = {"emulate_precision_casts": True} if backend == "inductor" else None
            kernels[name] = torch.compile(fn, backend=backend, dynamic=True, options=options)
        return kernels[name](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: run the eager ops
        first = str(e).splitlines()[0] if str(e) else ""
        log.warning("compiled perturbation kernels (%s) unavailable, running the eager ops: "
                    "%s: %s", backend, type(e).__name__, first)
        _KERNELS[backend] = None
        return fn(*args)


_FUSED = [True]


def fused_hook_enabled() -> bool:
    """Whether :func:`perturb` uses the fused :class:`PerturbPoint` by default."""
    return _FUSED[-1]


@contextlib.contextmanager
def fused_hook(enabled: bool) -> Iterator[None]:
    """Within the block, perturbations installed without an explicit ``fused=`` use the fused
    kernel (True) or the reference ops (False); the benchmarks measure both in one run."""
    _FUSED.append(bool(enabled))
    try:
        yield
    finally:
        _FUSED.pop()


def concat_norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_P)‖₂ per example over all tensors concatenated, float32 or wider: (B,)."""
    return torch.stack([example_norm(t) ** 2 for t in ts]).sum(0).sqrt()


def delta_step(
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    step: float | torch.Tensor,
    shrink: float = 1.0,
    *,
    requires_grad: bool = True,
    compiled: bool | None = None,
) -> list[torch.Tensor]:
    """The δ ascent step δ_j ← shrink·δ_j + step·∇δ_j at every perturbation point j.

    Robust AMO: shrink ρ, step η_δ (docs/algorithms.md, "Robust AMO"); clean AMO: shrink
    1 − η_p·λ, step η_p ("Clean AMO"); the all-layer margin search: shrink 1 and a per-example
    normalised step before its projection ("All-layer margin").

    Args:
        deltas: the current δ_j (any of them may require grad; they are detached).
        grads: ∇δ_j of the loss, one per point.
        step: a number, or a per-example (B,) tensor broadcast over each δ_j.
        shrink: the factor applied to δ first (default 1).
        requires_grad: the new δ's are leaves that require grad (default), ready for the next
            forward of the perturbed model.
        compiled: the updates of all points run as one ``torch.compile`` call (the same
            expressions and roundings, bit for bit) where possible; None (default): as
            :func:`compiled_hook` says.

    Returns:
        the new δ's in the dtypes of ``deltas``, computed without building a graph (a bf16 δ in
        float32, rounded once).

    Raises:
        ValueError: ``grads`` does not hold one gradient per δ.
    """
    backend = compiled_hook_backend()
    if compiled is not None:
        backend = (backend or "inductor") if compiled else None
    if len(deltas) != len(grads):
        raise ValueError(f"got {len(grads)} gradients for {len(deltas)} deltas")
    args = ([d.detach() for d in deltas], list(grads), step, shrink)
    with torch.no_grad():
        # every point in one compiled call: the per-call overhead is paid once, not per point
        out = (_delta_updates(*args) if backend is None
               else _run(backend, "delta_step", _delta_updates, *args))
    return [new.requires_grad_(requires_grad) for new in out]


def _delta_updates(deltas: list[torch.Tensor], grads: list[torch.Tensor], step: Any,
                   shrink: float) -> list[torch.Tensor]:
    """shrink·δ + step·∇δ for every point, each in δ's work dtype, rounded once into δ's dtype;
    a (B,) step is broadcast over each example."""
    out = []
    for d, g in zip(deltas, grads, strict=True):
        s = step.view(-1, *([1] * (g.dim() - 1))) if torch.is_tensor(step) else step
        # a bf16 δ is updated in float32 and rounded once; for float32/float64 δ's the casts
        # are no-ops and the update is the plain expression, bit for bit
        work = _work_dtype(d.dtype)
        out.append((shrink * d.to(work) + s * g.to(work)).to(d.dtype))
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The registered model inside DDP/compiled wrappers (``.module``/``._orig_mod``).

    Raises:
        TypeError: when no wrapped module declares ``perturbation_points()``.
    """
    inner = model
    while not hasattr(inner, "perturbation_points"):
        nxt = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if nxt is None:
            raise TypeError(f"{type(model).__name__} declares no perturbation_points()")
        inner = nxt
    return inner


class Perturbation:
    """State of an installed perturbation; ``deltas[j]`` belongs to ``names[j]``.

    Attributes:
        names: qualified module names of the perturbation points, in forward order.
        deltas: the δ_j tensors (activation shape; float32 or wider, or bf16 with
            ``delta_dtype="activation"``), ``None`` until created.
        scales: ‖h_j‖₂ (B,) seen in the latest forward (the s_j(x) of Wei & Ma Appendix C).
        create: create missing δ_j (zeros, ``requires_grad``) at the next forward.
        fused: the point operation runs as :class:`PerturbPoint` (else the reference ops).
        delta_dtype: the dtype of created δ's (:data:`DeltaDtype`).
        save_output: the fused point saves its output, not h (:class:`PerturbPointSavingOutput`).
        backend: the ``torch.compile`` backend of the fused point's kernels
            (:func:`compiled_point`), or None: eager ops.
    """

    def __init__(self, names: list[str], deltas: Sequence[torch.Tensor | None] | None,
                 requires_grad: bool, fused: bool = True, delta_dtype: DeltaDtype = "wide",
                 save_output: bool = False, backend: str | None = None) -> None:
        if delta_dtype not in ("wide", "activation"):
            raise ValueError(f"delta_dtype must be 'wide' or 'activation', got {delta_dtype!r}")
        self.names = names
        self.fused = fused
        self.delta_dtype = delta_dtype
        self.save_output = save_output
        self.backend = backend
        if deltas is not None and len(deltas) != len(names):
            raise ValueError(f"got {len(deltas)} deltas for {len(names)} perturbation points")
        self.deltas: list[torch.Tensor | None] = (
            list(deltas) if deltas is not None else [None] * len(names)
        )
        self.scales: list[torch.Tensor | None] = [None] * len(names)
        self.requires_grad = requires_grad
        self.create = True

    def reset(self) -> None:
        """Forget every δ (the next forward creates zeros again)."""
        self.deltas = [None] * len(self.names)

    def detached(self) -> list[torch.Tensor]:
        """The current δ's, detached (for the weight update of (robust) AMO)."""
        return [d.detach() if d is not None else None for d in self.deltas]

    def norm(self) -> torch.Tensor:
        """‖δ‖₂ per example over all points concatenated: (B,)."""
        return concat_norm([d for d in self.deltas if d is not None])

    def _hook(self, j: int):
        def hook(module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
            d = self.deltas[j]
            if d is None:
                if not self.create:
                    return out
                d = torch.zeros_like(out, dtype=_delta_dtype(out.dtype, self.delta_dtype))
                d.requires_grad_(self.requires_grad)
                self.deltas[j] = d
            if d.shape != out.shape:
                raise ValueError(
                    f"δ for {self.names[j]} has shape {tuple(d.shape)} but the activation has "
                    f"{tuple(out.shape)}; a Perturbation serves one batch shape (call reset())"
                )
            if not self.fused:
                out, self.scales[j] = perturb_reference(out, d)
            else:
                kernel = (compiled_point(self.save_output, self.backend) if self.backend
                          else PerturbPointSavingOutput if self.save_output else PerturbPoint)
                out, self.scales[j] = kernel.apply(out, d)
            return out

        return hook


@contextlib.contextmanager
def perturb(
    model: nn.Module,
    deltas: Sequence[torch.Tensor | None] | None = None,
    *,
    requires_grad: bool = True,
    fused: bool | None = None,
    delta_dtype: DeltaDtype = "wide",
    save_output: bool = False,
    compiled: bool | None = None,
) -> Iterator[Perturbation]:
    """Install δ hooks on ``model``'s perturbation points for the duration of the block.

    Args:
        model: a registered model (it has ``perturbation_points()``), or a DDP/compiled wrapper
            around one (``.module``/``._orig_mod``).
        deltas: one tensor (or None) per point; None: created zero-filled at the first forward.
        requires_grad: whether created δ's require grad (default True).
        fused: run the point operation as the fused :class:`PerturbPoint` (True) or as the
            reference ops (False); None (default): as :func:`fused_hook` says (fused).
        delta_dtype: ``"wide"`` (default): created δ's are float32 or wider; ``"activation"``:
            bf16 at bf16 activations (half the memory of δ and ∇δ under bf16 autocast).
        save_output: the fused point saves its output instead of h
            (:class:`PerturbPointSavingOutput`: one activation fewer where the next layer saves
            its input); only for models that never change a point's output in place.
        compiled: the fused point runs ``torch.compile`` kernels (True: of the backend
            :func:`compiled_hook` names, else inductor) or eager ops (False); None (default):
            as :func:`compiled_hook` says (eager unless inside ``compiled_hook(True)``).

    Yields:
        the :class:`Perturbation` whose ``deltas`` the hooks read at every forward.
    """
    points = unwrap(model).perturbation_points()
    backend = compiled_hook_backend()
    if compiled is not None:
        backend = (backend or "inductor") if compiled else None
    state = Perturbation([n for n, _ in points], deltas, requires_grad,
                         fused_hook_enabled() if fused is None else fused, delta_dtype,
                         save_output, backend)
    handles = []
    try:
        for j, (_, module) in enumerate(points):
            handles.append(module.register_forward_hook(state._hook(j)))
        yield state
    finally:
        for h in handles:
            h.remove()
