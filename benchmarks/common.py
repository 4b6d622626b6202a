"""Shared pieces of the benchmark scripts: environment facts and writing results."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# SIDENET_BENCH_RESULTS redirects a run (``python -m benchmarks run --quick`` does, so that smoke checks
# never overwrite the committed results); its BENCHMARKS.md is then written beside its JSON.
_DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("SIDENET_BENCH_RESULTS", _DEFAULT_RESULTS)).resolve()
MARKDOWN = ROOT / "BENCHMARKS.md" if RESULTS == _DEFAULT_RESULTS else RESULTS / "BENCHMARKS.md"
# SideNets fitted by the benchmarks (not committed), shared by calibration_report.py and serving.py.
SIDENETS = ROOT / "sidenet-output" / "benchmarks" if RESULTS == _DEFAULT_RESULTS else RESULTS / "sidenets"


def link(path: str | Path) -> str:
    """``path`` relative to the folder of the BENCHMARKS.md being written (for Markdown links)."""
    return os.path.relpath(Path(path).resolve(), MARKDOWN.parent)


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
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=False).stdout.splitlines()  # fmt: skip
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
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def pct(x: float) -> str:
    """A fraction as a percentage with two decimals."""
    return f"{100 * x:.2f}%"


def thr(t: float | None) -> str:
    """A threshold; infinity and None read "never"."""
    return "never" if t is None or (isinstance(t, float) and math.isinf(t)) else f"{t:.4f}"
