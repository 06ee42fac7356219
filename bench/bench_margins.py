"""Benchmark: κ_{k←i} from the C×C Gram matrix vs power iteration vs the dense Jacobian.

Prints, for one batch, the time of each method measured in this run, their ratios to the Gram
method, and the largest relative disagreement with the dense Jacobian (the reference). Power
iteration needs a Jacobian-vector and a vector-Jacobian product per iteration and per point;
the Gram method needs C backward passes in all, for every point at once, and is exact.

    python -m bench.bench_margins [--arch mnist-cnn2] [--batch 16] [--iters 20]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_time
from robust_amo.margins import kappa
from robust_amo.models import create_model
from robust_amo.perturb import perturb
from tests.helpers import dense_jacobian

CPU = torch.device("cpu")


def power_iteration(model, x, iters: int) -> torch.Tensor:
    """(B, P) spectral norms of ∂F/∂h_i by power iteration on JᵀJ (double-backward JVPs)."""
    with torch.enable_grad(), perturb(model) as p:
        logits = model(x)
        scales = torch.stack([s.detach() for s in p.scales], 1)
        out = []
        for i, d in enumerate(p.deltas):
            u = torch.zeros_like(logits, requires_grad=True)
            (g,) = torch.autograd.grad(logits, d, grad_outputs=u, create_graph=True)
            v = torch.randn_like(d, generator=torch.Generator().manual_seed(i))
            sigma = torch.zeros(len(x))
            for _ in range(iters):
                v = v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
                (jv,) = torch.autograd.grad(g, u, grad_outputs=v, retain_graph=True)  # J v
                (v,) = torch.autograd.grad(logits, d, grad_outputs=jv, retain_graph=True)  # JᵀJv
                sigma = jv.flatten(1).norm(dim=1)
            out.append(sigma)
    return torch.stack(out, 1) / scales


def dense(model, x) -> torch.Tensor:
    """(B, P) spectral norms from autograd's dense Jacobian, one example at a time."""
    points = len(model.perturbation_points())
    res = torch.zeros(len(x), points)
    for b in range(len(x)):
        for i in range(points):
            res[b, i] = torch.linalg.matrix_norm(dense_jacobian(model, x[b:b + 1], i)[1], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=str, default="mnist-cnn2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.arch, 10, input_shape=(1, 28, 28)).eval()
    x = torch.rand(args.batch, 1, 28, 28)
    y = model(x).argmax(1)
    t_gram, k = best_time(lambda: kappa(model, x, y).jac_norms, CPU, 3)
    t_pow, pw = best_time(lambda: power_iteration(model, x, args.iters), CPU, 3)
    t_dense, ref = best_time(lambda: dense(model, x), CPU, 1)
    err = lambda v: float(((v - ref).abs() / ref).max())  # noqa: E731
    print(f"{args.arch}, batch {args.batch}, {len(k[0])} points, 10 classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    print(f"gram (exact)          {t_gram * 1e3:9.1f} ms  1.00x  max rel. error {err(k):.1e}")
    print(f"power iteration x{args.iters:<3} {t_pow * 1e3:9.1f} ms  {t_pow / t_gram:5.2f}x  "
          f"max rel. error {err(pw):.1e}")
    print(f"dense Jacobian        {t_dense * 1e3:9.1f} ms  {t_dense / t_gram:5.2f}x  (reference)")


if __name__ == "__main__":
    main()
