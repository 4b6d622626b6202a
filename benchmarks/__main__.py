"""One runner for every benchmark: ``python -m benchmarks run [--quick] [--only NAME ...] [--sst2-data DIR]``,
and ``python -m benchmarks report [--quick | --results-dir DIR]`` to re-render BENCHMARKS.md only.

The steps run in this order, in this process (one import of torch and transformers for all), each a
module of this package with ``run(args) -> dict`` whose result the runner writes as ``NAME.json``:

| step               | module                        | needs (output of)                                   |
|--------------------|-------------------------------|-----------------------------------------------------|
| fmnist             | fmnist_resnet.py              | –                                                   |
| sst2               | sst2_minilm.py                | – (fine-tunes the SST-2 MainNet into the cache)     |
| calibration        | calibration_report.py         | – (``sidenet fit`` writes the SideNets below)       |
| serving            | serving.py                    | calibration: SideNets fmnist-layer1.0 and sst2-3    |
| stacking           | stacking.py                   | calibration: SideNet sst2-3                         |
| text_pruning       | text_pruning.py               | calibration: SideNet sst2-3                         |
| distillation       | distillation.py               | calibration: SideNet sst2-3                         |
| resnet_compression | resnet_compression.py         | calibration: SideNet fmnist-layer1.0                |
| serve              | serve.py                      | calibration: SideNets fmnist-layer1.0 and sst2-3    |
| design             | sidenet_design.py             | – (SideNet hidden width, pooling, distillation)     |
| cascade_training   | cascade_training.py           | – (what a cascade's later SideNets train on)        |
| gpu_operations     | gpu_operations.py             | – (operations per routed batch of the GPU workloads) |
| gpu_roofline       | gpu_roofline.py               | – (a roofline of the split ResNet-50 on an H100)    |
| cpu_memory         | cpu_memory.py                 | – (CPU times with freed memory kept or given back)  |
| (report)           | report.py                     | every JSON result present, once after the last step |

MainNets are trained or fine-tuned by whichever step first needs them when they are not cached
(Fashion-MNIST ships with sidenet; SST-2 takes about 12 minutes on 2 cores). The SideNets fitted by the
calibration step, and the students and pruned MainNets cached by later steps, live beside the results
(``sidenet-output/benchmarks`` for the full run, ``benchmarks/results/quick/sidenets`` for quick runs).
``--only`` runs a subset in the same order; a step whose needs are not in the results folder stops
with the command to run first.

``--quick`` runs reduced versions (one tap, few training samples and epochs, few timing repeats; each
module's ``QUICK``) for a smoke check in a few minutes once the MainNets are cached. Its results go to
``benchmarks/results/quick/`` (not committed), with their own BENCHMARKS.md, never over the real ones.
Any one step runs alone with ``python -m benchmarks.MODULE [--quick] [options]``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import QUICK_RESULTS, RESULTS, default_sst2_dir, retain_cpu_memory, write_result
from benchmarks.report import write


@dataclass(frozen=True)
class Step:
    """A benchmark step: its module in this package and the steps whose output it reads."""

    module: str
    needs: tuple[str, ...] = ()


# In running order: every step comes after the steps it needs (the table above).
STEPS: dict[str, Step] = {
    "fmnist": Step("fmnist_resnet"),
    "sst2": Step("sst2_minilm"),
    "calibration": Step("calibration_report"),
    "serving": Step("serving", needs=("calibration",)),
    "stacking": Step("stacking", needs=("calibration",)),
    "text_pruning": Step("text_pruning", needs=("calibration",)),
    "distillation": Step("distillation", needs=("calibration",)),
    "resnet_compression": Step("resnet_compression", needs=("calibration",)),
    "serve": Step("serve", needs=("calibration",)),
    "design": Step("sidenet_design"),
    "cascade_training": Step("cascade_training"),
    "gpu_operations": Step("gpu_operations"),
    "gpu_roofline": Step("gpu_roofline"),
    "cpu_memory": Step("cpu_memory"),
}


def step_arguments(quick: bool, results: Path, sst2_data: Path) -> list[str]:
    """The command line every step gets from the runner: the same folders for all."""
    return [*(["--quick"] if quick else []), "--results-dir", str(results), "--sst2-data", str(sst2_data)]


def run_steps(names: Sequence[str], quick: bool, results: Path, sst2_data: Path) -> None:
    """Run the steps ``names`` in the order of :data:`STEPS`, writing each one's JSON into ``results``."""
    arguments = step_arguments(quick, results, sst2_data)
    retain_cpu_memory()
    for name in [n for n in STEPS if n in names]:
        module = importlib.import_module(f"benchmarks.{STEPS[name].module}")
        args = module.options(arguments)
        print(f"== {name}: python -m benchmarks.{STEPS[name].module} {' '.join(arguments)}", flush=True)
        started = time.perf_counter()
        path = write_result(results, module.NAME, module.run(args))
        print(f"== {name}: wrote {path} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks, then render BENCHMARKS.md once")
    run.add_argument("--quick", action="store_true", help="reduced versions, results in benchmarks/results/quick")
    run.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    run.add_argument(
        "--sst2-data",
        type=Path,
        default=None,
        help="folder of SST-2's train.tsv and dev.tsv (default $SIDENET_SST2_DIR, else ../shared/data/sst2)",
    )
    report = sub.add_parser("report", help="only render BENCHMARKS.md (and the compression figures) from the JSON")
    report.add_argument("--quick", action="store_true", help="the quick run's results (benchmarks/results/quick)")
    report.add_argument("--results-dir", type=Path, default=None, help="another results folder")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(f"wrote {write(args.results_dir or (QUICK_RESULTS if args.quick else RESULTS))}")
        return
    results = QUICK_RESULTS if args.quick else RESULTS
    started = time.perf_counter()
    run_steps(args.only, args.quick, results, args.sst2_data or default_sst2_dir())
    print(f"wrote {write(results)}")
    print(f"all done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
