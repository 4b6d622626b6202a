"""What the benchmark modules share: where results go, each module's command line, facts about the
machine, comparing (model, mode) variants with timed throughput, and formatting for BENCHMARKS.md.

Every folder is passed explicitly (``args.results_dir``, ``args.sst2_data``); nothing is read from the
environment at import time. A results folder other than ``benchmarks/results`` (quick runs:
``benchmarks/results/quick``) gets its own BENCHMARKS.md and its own fitted SideNets, so a smoke check
never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sidenet import AdaptiveModel, AdaptiveOutput, load_sidenet
from sidenet.data import iter_batches, make_loader
from sidenet.host_memory import cpu_memory_setting, retain_unless_switched_off
from sidenet.timing import input_batches as timed_inputs
from sidenet.timing import measure_throughput

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"
# The SideNets that the calibration step fits with ``sidenet fit`` (names in :func:`sidenet_dir`), which
# the serving and stacking steps load: Fashion-MNIST at layer1.0 (7x7 pooling), SST-2 after layer 3.
SIDENETS = {"fmnist": "fmnist-layer1.0", "sst2": "sst2-3"}
# How the side-by-side steps choose thresholds: Fashion-MNIST, at most 0.5 points below the MainNet on
# the validation split; SST-2, at most 1% of the choosing half of dev exiting with another answer than
# the MainNet's (keywords of TradeoffCurve.threshold_for).
RULES: dict[str, dict[str, float]] = {"fmnist": {"max_accuracy_drop": 0.005}, "sst2": {"max_disagreement": 0.01}}


# -- folders ---------------------------------------------------------------------------------------


def default_sst2_dir() -> Path:
    """``$SIDENET_SST2_DIR`` when set, else GLUE's SST-2 files shared beside this checkout
    (``../shared/data/sst2``): the benchmarks live in the repository, so they may know its neighbours;
    the library is not told where the repository is and gets the folder from here."""
    folder = os.environ.get("SIDENET_SST2_DIR")
    return Path(folder) if folder else ROOT.parent / "shared" / "data" / "sst2"


def markdown_path(results: Path) -> Path:
    """The BENCHMARKS.md rendered from ``results``: the committed one for ``benchmarks/results``,
    otherwise one inside that folder."""
    return ROOT / "BENCHMARKS.md" if results.resolve() == RESULTS else results / "BENCHMARKS.md"


def sidenet_dir(results: Path) -> Path:
    """Where the benchmarks keep the SideNets and compressed MainNets they fit (not committed)."""
    return ROOT / "sidenet-output" / "benchmarks" if results.resolve() == RESULTS else results / "sidenets"


def link(path: str | Path, results: Path) -> str:
    """``path`` relative to the folder of the BENCHMARKS.md of ``results`` (for Markdown links)."""
    return os.path.relpath(Path(path).resolve(), markdown_path(results).parent)


def shown(path: str | Path) -> str:
    """``path`` as recorded command lines show it: relative to the repository when it lies in the
    repository or beside it (``../shared/data/sst2``), so that the command reads the same on any
    checkout; absolute otherwise."""
    path = Path(path).resolve()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)


def fitted_sidenet(mainnet: torch.nn.Module, results: Path, task: str) -> AdaptiveModel:
    """The SideNet of ``task`` (``fmnist`` or ``sst2``) that the calibration step fitted for ``results``."""
    folder = sidenet_dir(results) / SIDENETS[task]
    if not (folder / "sidenet_config.json").is_file():
        raise SystemExit(
            f"no SideNet in {folder}: run the calibration step first (python -m benchmarks.calibration_report"
            f"{' --quick' if results.resolve() == QUICK_RESULTS else ''}, or python -m benchmarks run)"
        )
    return load_sidenet(mainnet, folder)


# -- command lines ---------------------------------------------------------------------------------


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every benchmark module takes: ``--quick``, ``--results-dir`` and
    ``--sst2-data`` (read by the SST-2 steps only); the module adds its own."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced smoke version (few samples and repeats)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="folder of the JSON results (default benchmarks/results, with --quick benchmarks/results/quick)",
    )
    parser.add_argument(
        "--sst2-data",
        type=Path,
        default=None,
        help="folder of SST-2's train.tsv and dev.tsv (default $SIDENET_SST2_DIR, else ../shared/data/sst2)",
    )
    return parser


def parse_options(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the defaults become ``quick`` (options given still win), and
    the folders are filled in (see :func:`benchmark_parser`)."""
    args = parser.parse_args(argv)
    if args.quick and quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    args.results_dir = (args.results_dir or (QUICK_RESULTS if args.quick else RESULTS)).resolve()
    args.sst2_data = args.sst2_data or default_sst2_dir()
    return args


def command(name: str, args: argparse.Namespace) -> str:
    """The command recorded in a result: how to run this step again."""
    return f"python -m benchmarks.{name}" + (" --quick" if args.quick else "")


def retain_cpu_memory() -> None:
    """Time with freed CPU memory kept for the next batch, as the ``sidenet`` command line serves
    (:mod:`sidenet.host_memory`): glibc's default thresholds follow what the process happened to free
    before, so without this a step's CPU times depend on its history, by up to 2.4× for the eager
    Fashion-MNIST MainNet (BENCHMARKS.md, "CPU memory"). ``SIDENET_CPU_MEMORY=system`` measures the
    defaults instead."""
    retain_unless_switched_off()


