"""Where a split ResNet-50's time should go on a GPU, by a roofline model computed on this CPU (issue 13).

The GPU benchmark's ResNet-50 targets (tap ``layer1``) were not met on an H100, nor on an H200 once the
split's own cost was removed: the served front (stem, ``layer1``, SideNet, exit score) took about half the
compiled MainNet's time although it holds a fifth of its FLOPs. FLOPs are the wrong yardstick for early
layers on a GPU: at 56x56 with 256 channels their activations are large and their arithmetic intensity low,
so they run at the memory's speed, not the tensor cores'. This step puts a number on that: per operation,
time = max(FLOPs / peak, bytes / bandwidth) (the roofline), summed over the front, the SideNet and the rest
of the MainNet as ``sidenet.split_mainnet`` cuts them, so that the shares and the ideal speed-ups at exit
shares 0.5 and 0.8 can be set beside the FLOPs ideal and the measured stage times of ``gpu.json``.

The model follows what ``torch.compile`` runs for inference (seen in ``gpu.py --profile-stages``): each
convolution a cuDNN kernel that reads its input and weights and writes its output, then one fused pointwise
kernel that reads that output and writes it back normalised (batch norm is not folded into the weights
without inductor's freezing), with the ReLU and a block's residual add (one more read, of its identity);
pooling reads and writes once; weights are read once per batch, 2 bytes per value (bfloat16). Peak and
bandwidth are the datasheet figures of the card named by ``--card`` (H100 SXM: 989.4 TFLOPS dense bfloat16,
3.35 TB/s of HBM3; H200 SXM: the same compute, 4.8 TB/s of HBM3e); the shares depend only on their ratio. It
ignores kernel launch and tail effects, the stem's 3-channel convolution (poor for tensor cores) and cache
reuse between layers: a lower bound per part, not a prediction of milliseconds.

Run: ``python -m benchmarks.gpu_roofline [--quick] [--card H100|H200]`` (default H200: the card of the
measured ResNet-50 cases); writes ``gpu_roofline.json``. No GPU needed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import sidenet
from benchmarks import gpu, gpu_workloads
from benchmarks.harness import benchmark_parser, command, machine, parse_options, run_and_write

NAME = "gpu_roofline"
QUICK = {"quick_models": True}
BATCHES = (64, 256)
SHARES = (0.5, 0.8)
# NVIDIA datasheets (SXM): dense bfloat16 tensor-core throughput and memory bandwidth (H100 HBM3, H200 HBM3e).
CARDS = {"H100": (989.4e12, 3.35e12), "H200": (989.4e12, 4.8e12)}
BYTES_PER_VALUE = 2  # bfloat16


@dataclass
class Operation:
    """One fused operation, per sample: its FLOPs and the bytes of activations it reads and writes; and
    the bytes of its weights (read once per batch)."""

    name: str
    flops: float
    activation_bytes: float
    weight_bytes: float

    def seconds(self, batch: int, peak: float, bandwidth: float) -> float:
        """Its roofline time for a batch: the slower of its compute and its memory traffic."""
        return max(batch * self.flops / peak, (batch * self.activation_bytes + self.weight_bytes) / bandwidth)


def per_sample(tensor: torch.Tensor) -> int:
    return tensor.numel() // tensor.shape[0]


def record_operations(modules: nn.Module, run: Callable[[], Any]) -> list[Operation]:
    """The fused operations ``run()`` executes in ``modules`` (run on one sample; see the module docstring)."""
    found: list[Operation] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x, name = inputs[0], module.__class__.__name__
        moved = BYTES_PER_VALUE * (per_sample(x) + per_sample(output))
        weights = BYTES_PER_VALUE * sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.Conv2d):
            taps = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            found.append(Operation(name, 2 * per_sample(output) * taps, moved, weights))
            # Batch norm and ReLU, one fused pointwise kernel over the convolution's output: read and written.
            out = BYTES_PER_VALUE * per_sample(output)
            found.append(Operation("BatchNorm+ReLU", 2 * per_sample(output), 2 * out, 0))
        elif isinstance(module, nn.Linear):
            found.append(Operation(name, 2 * module.in_features * module.out_features, moved, weights))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            found.append(Operation(name, per_sample(x), moved, 0))
        elif name in ("Bottleneck", "BasicBlock"):  # the residual add, fused: one more read of the identity
            found.append(Operation(f"{name} add", per_sample(output), BYTES_PER_VALUE * per_sample(output), 0))

    handles = [m.register_forward_hook(hook) for m in modules.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found


def split_costs(model: sidenet.AdaptiveModel, image: torch.Tensor) -> dict[str, list[Operation]]:
    """The operations of the front (the trunk to the tap), of the SideNet and of the rest, as routing runs
    them."""
    split = model.split
    state: dict[str, Any] = {}
    parts = {
        "trunk": record_operations(split, lambda: state.update(tap=split.trunk(image))),
        "sidenet": record_operations(model.sidenet, lambda: model.sidenet(split.features(state["tap"]))),
        "rest": record_operations(split, lambda: split.rest(state["tap"])),
    }
    return parts


def roofline(parts: dict[str, list[Operation]], batch: int, peak: float, bandwidth: float) -> dict[str, Any]:
    """Per part its FLOPs, bytes and roofline time at ``batch``; the front's shares of FLOPs and time; and
    the ideal speed-ups over the MainNet alone (front on every sample, rest on the continuing share) by
    FLOPs and by the roofline."""
    summed = {
        name: {
            "gflops": batch * sum(op.flops for op in ops) / 1e9,
            "gbytes": sum(batch * op.activation_bytes + op.weight_bytes for op in ops) / 1e9,
            "roofline_ms": 1e3 * sum(op.seconds(batch, peak, bandwidth) for op in ops),
            "memory_bound_ops": sum(
                batch * op.activation_bytes + op.weight_bytes > batch * op.flops * bandwidth / peak for op in ops
            ),
            "ops": len(ops),
        }
        for name, ops in parts.items()
    }
    front = {key: summed["trunk"][key] + summed["sidenet"][key] for key in ("gflops", "gbytes", "roofline_ms")}
    whole_flops = summed["trunk"]["gflops"] + summed["rest"]["gflops"]
    whole_ms = summed["trunk"]["roofline_ms"] + summed["rest"]["roofline_ms"]
    ideal = {
        f"{share:g}": {
            "flops": whole_flops / (front["gflops"] + (1 - share) * summed["rest"]["gflops"]),
            "roofline": whole_ms / (front["roofline_ms"] + (1 - share) * summed["rest"]["roofline_ms"]),
        }
        for share in SHARES
    }
    return {
        "batch": batch,
        "parts": summed,
        "front_flops_share": front["gflops"] / whole_flops,
        "front_roofline_share": front["roofline_ms"] / whole_ms,
        "mainnet_roofline_ms": whole_ms,
        "ideal_speedup": ideal,
    }


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--quick-models", action="store_true", help="the GPU benchmark's tiny --quick models")
    parser.add_argument("--card", choices=sorted(CARDS), default="H200", help="whose datasheet peak and bandwidth")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The image workload of the GPU benchmark (ResNet-50 at 224, tap layer1; tiny with --quick-models)."""
    own = gpu.options([*(["--quick"] if args.quick_models else []), "--device", "cpu"])
    workload = next(w for w in gpu_workloads.workloads(own) if w.kind == "vision" and not w.channels_last)
    torch.manual_seed(0)
    size = workload.image_size
    model = sidenet.attach(workload.build().eval(), workload.tap, input_shape=(3, size, size)).eval()
    parts = split_costs(model, torch.randn(1, 3, size, size))
    peak, bandwidth = CARDS[args.card]
    batches = (8,) if args.quick_models else BATCHES
    rows = [roofline(parts, batch, peak, bandwidth) for batch in batches]
    for row in rows:
        print(
            f"{workload.name} batch {row['batch']}: front {row['front_flops_share']:.1%} of the FLOPs, "
            f"{row['front_roofline_share']:.1%} of the roofline time; ideal at exit 0.8: "
            f"{row['ideal_speedup']['0.8']['flops']:.2f}x by FLOPs, {row['ideal_speedup']['0.8']['roofline']:.2f}x "
            "by the roofline",
            flush=True,
        )
    return {
        "benchmark": NAME,
        "command": command(NAME, args),
        "machine": machine(),
        "workload": workload.name,
        "description": workload.description,
        "tap": str(workload.tap),
        "image_size": size,
        "card": args.card,
        "peak_tflops": peak / 1e12,
        "bandwidth_tbs": bandwidth / 1e12,
        "bytes_per_value": BYTES_PER_VALUE,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
