"""All-layer perturbation hooks (docs/algorithms.md, "Perturbation points")."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from robust_amo import perturb as perturb_mod
from robust_amo.attacks import PGD, RobustAMOAttack
from robust_amo.methods import pgd_loss, robust_amo_loss
from robust_amo.models import create_model
from robust_amo.perturb import (
    PerturbPoint,
    PerturbPointSavingOutput,
    compiled_hook,
    compiled_hook_backend,
    compiled_point,
    delta_step,
    example_norm,
    fused_hook,
    fused_hook_enabled,
    perturb,
    perturb_reference,
    unwrap,
)
from tests.helpers import batch, same_state, sgd_step, tiny_model

ARCHS = [("tiny-cnn", (1, 8, 8)), ("tiny-mlp", (1, 8, 8)), ("tiny-wrn", (3, 8, 8)),
         ("linear", (1, 8, 8))]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_zero_delta_forward_is_exact_and_hooks_removed(arch, shape):
    torch.manual_seed(0)
    model = create_model(arch, 10, input_shape=shape).eval()
    x = torch.rand(6, *shape)
    plain = model(x)
    with perturb(model) as p:
        perturbed = model(x)
        assert len(p.deltas) == len(model.perturbation_points())
        assert all(d is not None and d.dtype == torch.float32 and d.requires_grad
                   for d in p.deltas)
    assert torch.equal(plain, perturbed)
    assert _hook_count(model) == 0


def test_hooks_removed_on_error_and_nonzero_delta_changes_output():
    model = create_model("tiny-cnn", 10, input_shape=(1, 8, 8)).eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(RuntimeError, match="boom"), perturb(model):
        model(x)
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    with perturb(model) as p:
        model(x)
        shapes = [d.shape for d in p.deltas]
    deltas = [torch.full(s, 0.1) for s in shapes]
    with perturb(model, deltas):
        out = model(x)
    assert not torch.allclose(out, model(x))


def test_perturbed_layer_is_h_plus_norm_times_delta():
    """One-layer check of h ← h + ‖h‖₂·δ on the linear model (its point is the input itself)."""
    torch.manual_seed(1)
    model = create_model("linear", 3, input_shape=(1, 2, 2)).eval()
    x = torch.rand(5, 1, 2, 2)
    d = torch.randn(5, 4)
    with perturb(model, [d]):
        out = model(x)
    h = model.normalize(x).flatten(1)
    expected = model.classifier(h + h.norm(dim=1, keepdim=True) * d)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("arch,shape", [("tiny-cnn", (1, 8, 8)), ("tiny-wrn", (3, 8, 8))])
def test_delta_gradient_matches_finite_differences(arch, shape):
    torch.manual_seed(2)
    model = create_model(arch, 10, input_shape=shape).double().eval()
    x = torch.rand(3, *shape, dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    with perturb(model) as p:
        model(x)
        deltas = [0.05 * torch.randn_like(d) for d in p.deltas]
    assert all(d.dtype == torch.float64 for d in deltas)

    def loss_at(ds):
        with perturb(model, ds):
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    leaves = [d.clone().requires_grad_(True) for d in deltas]
    grads = torch.autograd.grad(loss_at(leaves), leaves)
    gen = torch.Generator().manual_seed(3)
    h = 1e-6
    for j, d in enumerate(deltas):
        u = torch.randn(d.shape, generator=gen, dtype=torch.float64)
        plus = [e + h * u if i == j else e for i, e in enumerate(deltas)]
        minus = [e - h * u if i == j else e for i, e in enumerate(deltas)]
        fd = (loss_at(plus) - loss_at(minus)) / (2 * h)
        analytic = (grads[j] * u).sum()
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-7)


def test_channels_last_and_wrapper():
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert unwrap(wrapper) is model
    with perturb(wrapper) as p:
        out = model(x)
    assert torch.equal(out, model(x))
    assert p.deltas[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(example_norm(torch.ones(2, 3, 4)), torch.full((2,), 12 ** 0.5))
    with pytest.raises(TypeError, match="perturbation_points"):
        unwrap(torch.nn.Linear(2, 2))


# --- the fused point operation (PerturbPoint) against the reference ops ---------------------

def _hd(shape, dtype=torch.float64, seed=0, zero_example=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g, dtype=dtype)
    if zero_example:
        h[1] = 0  # an all-zero activation: the norm's gradient is taken as 0 there (torch's rule)
    d = 0.3 * torch.randn(shape, generator=g, dtype=torch.promote_types(dtype, torch.float32))
    return h.requires_grad_(True), d.requires_grad_(True)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (4, 5)])
def test_fused_point_gradcheck_and_gradgradcheck(shape):
    """First and second derivatives of both outputs (perturbed h and ‖h‖₂) by finite
    differences in float64, including the ‖h‖₂ output's own gradient."""
    h, d = _hd(shape)
    assert torch.autograd.gradcheck(PerturbPoint.apply, (h, d))
    assert torch.autograd.gradgradcheck(PerturbPoint.apply, (h, d))
    # the zero-norm example sits on the norm's kink: only the first derivative is defined there
    h0, d0 = _hd(shape, zero_example=True)
    assert torch.autograd.gradcheck(lambda a, b: PerturbPoint.apply(a, b)[0], (h0, d0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_point_equals_the_reference(dtype):
    h, d = _hd((4, 3, 5, 5), dtype, seed=1, zero_example=True)
    out_f, s_f = PerturbPoint.apply(h, d)
    out_r, s_r = perturb_reference(h, d)
    # the forward runs the reference's ops: bit-identical
    assert torch.equal(out_f, out_r) and torch.equal(s_f, s_r) and out_f.dtype == dtype
    g = torch.randn(out_f.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gs = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=s_f.dtype)
    grads_f = torch.autograd.grad((out_f * g).sum() + (s_f * gs).sum(), (h, d))
    grads_r = torch.autograd.grad((out_r * g).sum() + (s_r * gs).sum(), (h, d))
    # the backward rounds once where the reference rounds twice: equal up to rounding
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(grads_f, grads_r, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert torch.equal(grads_f[0][1], grads_r[0][1])  # zero-norm example: ∇h = g exactly


def test_fused_point_double_backward_through_a_model_equals_the_reference():
    """A gradient penalty over a perturbed forward (create_graph, as Jacobian-LM with the
    robustness plugin's δ's) gives the reference's weight gradients."""
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    with perturb(model) as p:
        model(x)
        deltas = [0.05 * torch.randn_like(d) for d in p.deltas]
    got = []
    for fused in (True, False):
        xi = x.clone().requires_grad_(True)
        with perturb(model, deltas, requires_grad=False, fused=fused):
            out = model(xi)
        (gx,) = torch.autograd.grad(out[:, 0].sum(), xi, create_graph=True)
        got.append(torch.autograd.grad(gx.square().sum(), list(model.parameters()),
                                       allow_unused=True, materialize_grads=True))
    assert any(g.abs().sum() > 0 for g in got[0])
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_point_under_vmap_and_batched_gradients():
    h, d = _hd((3, 2, 4, 4), seed=4)
    j_f = torch.func.jacrev(lambda a: PerturbPoint.apply(a, d)[0].sum((1, 2, 3)))(h)
    j_r = torch.func.jacrev(lambda a: perturb_reference(a, d)[0].sum((1, 2, 3)))(h)
    torch.testing.assert_close(j_f, j_r)
    cot = torch.randn(4, 3, 2, 4, 4, dtype=torch.float64)
    (b_f,) = torch.autograd.grad(PerturbPoint.apply(h, d)[0], h, cot, is_grads_batched=True)
    (b_r,) = torch.autograd.grad(perturb_reference(h, d)[0], h, cot, is_grads_batched=True)
    torch.testing.assert_close(b_f, b_r)


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_fused_point_saves_the_bf16_activation_not_a_float32_copy():
    h = torch.randn(4, 8, 6, 6).bfloat16().requires_grad_(True)
    d = torch.zeros(4, 8, 6, 6, requires_grad=True)
    fused = _saved_bytes(lambda: PerturbPoint.apply(h, d))
    ref = _saved_bytes(lambda: perturb_reference(h, d))
    n = h.numel()
    assert fused < ref
    assert fused <= 2 * n + 4 * n + 64  # h in bf16, δ in float32, the (B,) norm
    assert ref >= 4 * n + 4 * n  # the reference keeps a float32 copy of h for the norm


def test_fused_hook_switch_and_explicit_choice():
    model = create_model("tiny-cnn", 10, input_shape=(1, 8, 8)).eval()
    x = torch.rand(2, 1, 8, 8)
    assert fused_hook_enabled()
    with fused_hook(False):
        assert not fused_hook_enabled()
        with perturb(model) as p:
            assert not p.fused
            out = model(x)
            assert out.grad_fn is not None
        with perturb(model, fused=True) as p:
            assert p.fused
    assert fused_hook_enabled()
    with perturb(model) as p:
        model(x)
        assert p.fused
        # the δ's gradient flows through the fused node
        g = torch.autograd.grad(model(x).sum(), p.deltas[0])[0]
    assert g.shape == p.deltas[0].shape


def test_delta_step_updates_a_bf16_delta_in_float32_rounded_once():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(64, 33, generator=g).bfloat16()
    grad = torch.randn(64, 33, generator=g).bfloat16()
    (new,) = delta_step([d], [grad], 0.37, 0.92)
    want = (0.92 * d.float() + 0.37 * grad.float()).bfloat16()
    assert new.dtype == torch.bfloat16 and new.requires_grad
    assert torch.equal(new.detach(), want)
    # bf16 arithmetic rounds three times and differs: the test sees the float32 accumulator
    assert not torch.equal(want, 0.92 * d + 0.37 * grad)
    # float32 δ's: the plain expression, bit for bit (per-example step too)
    d32, g32, step = d.float(), grad.float(), torch.rand(64, generator=g)
    (new32,) = delta_step([d32], [g32], step, 0.92)
    assert new32.dtype == torch.float32
    assert torch.equal(new32.detach(), 0.92 * d32 + step[:, None] * g32)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_activation_dtype_deltas_are_bf16_only_at_bf16_activations(fused):
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).eval()
    x = torch.rand(2, 3, 8, 8)
    with perturb(model, delta_dtype="activation", fused=fused) as p:
        plain = model(x)
        assert all(d.dtype == torch.float32 for d in p.deltas)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        with perturb(model, delta_dtype="activation", fused=fused) as p:
            out = model(x)
            assert all(d.dtype == torch.bfloat16 and d.requires_grad for d in p.deltas)
            # zero bf16 δ's: the perturbed forward is the plain one exactly
            assert torch.equal(out, ref)
            grads = torch.autograd.grad(out.float().square().sum(), p.deltas)
    assert all(gr.dtype == torch.bfloat16 and gr.abs().sum() > 0 for gr in grads)
    assert plain.dtype == torch.float32
    with pytest.raises(ValueError, match="delta_dtype"), perturb(model, delta_dtype="half"):
        pass


def test_fused_point_with_a_bf16_delta_saves_two_bf16_tensors_and_matches_float32():
    h = torch.randn(4, 8, 6, 6).bfloat16().requires_grad_(True)
    d = (0.01 * torch.randn(4, 8, 6, 6)).bfloat16().requires_grad_(True)
    n = h.numel()
    assert _saved_bytes(lambda: PerturbPoint.apply(h, d)) <= 2 * n + 2 * n + 64
    out, s = PerturbPoint.apply(h, d)
    out32, s32 = PerturbPoint.apply(h, d.float())
    # s·δ is formed in float32 either way: the same forward
    assert torch.equal(out, out32) and torch.equal(s, s32)
    gd, gh = torch.autograd.grad(out.float().square().sum(), (d, h))
    d32 = d.detach().float().requires_grad_(True)
    gd32, gh32 = torch.autograd.grad(PerturbPoint.apply(h, d32)[0].float().square().sum(),
                                     (d32, h))
    assert gd.dtype == torch.bfloat16 and torch.equal(gd, gd32.bfloat16())
    assert torch.equal(gh, gh32)


# --- the point that saves its output (PerturbPointSavingOutput) -------------------------------

@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (4, 5)])
def test_output_saving_point_gradcheck_and_gradgradcheck(shape):
    h, d = _hd(shape, seed=6)
    assert torch.autograd.gradcheck(PerturbPointSavingOutput.apply, (h, d))
    assert torch.autograd.gradgradcheck(PerturbPointSavingOutput.apply, (h, d))
    h0, d0 = _hd(shape, seed=6, zero_example=True)
    assert torch.autograd.gradcheck(lambda a, b: PerturbPointSavingOutput.apply(a, b)[0],
                                    (h0, d0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_saving_point_equals_the_reference(dtype):
    h, d = _hd((4, 3, 5, 5), dtype, seed=1, zero_example=True)
    out_o, s_o = PerturbPointSavingOutput.apply(h, d)
    out_r, s_r = perturb_reference(h, d)
    assert torch.equal(out_o, out_r) and torch.equal(s_o, s_r)
    g = torch.randn(out_o.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gs = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=s_o.dtype)
    grads_o = torch.autograd.grad((out_o * g).sum() + (s_o * gs).sum(), (h, d))
    grads_r = torch.autograd.grad((out_r * g).sum() + (s_r * gs).sum(), (h, d))
    # h is recomputed from the rounded output: equal up to one rounding of h's dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(grads_o, grads_r, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # ∇δ = ‖h‖·g needs no h: bit-identical to the h-saving point
    out_f, s_f = PerturbPoint.apply(h, d)
    (gd_f,) = torch.autograd.grad((out_f * g).sum() + (s_f * gs).sum(), d)
    assert torch.equal(grads_o[1], gd_f)


def test_output_saving_point_shares_the_next_layers_saved_input():
    """Followed by a layer that saves its input, the point saves no activation of its own."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).bfloat16()
    h = torch.randn(4, 8, 6, 6).bfloat16().requires_grad_(True)
    d = torch.zeros(4, 8, 6, 6, dtype=torch.bfloat16)
    n = h.numel()
    weights = sum(t.numel() * 2 for t in conv.parameters())
    plain = _saved_bytes(lambda: conv(PerturbPoint.apply(h, d)[0]))
    saving = _saved_bytes(lambda: conv(PerturbPointSavingOutput.apply(h, d)[0]))
    assert plain - saving == 2 * n  # h in bf16
    assert saving <= 2 * n + 2 * n + weights + 64  # the shared output, δ, the norm, the weights


def test_output_saving_point_refuses_an_in_place_change_of_its_output():
    h, d = _hd((2, 3), seed=7)
    out, _ = PerturbPointSavingOutput.apply(h, d)
    out.relu_()
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


@pytest.mark.parametrize("save_output", [True, False])
def test_perturb_save_output_choice(save_output):
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).eval()
    x = torch.rand(2, 3, 8, 8)
    with perturb(model, save_output=save_output) as p:
        out = model(x)
        assert p.save_output is save_output
        nodes = []
        stack, seen = [out.grad_fn], set()
        while stack:
            f = stack.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            nodes.append(type(f).__name__)
            stack.extend(nf for nf, _ in f.next_functions)
    kinds = {n for n in nodes if "PerturbPoint" in n}
    assert kinds == ({"PerturbPointSavingOutputBackward"} if save_output
                     else {"PerturbPointBackward"})


def test_output_saving_point_under_vmap_and_batched_gradients():
    h, d = _hd((3, 2, 4, 4), seed=4)
    j_o = torch.func.jacrev(lambda a: PerturbPointSavingOutput.apply(a, d)[0].sum((1, 2, 3)))(h)
    j_r = torch.func.jacrev(lambda a: perturb_reference(a, d)[0].sum((1, 2, 3)))(h)
    torch.testing.assert_close(j_o, j_r)
    jd_o = torch.func.jacrev(lambda b: PerturbPointSavingOutput.apply(h, b)[0].sum((1, 2, 3)))(d)
    jd_r = torch.func.jacrev(lambda b: perturb_reference(h, b)[0].sum((1, 2, 3)))(d)
    torch.testing.assert_close(jd_o, jd_r)
    cot = torch.randn(4, 3, 2, 4, 4, dtype=torch.float64)
    (b_o,) = torch.autograd.grad(PerturbPointSavingOutput.apply(h, d)[0], h, cot,
                                 is_grads_batched=True)
    (b_r,) = torch.autograd.grad(perturb_reference(h, d)[0], h, cot, is_grads_batched=True)
    torch.testing.assert_close(b_o, b_r)


# --- compiled kernels at the fused points (compiled_hook) --------------------------------------

def _inductor_or_skip() -> None:
    """Skip where inductor cannot build CPU kernels (no C++ compiler): the fallback test covers
    that case."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler on the CPU")


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Each test compiles (or fails to) on its own: no kernel or failure carried over."""
    monkeypatch.setattr(perturb_mod, "_KERNELS", {})


def _grads(kernel, h, d, g, gs):
    out, s = kernel.apply(h, d)
    return out, s, torch.autograd.grad((out * g).sum() + (s * gs).sum(), (h, d))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save_output", [False, True], ids=["saves-h", "saves-output"])
def test_inductor_point_equals_the_eager_point(dtype, save_output, fresh_kernels):
    """The shipped kernels (inductor, C++ on the CPU): the norm, the output, ∇δ and ∇h equal the
    eager ones up to the summation order of the norm and of ⟨g, δ⟩; with δ = 0 the output is h
    exactly; the zero-norm example's ∇h is g exactly."""
    _inductor_or_skip()
    h, d = _hd((4, 3, 5, 5), dtype, seed=1, zero_example=True)
    d = d.detach().to(dtype).requires_grad_(True)  # bf16 δ at a bf16 activation, as robust AMO
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gs = torch.randn(4, generator=torch.Generator().manual_seed(3))
    eager = PerturbPointSavingOutput if save_output else PerturbPoint
    out_e, s_e, (gh_e, gd_e) = _grads(eager, h, d, g, gs)
    out_c, s_c, (gh_c, gd_c) = _grads(compiled_point(save_output, "inductor"), h, d, g, gs)
    assert perturb_mod._KERNELS["inductor"] is not None, "inductor failed: the fallback ran"
    assert set(perturb_mod._KERNELS["inductor"]) == {"forward", "backward"}
    # s in float32 either way: only the reduction's order differs
    torch.testing.assert_close(s_c, s_e, rtol=1e-6, atol=0)
    # out = h + s·δ and ∇δ = s·g: a rounding step of h's dtype apart (on the scale of the
    # largest output: h and s·δ cancel in places)
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7}[dtype]
    scale = float(out_e.detach().abs().max())
    torch.testing.assert_close(out_c, out_e, rtol=ulp, atol=4 * ulp * scale)
    torch.testing.assert_close(gd_c, gd_e, rtol=2 * ulp, atol=0)
    assert out_c.dtype == dtype and gd_c.dtype == dtype
    zero_out, _ = compiled_point(save_output, "inductor").apply(h, torch.zeros_like(d))
    assert torch.equal(zero_out, h)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gh_c, gh_e, rtol=tol, atol=tol)
    assert torch.equal(gh_c[1], g[1])
    # a wrong kernel would not pass: a δ-free ∇h (c = 0) is far from it
    assert not torch.allclose(gh_c.float(), g.float(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_inductor_hook_keeps_zero_eta_robust_amo_equal_to_pgd_under_cpu_bf16(fresh_kernels):
    """η_δ = 0 with the compiled points under bf16 autocast: PGD training's loss and weights
    bit for bit (zero bf16 δ's, float32 s·δ, one rounding, as in the eager kernels)."""
    _inductor_or_skip()
    x, y = batch(n=8, shape=(3, 8, 8))
    m_pgd = tiny_model("tiny-wrn", (3, 8, 8))
    m_amo = copy.deepcopy(m_pgd)
    pgd = PGD(m_pgd, eps=0.1, step_size=0.03, steps=2,
              generator=torch.Generator().manual_seed(7))
    joint = RobustAMOAttack.from_pgd(
        PGD(m_amo, eps=0.1, step_size=0.03, steps=2,
            generator=torch.Generator().manual_seed(7)), eta_delta=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), compiled_hook(True):
        loss_pgd = sgd_step(m_pgd, functools.partial(pgd_loss, attack=pgd), x, y)
        loss_amo = sgd_step(m_amo, functools.partial(robust_amo_loss, attack=joint), x, y)
    assert perturb_mod._KERNELS["inductor"], "inductor failed: the fallback ran"
    assert torch.equal(loss_pgd, loss_amo)
    assert same_state(m_pgd, m_amo)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (4, 5)])