def run_and_write(name: str, run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> Path:
    """Run one benchmark module (with :func:`retain_cpu_memory`) and write its JSON (``python -m
    benchmarks.NAME``); BENCHMARKS.md is left alone: ``python -m benchmarks report`` renders it from
    every result."""
    retain_cpu_memory()
    path = write_result(args.results_dir, name, run(args))
    print(f"wrote {path}; BENCHMARKS.md: python -m benchmarks report --results-dir {shown(args.results_dir)}")
    return path


# -- results ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU, cores, threads and library versions of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()
        # Results written by earlier benchmarks of the same run are outputs, not code changes.
        dirty = [line for line in status if not line[3:].startswith(("benchmarks/results/", "BENCHMARKS.md"))]
        if commit and dirty:
            commit += "-dirty"
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        # Whether freed CPU memory was kept for the next batch (retain_cpu_memory) or glibc's defaults ran.
        "cpu_memory": "retained" if cpu_memory_setting().applied else "default",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_result(results: Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``results/<name>.json``."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def targets(spec: dict[str, tuple[str, float]], values: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target ``name: (op, bound)`` of ``spec`` with its value and whether it is met."""
    return {
        k: {"target": f"{op} {v}", "value": values[k], "met": bool(values[k] <= v if op == "<=" else values[k] >= v)}
        for k, (op, v) in spec.items()
    }


def targets_line(title: str, found: dict[str, dict[str, Any]], digits: int = 3) -> str:
    """``title: <name> met (<value> vs <target>); ...`` for targets made by :func:`targets`."""
    return f"{title}: " + "; ".join(
        f"{k.replace('_', ' ')} {'met' if v['met'] else 'NOT met'} ({v['value']:.{digits}f} vs {v['target']})"
        for k, v in found.items()
    )


# -- measuring -------------------------------------------------------------------------------------


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then give back the caller's count (studies without
    timing run their tiny perceptrons on fewer threads than the machine has)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_threshold(model: AdaptiveModel, threshold: float) -> AdaptiveModel:
    """``model``'s split and SideNet (shared, not copied) at another threshold, same temperature and
    policy: for timing a fixed operating point without changing ``model``."""
    return AdaptiveModel(
        model.split, model.sidenet, threshold=threshold, temperature=model.temperature, policy=model.policy_kind
    ).eval()


def summarise(outputs: list[AdaptiveOutput], labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, exit rate and mean FLOPs per sample of the outputs of consecutive batches."""
    return {
        "accuracy": float((torch.cat([o.predictions for o in outputs]) == labels).float().mean()),
        "exit_rate": float(torch.cat([o.exited.float() for o in outputs]).mean()),
        "mean_flops": float(torch.cat([o.flops.double() for o in outputs]).mean()),
    }


@torch.no_grad()
def routed_outcome(model: AdaptiveModel, dataset: Any, collate: Any, batch: int, mode: str) -> dict[str, float]:
    """Accuracy, exit rate and mean FLOPs per sample of ``mode`` over the dataset in batches of ``batch``."""
    batches = list(iter_batches(make_loader(dataset, batch, collate_fn=collate)))
    outputs = [model(inputs, mode=mode) for inputs, _ in batches]
    return summarise(outputs, torch.cat([target for _, target in batches]))


def input_batches(model: AdaptiveModel, dataset: Any, collate: Any, batch: int, samples: int) -> list[Any]:
    """The inputs of the first batches of ``dataset`` (labels dropped) holding at least ``samples``
    samples, for timing (:func:`sidenet.timing.input_batches` over a loader of ``batch``)."""
    return timed_inputs(make_loader(dataset, batch, collate_fn=collate), samples, model.split.batch_size)


def compare_variants(
    variants: dict[str, tuple[AdaptiveModel, str]],
    dataset: Any,
    collate: Any,
    repeats: int,
    sizes: tuple[tuple[int, int | None], ...],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Accuracy, exit rate and FLOPs (at the first batch size) of each (model, mode), and throughput at
    each (batch size, samples timed; None = all), interleaved; speed-ups against the first variant."""
    big = sizes[0][0]
    outcome = {name: routed_outcome(model, dataset, collate, big, mode) for name, (model, mode) in variants.items()}
    runners = {name: (lambda x, m=model, mode=mode: m(x, mode=mode).logits) for name, (model, mode) in variants.items()}
    first = next(iter(variants))
    size = variants[first][0].split.batch_size
    timing: dict[str, Any] = {}
    for batch, samples in sizes:
        batches = input_batches(variants[first][0], dataset, collate, batch, samples or len(dataset))
        result = measure_throughput(runners, batches, repeats=repeats, batch_size=size)
        timing[f"batch{batch}"] = {k: v.to_dict() for k, v in result.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {v.throughput:,.1f}/s" for k, v in result.items()))
    base_flops = outcome[first]["mean_flops"]
    table = {}
    for name, o in outcome.items():
        table[name] = {
            **o,
            "flops_fraction": o["mean_flops"] / base_flops,
            "throughput": {b: timing[b][name]["throughput"] for b in timing},
            "speedup": {b: timing[b][name]["throughput"] / timing[b][first]["throughput"] for b in timing},
        }
    return table, timing


# -- formatting ------------------------------------------------------------------------------------


def pct(x: float) -> str:
    """A fraction as a percentage with two decimals."""
    return f"{100 * x:.2f}%"


def thr(t: float | None) -> str:
    """A threshold; infinity and None read "never"."""
    return "never" if t is None or (isinstance(t, float) and math.isinf(t)) else f"{t:.4f}"
