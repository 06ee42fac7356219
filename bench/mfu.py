"""Model FLOP utilisation of the native PGD-10 training step against the device's peak.

FLOPs are counted analytically (convolutions and linear layers, 2 per multiply-add, see
``bench.common.pgd_step_flops``) and divided by the measured step time. The MFU is judged first
against a measured ceiling, a large bf16 matmul on the same device (``bench.common.matmul_tflops``:
it knows the variant, clocks and power limit of the GPU in hand), and second against the
datasheet's dense bf16 peak, looked up from the GPU's name or given with ``--peak-tflops``.

Target (issue 7): MFU >= 40% for WRN-28-10 on one GPU:

    python -m bench.mfu --device cuda --arch wrn28-10 --batch-size 128
"""

from __future__ import annotations

import torch

from bench.common import (
    NativeTrainer,
    base_parser,
    device_from,
    forward_flops,
    header,
    matmul_tflops,
    pgd_step_flops,
)

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the
# most specific names first (the first key contained in the device name wins)
PEAK_BF16_TFLOPS = {
    "H200 NVL": 835.0, "H200": 989.4,
    "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The bf16 dense peak: ``--peak-tflops``, else the table entry matching the GPU name."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def measure(args, device: torch.device, steps: int = 10,
            model: torch.nn.Module | None = None) -> dict[str, float]:
    """FLOPs and throughput of the native PGD-``steps`` training step (``args``: base_parser's).

    Returns:
        ``forward_gflop`` and ``step_gflop`` per image, ``images_per_s`` (after
        ``args.warmup`` untimed steps, data loading included) and the achieved ``tflops``.
    """
    trainer = NativeTrainer(args, device, steps=steps, model=model)
    x = torch.zeros(args.batch_size, args.channels, args.image_size, args.image_size,
                    device=device)
    fwd, first = forward_flops(trainer.net, x)
    step_flops = pgd_step_flops(fwd, first, steps)
    ips = trainer.images_per_s(args.warmup)
    return {"forward_gflop": fwd / args.batch_size / 1e9,
            "step_gflop": step_flops / args.batch_size / 1e9,
            "images_per_s": ips, "tflops": step_flops / args.batch_size * ips / 1e12}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet peak TFLOP/s, the second ceiling (default: looked up from "
                        "the GPU name)")
    p.add_argument("--matmul-n", type=int, default=8192,
                   help="side of the matmul probe, the first ceiling (default 8192)")
    args = p.parse_args()
    device = device_from(args)
    print(header(device))
    m = measure(args, device, args.steps)
    bf16 = not args.no_bf16 and device.type == "cuda"
    print(f"# {args.arch}, batch {args.batch_size}, PGD-{args.steps}, bf16 autocast={bf16}")
    print(f"forward GFLOPs per image: {m['forward_gflop']:.4g}")
    print(f"PGD-{args.steps} step GFLOPs per image: {m['step_gflop']:.4g}")
    print(f"throughput: {m['images_per_s']:.1f} images/s = {m['tflops']:.4g} TFLOP/s")
    probe, what = matmul_tflops(device, args.matmul_n, 20)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"measured ceiling ({what}): {probe:.4g} TFLOP/s")
    print("datasheet peak (dense bf16, or as given): "
          + (f"{peak:.4g} TFLOP/s" if peak else "unknown for this device (--peak-tflops)"))
    print(f"MFU vs datasheet: {m['tflops'] / peak:.4g}" if peak else "MFU vs datasheet: nan")
    print(f"MFU vs measured ceiling: {m['tflops'] / probe:.4g}")


if __name__ == "__main__":
    main()