@pytest.mark.parametrize("save_output", [False, True], ids=["saves-h", "saves-output"])
def test_compiled_point_gradcheck_and_gradgradcheck(shape, save_output, fresh_kernels):
    """First derivatives through the compiled backward, second ones through the eager ops
    (a backward that builds a graph never runs a compiled kernel), by finite differences."""
    kernel = compiled_point(save_output, "aot_eager")
    h, d = _hd(shape, seed=6)
    assert torch.autograd.gradcheck(kernel.apply, (h, d))
    assert perturb_mod._KERNELS["aot_eager"] and "backward" in perturb_mod._KERNELS["aot_eager"]
    assert torch.autograd.gradgradcheck(kernel.apply, (h, d))
    h0, d0 = _hd(shape, seed=6, zero_example=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel.apply(a, b)[0], (h0, d0))


def test_compiled_point_double_backward_runs_the_eager_ops(monkeypatch, fresh_kernels):
    calls = []
    real = perturb_mod._run

    def spy(backend, name, fn, *args):
        calls.append(name)
        return real(backend, name, fn, *args)

    monkeypatch.setattr(perturb_mod, "_run", spy)
    h, d = _hd((3, 4), seed=8)
    out, _ = compiled_point(True, "aot_eager").apply(h, d)
    (gh,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)
    assert calls == ["forward"]  # the graph-building backward did not call a kernel
    (ghh,) = torch.autograd.grad(gh.sum(), h)
    out_r, _ = perturb_reference(h, d)
    (gh_r,) = torch.autograd.grad(out_r.square().sum(), h, create_graph=True)
    torch.testing.assert_close(ghh, torch.autograd.grad(gh_r.sum(), h)[0])


