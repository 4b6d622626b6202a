"""Tensor operations per routed batch of the GPU benchmark's workloads, counted on this machine (issue 13).

On a GPU each tensor operation is a kernel launch, and eager routing at serving batch sizes in bfloat16
is bound by launches (BERT-base takes the same time at batch 32 as at 128), so how many operations a
routed batch issues says, without a GPU, what sidenet's eager routing costs beside a minimal router
(trunk, SideNet, max-softmax, gather, rest, scatter: ``benchmarks.gpu_runners.minimal_router``) and beside the
MainNet alone. Issue 13 holds sidenet eager within 5% of that router's time; this is the count behind it.

Workloads: those of ``benchmarks/gpu.py`` (ResNet-50, tap layer1, batch 64; BERT-base, tap 3, batch 32
of SST-2 dev sentences or their synthetic stand-in), random weights, float32 and bfloat16, exit shares
0.5 and 0.8 set by confidence quantiles as there. ResNet-50 runs at 64x64 here: its operations do not
depend on the image size. sidenet's input value checks are off, as on CUDA by default
(``check_values=None`` reads values only of CPU inputs). Counted with ``sidenet.timing.count_operations``
after one untimed pass (a new input shape's FLOPs are measured once, on first sight), averaged over the
batches; no timing.

Run: ``python -m benchmarks.gpu_operations [--quick]``; writes ``gpu_operations.json``.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from benchmarks import gpu, gpu_case, gpu_runners, gpu_workloads
from benchmarks.harness import benchmark_parser, command, machine, parse_options, run_and_write
from sidenet.timing import count_operations

NAME = "gpu_operations"
QUICK = {"quick_models": True}
IMAGE_SIZE = 64
SHARES = (0.5, 0.8)


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--quick-models", action="store_true", help="the GPU benchmark's tiny --quick models")
    return parse_options(parser, argv, QUICK)


def gpu_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The GPU benchmark's own options for building its cases on this CPU."""
    quick = ["--quick"] if args.quick_models else []
    return gpu.options([*quick, "--device", "cpu", "--sst2-data", str(args.sst2_data), "--text-limit", "96"])


def per_batch(run: Callable[[Any], Any], batches: list[Any]) -> collections.Counter[str]:
    """Operations of ``run`` per batch, averaged over ``batches`` (after one untimed pass over them)."""
    for x in batches:
        run(x)
    counted = count_operations(lambda: [run(x) for x in batches])
    return collections.Counter({name: n / len(batches) for name, n in counted.items()})


def count_case(case: gpu_case.Case) -> list[dict[str, Any]]:
    """One row per exit share: operations per batch of the MainNet, the minimal router and sidenet eager,
    and what sidenet issues more or fewer of than the minimal router."""
    scores = gpu_case.confidences(case)
    mainnet = per_batch(gpu_runners.mainnet_call(case.model.split.mainnet, case.workload.kind), case.batches)
    rows = []
    for share in SHARES:
        routed = gpu_runners.at_threshold(case.model, gpu_runners.threshold_for_share(scores, share))
        routed.check_values = False  # as on CUDA
        minimal = per_batch(gpu_runners.minimal_router(routed), case.batches)
        eager = per_batch(routed, case.batches)
        realised = int((scores >= routed.threshold).sum()) / len(scores)
        rows.append(
            {
                **case.key(),
                "target_exit_share": share,
                "exit_share": realised,
                "mainnet": sum(mainnet.values()),
                "minimal_router": sum(minimal.values()),
                "sidenet_eager": sum(eager.values()),
                "more_than_minimal": dict(sorted((eager - minimal).items())),
                "fewer_than_minimal": dict(sorted((minimal - eager).items())),
            }
        )
    return rows


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload and dtype; the result."""
    own = gpu_arguments(args)
    chosen = gpu_workloads.workloads(own)
    text = gpu_workloads.text_source(own) if any(w.kind == "text" for w in chosen) else (None, None, {})
    rows, workloads = [], {}
    for workload in chosen:
        if workload.kind == "vision" and not args.quick_models:
            workload = replace(workload, image_size=IMAGE_SIZE)
        batch = workload.batches[0]
        own.image_samples = 3 * batch
        workloads[workload.name] = workload.description
        for dtype in args.dtypes:
            case = gpu_case.build_case(workload, batch, getattr(torch, dtype), own, text)
            found = count_case(case)
            rows += found
            print(
                f"{workload.name} batch {batch} {dtype}: "
                + "; ".join(
                    f"exit {r['exit_share']:.2f}: MainNet {r['mainnet']:.0f}, "
                    f"minimal router {r['minimal_router']:.0f}, sidenet eager {r['sidenet_eager']:.0f}"
                    for r in found
                ),
                flush=True,
            )
    return {
        "benchmark": NAME,
        "command": command(NAME, args),
        "machine": machine(),
        "workloads": workloads,
        "image_size": None if args.quick_models else IMAGE_SIZE,
        "text": text[2],
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
