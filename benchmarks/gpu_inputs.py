"""The real-model workload's files for the GPU benchmark (issue 13, item 4: "plus the real SST-2 MiniLM
MainNet and SideNet of the benchmarks if their files fit what the device run can carry").

``make gpu-inputs`` runs this: when this machine holds the fine-tuned MiniLM MainNet of the SST-2 benchmarks
(its cache) and the SideNet the calibration step fitted on it (``sidenet-output/benchmarks/sst2-3``), it
writes them into ``.gpu-inputs/`` for ``benchmarks/gpu_check.sh``, which then passes ``--sst2-mainnet`` and
``--sst2-sidenet``. The MainNet goes cast to bfloat16: in float32 it is 87 MiB, past the 64 MiB a device run
carries; in bfloat16 it is half. A cast MainNet is another MainNet to the SideNet's fingerprint, so
``benchmarks/gpu.py`` loads the SideNet onto it without that check (the split is still checked against the
MainNet's own forward); the timing depends on shapes and exits, not on the last bits of the weights.
Without the MainNet or the SideNet here, it says so and writes nothing: the benchmark then runs its
random-weight workloads only.

    python -m benchmarks.gpu_inputs [--out .gpu-inputs] [--mainnet DIR] [--sidenet DIR]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import ROOT, SIDENETS, sidenet_dir
from sidenet.paths import cache_dir
from sidenet.text_pretrain import TextRecipe

# The names gpu_check.sh looks for inside the output folder.
MAINNET, SIDENET = "minilm", "minilm-sidenet"


def default_mainnet() -> Path:
    """Where the SST-2 benchmarks cache their fine-tuned MiniLM MainNet (the default recipe's)."""
    return cache_dir() / "mainnets" / TextRecipe().name


def default_sidenet() -> Path:
    """Where the calibration step keeps the SideNet it fitted on that MainNet at tap 3."""
    return sidenet_dir(ROOT / "benchmarks" / "results") / SIDENETS["sst2"]


def write_minilm(out: Path, mainnet: Path, sidenet: Path) -> str:
    """Write ``mainnet`` (a ``save_pretrained`` folder with its tokenizer) cast to bfloat16 into
    ``out/minilm`` and copy ``sidenet`` (a ``save_sidenet`` folder) to ``out/minilm-sidenet``; return what
    was done, or why nothing was (a missing MainNet or SideNet)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (mainnet / "config.json").is_file():
        return f"no fine-tuned MiniLM MainNet in {mainnet} (python -m benchmarks.sst2_minilm makes it): not carried"
    if not (sidenet / "sidenet_config.json").is_file():
        return f"no SideNet in {sidenet} (python -m benchmarks.calibration_report fits it): not carried"
    model = AutoModelForSequenceClassification.from_pretrained(mainnet).to(torch.bfloat16)
    target = out / MAINNET
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)  # safetensors
    AutoTokenizer.from_pretrained(mainnet).save_pretrained(target)
    shutil.rmtree(out / SIDENET, ignore_errors=True)
    shutil.copytree(sidenet, out / SIDENET)
    size = sum(f.stat().st_size for f in (out / MAINNET).rglob("*") if f.is_file()) / 2**20
    return f"wrote {target} (bfloat16, {size:.1f} MiB) and {out / SIDENET}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-inputs")
    parser.add_argument("--mainnet", type=Path, default=None, help="default: the SST-2 benchmarks' cached MainNet")
    parser.add_argument("--sidenet", type=Path, default=None, help="default: sidenet-output/benchmarks/sst2-3")
    args = parser.parse_args(argv)
    print(write_minilm(args.out, args.mainnet or default_mainnet(), args.sidenet or default_sidenet()))


if __name__ == "__main__":
    main()
