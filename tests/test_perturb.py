"""All-layer perturbation hooks (docs/algorithms.md, "Perturbation points")."""

from __future__ import annotations

import pytest
import torch

from robust_amo.models import create_model
from robust_amo.perturb import example_norm, perturb, unwrap

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