def test_compiled_hook_switch_and_explicit_choice(fresh_kernels):
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).eval()
    x = torch.rand(2, 3, 8, 8)
    assert compiled_hook_backend() is None
    with perturb(model) as p:
        assert p.backend is None
    with compiled_hook(True, backend="aot_eager"):
        assert compiled_hook_backend() == "aot_eager"
        with perturb(model, save_output=True) as p:
            assert p.backend == "aot_eager"
            out = model(x)
        with perturb(model, compiled=False) as p:
            assert p.backend is None
        with compiled_hook(False), perturb(model, compiled=True) as p:
            assert p.backend == "inductor"
    assert compiled_hook_backend() is None
    stack, seen, kinds = [out.grad_fn], set(), set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if "PerturbPoint" in type(f).__name__:
            kinds.add(type(f).__name__)
        stack.extend(nf for nf, _ in f.next_functions)
    assert kinds == {"CompiledPerturbPointSavingOutputBackward"}
    # zero δ's: the compiled points' forward is the plain forward exactly
    assert torch.equal(out, model(x))


def test_compiled_point_falls_back_to_the_eager_ops_once(monkeypatch, fresh_kernels, caplog):
    """A backend that cannot compile (here: one that does not exist; elsewhere: no C++
    compiler, an unsupported platform) costs one warning; the results are the eager ones."""
    h, d = _hd((4, 3, 5, 5), seed=1)
    g = torch.randn(h.shape, dtype=h.dtype)
    gs = torch.zeros(4, dtype=h.dtype)
    with caplog.at_level("WARNING", logger="robust_amo.perturb"):
        got = _grads(compiled_point(False, "no-such-backend"), h, d, g, gs)
        again = _grads(compiled_point(False, "no-such-backend"), h, d, g, gs)
    want = _grads(PerturbPoint, h, d, g, gs)
    for a, b, c in zip(got[:2] + got[2], want[:2] + want[2], again[:2] + again[2], strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert perturb_mod._KERNELS["no-such-backend"] is None
    warnings = [r for r in caplog.records if "compiled perturbation kernels" in r.message]
    assert len(warnings) == 1 and "no-such-backend" in warnings[0].message


def test_compiled_kernel_failing_at_run_time_falls_back(monkeypatch, fresh_kernels):
    def broken(fn, **_):
        def run(*a):
            raise RuntimeError("compiler exploded")
        return run

    monkeypatch.setattr(perturb_mod.torch, "compile", broken)
    h, d = _hd((2, 5), seed=9)
    out, s = compiled_point(False, "inductor").apply(h, d)
    out_r, s_r = perturb_reference(h, d)
    assert torch.equal(out, out_r) and torch.equal(s, s_r)
    assert perturb_mod._KERNELS["inductor"] is None


def test_compiled_point_under_vmap_runs_the_eager_ops(fresh_kernels):
    h, d = _hd((3, 2, 4, 4), seed=4)
    kernel = compiled_point(True, "aot_eager")
    j_c = torch.func.jacrev(lambda a: kernel.apply(a, d)[0].sum((1, 2, 3)))(h)
    j_r = torch.func.jacrev(lambda a: perturb_reference(a, d)[0].sum((1, 2, 3)))(h)
    torch.testing.assert_close(j_c, j_r)
    # the vmapped backward ran the eager ops (the forward sees plain tensors: functorch lowers
    # them before an autograd.Function's forward)
    assert "backward" not in perturb_mod._KERNELS["aot_eager"]


@pytest.mark.slow
def test_inductor_delta_step_is_the_eager_update_bit_for_bit(fresh_kernels):
    """bf16 δ (float32 update rounded once) and float32 δ (the plain expression), number and
    per-example steps: the compiled update is the eager one exactly."""
    _inductor_or_skip()
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        d = torch.randn(16, 3, 5, 5, generator=g).to(dtype)
        grad = torch.randn(16, 3, 5, 5, generator=g).to(dtype)
        d2 = torch.randn(16, 7, generator=g).to(dtype)  # a second point of another rank
        grad2 = torch.randn(16, 7, generator=g).to(dtype)
        for step in (0.37, torch.rand(16, generator=g)):
            want = delta_step([d, d2], [grad, grad2], step, 0.92, compiled=False)
            got = delta_step([d, d2], [grad, grad2], step, 0.92, compiled=True)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == dtype and a.requires_grad
                assert torch.equal(a, b)
    assert "delta_step" in perturb_mod._KERNELS["inductor"], "inductor failed: fallback ran"
    # float32: the plain expression, as the eager update promises
    s = torch.rand(16, generator=g)
    d32, g32 = d.float(), grad.float()
    (got,) = delta_step([d32], [g32], s, 0.92, compiled=True)
    assert torch.equal(got, 0.92 * d32 + s[:, None, None, None] * g32)


def test_delta_step_follows_the_compiled_hook_switch(monkeypatch, fresh_kernels):
    calls = []
    real = perturb_mod._run

    def spy(backend, name, fn, *args):
        calls.append((backend, name))
        return real(backend, name, fn, *args)

    monkeypatch.setattr(perturb_mod, "_run", spy)
    d, grad = torch.randn(4, 3), torch.randn(4, 3)
    d2, grad2 = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    plain = delta_step([d, d2], [grad, grad2], 0.5, 0.9)
    with compiled_hook(True, backend="aot_eager"):
        comp = delta_step([d, d2], [grad, grad2], 0.5, 0.9)
        delta_step([d, d2], [grad, grad2], 0.5, 0.9, compiled=False)
    # every point in one compiled call
    assert calls == [("aot_eager", "delta_step")]
    assert torch.equal(plain[0], comp[0]) and torch.equal(plain[0], 0.9 * d + 0.5 * grad)
    assert torch.equal(plain[1], comp[1]) and torch.equal(plain[1], 0.9 * d2 + 0.5 * grad2)
    with pytest.raises(ValueError, match="2 gradients for 1 deltas"):
        delta_step([d], [grad, grad2], 0.5)
