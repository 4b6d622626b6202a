"""GPU serving benchmark (issue 13, item 4): per-sample routing against the best MainNet alone, on one
CUDA device, in float32 and bfloat16, eager and compiled.

It runs as a script on a GPU image that has PyTorch, torchvision and transformers but not this project's
environment: ``PYTHONPATH=src python3 benchmarks/gpu.py`` (``python -m benchmarks.gpu`` works too). So it and
its modules (``gpu_workloads``: the MainNets and batches; ``gpu_runners``: thresholds, runners, timing;
``gpu_case``: one case's rows) import only ``sidenet``, torch, torchvision, transformers and each other, not
``benchmarks.harness``: run as a script, their folder is on the import path but ``benchmarks`` is no package.

Workloads (random weights: the time of a routed batch depends on the shapes and on the share of samples
that exit, not on what the weights know, so the threshold is set at a quantile of the SideNet's
confidences on the timed batches, strictly between two of them, for exit shares 0.5 and 0.8):

- ResNet-50 (torchvision) at 3x224x224, SideNet after ``layer1``, batches 64 and 256 of random images.
- BERT-base (``BertForSequenceClassification`` from a ``BertConfig``, 2 labels), SideNet after layer 3,
  batches 32 and 128 of SST-2 dev sentences tokenised with the all-MiniLM-L6-v2 tokenizer (the uncased
  BERT vocabulary), at most 64 tokens, each batch padded to its longest sentence. Without the data or the
  tokenizer: synthetic sentences with SST-2 dev's token-length histogram (:data:`SST2_DEV_TOKEN_LENGTHS`);
  the JSON says which.
- Optionally (``--sst2-mainnet DIR --sst2-sidenet DIR``) the fine-tuned MiniLM MainNet and its SideNet
  of the CPU benchmarks, on the real dev sentences.
- With ``--channels-last``, each image workload again as ``<name>_cl``: the MainNet converted with
  ``.to(memory_format=torch.channels_last)`` and its images channels-last, every row (the MainNet alone
  too) in that layout, as GPU users serve convolutional networks. Inductor lays convolutions out
  channels-last by itself only in graphs of static shapes; a channels-last MainNet keeps that layout in
  the serving mode's rest, which is compiled dynamic in its rows (``tests/test_compiled_static_rest.py``).

Rows per (workload, batch, dtype): the MainNet eager, compiled by each ``torch.compile`` mode, in one
CUDA graph, and the best of those (``main_best``); per exit share: a minimal eager router written here
with the public split API (trunk, SideNet, max-softmax, gather, rest, scatter), sidenet eager
(``AdaptiveModel``), the compiled serving mode (``sidenet.compiled.compile_for_serving``, its default
backend: ``torch.compile``'s kernels captured in CUDA graphs on CUDA) per batch and pipelined over the
stream (``served.stream``), ``PooledRouter`` in that mode, on CUDA the serving mode with its eager kernels
captured (``sidenet_cuda_graph``: what fused kernels add), and the ideal: the served front (trunk +
SideNet + score) on every sample plus the served rest on a full batch times the continuing share, from
stage times measured in the same run. One served model times both exit shares (the threshold is an input
of its stages): its stages compile once per case.
Milliseconds per batch: the median of interleaved repeated passes over the batches after warm-up passes,
CUDA-synchronised around each pass. Text MainNets compiled or captured take their batches padded to the
length buckets :data:`LENGTH_BUCKETS` (at most four shapes to compile); eager ones take them as padded.

Bounded: cases run bfloat16 first and each starts only while the ``--budget-s`` seconds (compile times
included) leave room for it, judged by the longest earlier case of its workload; of the ``torch.compile``
modes, reduce-overhead is always compiled, default only while ``--default-min-s`` seconds remain and
max-autotune (minutes) while ``--autotune-min-s`` do. The JSON is rewritten after every case, so a run
cut short still leaves its results (``"complete": false``); ``--merge`` keeps the cases of an earlier
JSON that a run does not measure (e.g. a second run of the bfloat16 cases with every compile mode).
``--serving-autotune``: the serving mode also with ``autotune=True`` (its stages compiled with max-autotune's
kernel choices; minutes of compiling), against a MainNet alone under ``mode="max-autotune"``. ``--batches``:
only those of the workloads' batch sizes (a device call too short for every case).
``--profile-stages``: after a case's timing, one pass of each served stage and of the compiled MainNet under
``torch.profiler``, their costliest operations and kernels in the case's ``profile`` (where the front's
time goes: on the H100 the served ResNet-50 front took half the compiled MainNet's time).

``--quick``: tiny models and shapes on the CPU, two repeats, ``torch.compile`` with the ``eager``
backend (Dynamo only), CUDA-only rows skipped with the reason; for tests (``tests/test_benchmark_gpu.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import sidenet  # noqa: F401  (its dependencies checked here, before the benchmark's modules import it)
except ModuleNotFoundError as missing:  # a GPU image without one of sidenet's own dependencies
    raise SystemExit(
        f"benchmarks/gpu.py: {missing}. Run it as PYTHONPATH=src python3 benchmarks/gpu.py with sidenet's "
        "dependencies installed (numpy, safetensors, tqdm besides torch, torchvision, transformers)"
    ) from missing

if __package__:  # python -m benchmarks.gpu
    from benchmarks.gpu_case import COMPILE_MODES, build_case, run_case
    from benchmarks.gpu_runners import Clock
    from benchmarks.gpu_workloads import LENGTH_BUCKETS, text_source, workloads
else:  # python3 benchmarks/gpu.py: its folder is on the import path, the checkout is not
    from gpu_case import COMPILE_MODES, build_case, run_case
    from gpu_runners import Clock
    from gpu_workloads import LENGTH_BUCKETS, text_source, workloads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
QUICK_OUT = ROOT / "benchmarks" / "results" / "quick" / "gpu.json"
EXIT_SHARES = (0.5, 0.8)
METHOD = (
    "Random-weight MainNets and SideNets: the time of a routed batch depends on the shapes and on the share "
    "of samples that exit, not on what the weights know. Each exit share is set by a threshold at that "
    "quantile of the SideNet's confidences on the timed batches, strictly between two of them; the realised "
    "share is recorded. Times are milliseconds per batch: the median of interleaved passes over the same "
    "batches after warm-up passes, synchronised with the device around each pass."
)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Device, library versions, commit and date, for the JSON."""
    device = torch.device(args.device)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchvision", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:  # SIDENET_COMMIT names the commit where the tree was copied without its current git state
        commit = (
            os.environ.get("SIDENET_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        )
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": name,
        "device_type": device.type,
        **versions,
        "commit": commit,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def release(device: torch.device) -> None:
    """Free compiled graphs and cached device memory between cases."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case in order of priority (bfloat16 first), the JSON rewritten after each; the result."""
    clock = Clock(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Text compiled at four lengths by three modes exceeds Dynamo's default of 8 recompilations per
    # function, past which it would silently run eager.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    chosen = workloads(args)
    needs_text = any(w.kind == "text" and w.sidenet_dir is None for w in chosen)
    text = text_source(args) if needs_text else (None, None, {"source": "no random-weight text workload"})
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "command": args.command,
        **environment(args),
        "quick": bool(args.quick),
        "complete": False,
        "method": METHOD,
        "workloads": {w.name: w.description for w in chosen},
        "text": text[2],
        "length_buckets": list(LENGTH_BUCKETS),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "image_samples": args.image_samples,
            "compile_modes": list(args.compile_modes),
            "compile_backend": args.compile_backend,
            "serving_backend": args.serving_backend,
            "max_wait": args.max_wait,
            "static_rest": args.static_rest,
            "channels_last": args.channels_last,
            "serving_autotune": args.serving_autotune,
            "budget_s": args.budget_s,
        },
        "cases": [],
        "rows": [],
        "skipped": [],
    }
    plan = [(w, b, d) for d in args.dtypes for w in chosen for b in w.batches if not args.batches or b in args.batches]
    # Every earlier case is kept until this run measures it anew: a planned case that the budget or a failure
    # skips keeps the earlier run's figures rather than vanishing from the merged JSON.
    kept = merged_cases(args.out, set()) if args.merge else None
    if kept:
        result["cases"], result["rows"], result["workloads"] = kept["cases"], kept["rows"], kept["workloads"]
        result["workloads"].update({w.name: w.description for w in chosen})
        result["merged_commands"] = kept["commands"]  # the runs whose cases were kept
    result["elapsed_s"] = clock.elapsed()
    write(args.out, result)  # from the start: a run killed in its first case still says what it was
    took: dict[str, float] = {}  # the longest case of each workload so far: what the next one may take
    for workload, batch, dtype_name in plan:
        key = {"workload": workload.name, "batch": batch, "dtype": dtype_name}
        needed = took.get(workload.name, args.case_min_s)
        if clock.left() < needed:
            result["skipped"].append(
                {**key, "reason": f"time budget: {clock.left():.0f} s left, a case takes ~{needed:.0f} s"}
                | _kept_note(result, key)
            )
            continue
        started = time.perf_counter()
        case = None
        try:
            own_text = text
            if workload.sidenet_dir is not None:
                from transformers import AutoTokenizer

                own_text = text_source(args, AutoTokenizer.from_pretrained(args.sst2_mainnet))
            case = build_case(workload, batch, getattr(torch, dtype_name), args, own_text)
            rows, report = run_case(case, args, clock)
        except Exception as exc:
            reason = {"reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
            result["skipped"].append({**key, **reason} | _kept_note(result, key))
            rows, report = [], None
        finally:
            del case
            release(torch.device(args.device))
        took[workload.name] = max(took.get(workload.name, 0.0), time.perf_counter() - started)
        if report is not None:
            report["device"] = result["device"]  # per case: a merged JSON may hold cases of several cards
            report["case_s"] = time.perf_counter() - started
            if workload.kind == "text":
                report["text"] = own_text[2]["source"]
            same = (workload.name, batch, dtype_name)  # an earlier run's case of this key gives way to this one
            result["cases"] = [c for c in result["cases"] if (c["workload"], c["batch"], c["dtype"]) != same]
            result["rows"] = [r for r in result["rows"] if (r["workload"], r["batch"], r["dtype"]) != same]
            result["cases"].append(report)
            result["rows"] += rows
            print(summary_line(rows, report), flush=True)
        result["elapsed_s"] = clock.elapsed()
        write(args.out, result)
    result["complete"] = not result["skipped"]
    result["elapsed_s"] = clock.elapsed()
    write(args.out, result)
    return result


def _kept_note(result: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    """For a skipped case: a note that an earlier run's case of the same key stays in the merged JSON."""
    same = (key["workload"], key["batch"], key["dtype"])
    kept = any((c["workload"], c["batch"], c["dtype"]) == same for c in result["cases"])
    return {"kept": "the earlier run's case"} if kept else {}


def merged_cases(path: Path, measured: set[tuple]) -> dict[str, Any] | None:
    """The cases and rows of an earlier JSON at ``path`` that this run does not measure again."""
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())

    def other(item: dict[str, Any]) -> bool:
        return (item["workload"], item["batch"], item["dtype"]) not in measured

    # Cases from before the JSON recorded their passes took the earlier run's settings (every run until
    # then used the defaults of its day: 5 timed passes, 2 warm-up).
    passes = {"timed": earlier["settings"]["repeats"], "warmup": earlier["settings"]["warmup"]}
    return {
        "cases": [
            {**c, "passes": c.get("passes", passes), "device": c.get("device", earlier["device"])}
            for c in earlier["cases"]
            if other(c)
        ],
        "rows": [r for r in earlier["rows"] if other(r)],
        "workloads": dict(earlier["workloads"]),
        "commands": [*earlier.get("merged_commands", []), earlier["command"]],
    }


def summary_line(rows: list[dict], report: dict) -> str:
    best = next(r for r in rows if r["mode"] == "main_best")
    served = [r for r in rows if r["mode"].startswith(("sidenet_compiled", "pooled")) and r["target_exit_share"]]
    top = max(served, key=lambda r: r["speedup_vs_main_best"], default=None)
    tail = f"; best served {top['mode']} {top['ms']:.2f} ms ({top['speedup_vs_main_best']:.2f}x)" if top else ""
    return (
        f"{report['workload']} batch {report['batch']} {report['dtype']}: best MainNet {best['best_of']} "
        f"{best['ms']:.2f} ms{tail} [{report['case_s']:.0f} s]"
    )


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` changes the defaults (options given still win)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU, for tests (under a minute)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON written (default benchmarks/results/gpu.json)")
    parser.add_argument("--device", default=None, help="default cuda (the CPU only with --quick or when named)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument(
        "--workloads", nargs="+", default=None, help="only these (resnet50, bert_base, minilm_sst2, resnet50_cl)"
    )
    parser.add_argument("--exit-shares", nargs="+", type=float, default=list(EXIT_SHARES))
    parser.add_argument("--compile-modes", nargs="*", default=list(COMPILE_MODES), choices=list(COMPILE_MODES))
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the MainNet rows")
    parser.add_argument("--serving-backend", default="auto", help="backend of compile_for_serving")
    # 9, not 5: host-bound eager rows (BERT) spread by up to 90% between passes on the H100 machine (2026-11-28).
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed passes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes after the first (compiling) one")
    parser.add_argument("--image-samples", type=int, default=1024, help="images per pass (at least 3 batches)")
    parser.add_argument("--text-limit", type=int, default=None, help="the first sentences of SST-2 dev only")
    parser.add_argument("--max-wait", type=int, default=4, help="PooledRouter's max_wait")
    parser.add_argument(
        "--static-rest",
        action="store_true",
        help="also serve the image workloads with rest_shapes='static' (the rest compiled per row bucket; a "
        "compilation each), not their channels-last variants",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="also run each image workload with its MainNet and images channels-last (as <name>_cl)",
    )
    parser.add_argument(
        "--serving-autotune",
        action="store_true",
        help="also serve with compile_for_serving(autotune=True): max-autotune's kernel choices (minutes to compile)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="only these of the workloads' batches")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no case that would end past this")
    parser.add_argument(
        "--case-min-s", type=float, default=15.0, help="budget a workload's first case needs (later: its longest)"
    )
    parser.add_argument(
        "--default-min-s", type=float, default=120.0, help="compile mode default: only with this much left"
    )
    parser.add_argument(
        "--autotune-min-s", type=float, default=300.0, help="compile mode max-autotune: only with this much left"
    )
    parser.add_argument("--merge", action="store_true", help="keep the cases of --out that this run does not measure")
    parser.add_argument(
        "--profile-stages",
        action="store_true",
        help="after the timing, profile one pass of each served stage and of the compiled MainNet (torch.profiler)",
    )
    parser.add_argument("--profile-rows", type=int, default=12, help="operations kept per profiled pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    parser.add_argument("--sst2-data", type=Path, default=None, help="folder of SST-2's dev.tsv")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="folder of a BERT-uncased tokenizer (default: all-MiniLM-L6-v2's)"
    )
    parser.add_argument("--sst2-mainnet", type=Path, default=None, help="folder of the fine-tuned MiniLM MainNet")
    parser.add_argument("--sst2-sidenet", type=Path, default=None, help="folder of its SideNet (sidenet fit)")
    quick = {
        "device": "cpu",
        "compile_modes": ["default"],
        "compile_backend": "eager",
        "serving_backend": "eager",
        "repeats": 2,
        "warmup": 1,
        "image_samples": 24,
        "text_limit": 24,
        "budget_s": None,
        "max_wait": 2,
        # One thread: tiny tensors gain nothing from two, and spinning threads suffer on a shared machine.
        "threads": 1,
    }
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            parser.exit(
                2,
                "no CUDA device: run with --quick for the CPU smoke run, or --device cpu to time the full\n"
                "workloads on the CPU (slow; not the GPU figures)\n",
            )
        args.device = "cuda"
    args.out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    args.command = "PYTHONPATH=src python3 benchmarks/gpu.py" + "".join(f" {a}" for a in (argv or []))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    args = options(argv if argv is not None else sys.argv[1:])
    result = run(args)
    done = "complete" if result["complete"] else f"{len(result['skipped'])} case(s) skipped"
    print(f"wrote {args.out} ({len(result['rows'])} rows, {done}, {result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
