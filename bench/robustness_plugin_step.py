"""Cost of a robust AMO training step inside robustness, relative to robustness's PGD step.

Robust AMO takes ∇_δ from the same backward as ∇_{x'} (docs/algorithms.md), so its step should cost
about what a PGD training step costs. This times one training step (attack + forward + backward +
SGD step) of the plugin's ``RobustAMOAttackerModel`` with the paper's η_δ and with η_δ = 0 (the
same x' path, δ ≡ 0: the hooks' cost), and, on CUDA, of robustness's own ``AttackerModel``
(its ``Attacker`` calls ``.cuda()``, so that row needs a GPU). Ratios are measured in this run.

    python -m bench.robustness_plugin_step --arch tiny-wrn --batch-size 64 --steps 10
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import timed
from robust_amo.integrations import robustness as rp
from robust_amo.runtime import resolve_device


def _time_step(model, x, y, kwargs, repeats: int) -> float:
    """Seconds per training step (attack + forward + backward + SGD) after one warm-up step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        out, _ = model(x, y, make_adv=True, **kwargs)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, x.device, repeats, warmup=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=str, default="tiny-wrn", help="robust-amo architecture")
    p.add_argument("--dataset", type=str, default="cifar10", help="gives shape and statistics")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--steps", type=int, default=10, help="attack steps")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per row")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="device")
    a = p.parse_args()
    dev = resolve_device(a.device)
    ds = rp.robustness_dataset(a.dataset, device=dev)
    torch.manual_seed(0)
    x = torch.rand(a.batch_size, *ds.input_shape, device=dev)
    y = torch.randint(0, ds.num_classes, (a.batch_size,), device=dev)
    kwargs = dict(constraint="inf", eps=8 / 255, step_size=2 / 255, iterations=a.steps,
                  random_start=True, use_best=False)
    rows = {}
    for name, eta in (("robust AMO (eta_delta=6.4e-3)", 6.4e-3), ("plugin, eta_delta=0", 0.0)):
        torch.manual_seed(1)
        net = rp.architecture(a.arch, ds).to(dev)
        rows[name] = _time_step(rp.RobustAMOAttackerModel(net, ds, eta_delta=eta).to(dev), x, y,
                                kwargs, a.repeats)
    if dev.type == "cuda":
        from robustness.attacker import AttackerModel  # after rp: its shim comes first

        torch.manual_seed(1)
        net = rp.architecture(a.arch, ds).to(dev)
        rows["robustness AttackerModel PGD"] = _time_step(AttackerModel(net, ds).to(dev), x, y,
                                                          kwargs, a.repeats)
    ref_name = "robustness AttackerModel PGD" if dev.type == "cuda" else "plugin, eta_delta=0"
    ref = rows[ref_name]
    print(f"device={dev} torch={torch.__version__} arch={a.arch} batch={a.batch_size} "
          f"attack_steps={a.steps}")
    for name, t in rows.items():
        print(f"{name:32s} {t * 1e3:9.1f} ms/step   x{t / ref:.2f} of {ref_name}")


if __name__ == "__main__":
    main()
