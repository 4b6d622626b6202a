"""The parts of BENCHMARKS.md's GPU section computed on the CPU: the tensor operations per routed batch of
the GPU workloads (``gpu_operations.json``) and the roofline of the split ResNet-50 (``gpu_roofline.json``),
set beside the stage times a CUDA run measured (``gpu.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.sections_gpu_split import main_best_ms


def _measured(results: Path, workload: str, batch: int, card: str) -> dict[str, float] | None:
    """The CUDA run's bfloat16 stage times and best MainNet alone for ``workload`` at ``batch`` (ms), or None;
    None too where that case ran on another card than ``card`` (the roofline's)."""
    path = results / "gpu.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    if r.get("device_type") != "cuda" or r.get("quick"):
        return None
    case = next(
        (c for c in r["cases"] if (c["workload"], c["batch"], c["dtype"]) == (workload, batch, "bfloat16")), None
    )
    best = main_best_ms(r["rows"]).get((workload, batch, "bfloat16"))
    stages = (case or {}).get("stages_ms", {})
    if best is None or not {"stage_front", "stage_rest"} <= set(stages):
        return None
    device = (case or {}).get("device", r["device"])
    if card not in device:
        return None
    rest = min(stages["stage_rest"], stages.get("stage_rest_static", stages["stage_rest"]))  # the faster served rest
    return {"front": stages["stage_front"], "rest": rest, "main_best": best, "device": device}


def roofline_lines(results: Path) -> list[str]:
    """The roofline table (and, where a CUDA run measured the same case, how far each part ran from it);
    nothing before ``gpu_roofline.json`` exists."""
    path = results / "gpu_roofline.json"
    if not path.is_file():
        return []
    r: dict[str, Any] = json.loads(path.read_text())
    m, card = r["machine"], r.get("card", "H100")  # results from before --card were the H100's
    lines = [
        f"### Where a split {r['workload']}'s time should go on an {card}: a roofline (computed on the CPU)",
        "",
        f"Command: `{r['command']}` — {m['date']}, torch {m['torch']}, commit {m['commit'] or 'n/a'}. Per fused "
        "operation, time = max(FLOPs / peak, bytes / bandwidth) at "
        f"{r['peak_tflops']:g} TFLOPS and {r['bandwidth_tbs']:g} TB/s ({card} SXM datasheet, bfloat16), "
        f"{r['image_size']}x{r['image_size']} images, tap {r['tap']}; as inductor runs them, each convolution "
        "then one fused pass over its output (batch norm, ReLU, a block's residual add): a lower bound per part, "
        "not a prediction. The front is "
        "the trunk to the tap and the SideNet; its share of the time, not of the FLOPs, bounds what exiting "
        "there can save on a GPU.",
        "",
        "| batch | front: share of FLOPs | front: share of roofline time | ideal at exit 0.8 by FLOPs "
        "| by the roofline | measured (bf16): front / best MainNet alone | ideal from the measured stages "
        "| roofline efficiency: best MainNet alone, front, rest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in r["rows"]:
        parts, ideal = row["parts"], row["ideal_speedup"]["0.8"]
        front_ms = parts["trunk"]["roofline_ms"] + parts["sidenet"]["roofline_ms"]
        measured = _measured(results, r["workload"], row["batch"], card)
        if measured is None:
            seen = ["not measured", "–", "–"]
        else:
            staged = measured["main_best"] / (measured["front"] + 0.2 * measured["rest"])
            efficiency = (
                f"{row['mainnet_roofline_ms'] / measured['main_best']:.0%}, {front_ms / measured['front']:.0%}, "
                f"{parts['rest']['roofline_ms'] / measured['rest']:.0%}"
            )
            seen = [f"{measured['front'] / measured['main_best']:.0%}", f"{staged:.2f}×", efficiency]
            notes.append(measured["device"])
        lines.append(
            f"| {row['batch']} | {row['front_flops_share']:.0%} | {row['front_roofline_share']:.0%} "
            f"| {ideal['flops']:.2f}× | {ideal['roofline']:.2f}× | " + " | ".join(seen) + " |"
        )
    lines.append("")
    if notes:
        lines += [
            f"Measured on {notes[0]} (the GPU run above; exit share taken as exactly 0.8 here; the rest the faster "
            "of its dynamic and per-bucket forms). Roofline efficiency: the roofline time over the measured time: "
            "where the served front and rest run further from their roofline than the MainNet compiled whole, "
            "splitting it costs more than it must.",
            "",
        ]
    return lines


def roofline_summary(results: Path) -> str:
    """One sentence for the summary: the front's share of the roofline time against its share of the
    FLOPs at the largest batch, and the ideals at exit 0.8 by each; empty before the step ran."""
    path = results / "gpu_roofline.json"
    if not path.is_file():
        return ""
    r = json.loads(path.read_text())
    card = r.get("card", "H100")  # results from before --card were the H100's
    row = max(r["rows"], key=lambda row: row["batch"])
    ideal = row["ideal_speedup"]["0.8"]
    return (
        f" By a roofline of an {card} (section GPU), the front of a {r['workload']} split at {r['tap']} holds "
        f"{row['front_flops_share']:.0%} of its FLOPs but {row['front_roofline_share']:.0%} of its time at batch "
        f"{row['batch']}: at 80% exit the ideal is {ideal['roofline']:.2f}×, not the {ideal['flops']:.2f}× of the "
        "FLOPs."
    )


def operations_lines(results: Path) -> list[str]:
    """Tensor operations per routed batch of the GPU workloads, counted on the CPU
    (``gpu_operations.json``, written by ``benchmarks/gpu_operations.py``); nothing before it ran."""
    path = results / "gpu_operations.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    m = r["machine"]
    lines = [
        "### Tensor operations per routed batch (each a kernel launch on a GPU; counted on the CPU)",
        "",
        f"Command: `{r['command']}` — {m['date']}, torch {m['torch']}, commit {m['commit'] or 'n/a'}. The GPU "
        "workloads above, random weights, sidenet's value checks off as on CUDA, averaged over the batches"
        + (
            f"; ResNet-50 at {r['image_size']}x{r['image_size']} (its operations do not depend on the image size)"
            if r.get("image_size")
            else ""
        )
        + ". Where eager routing is bound by launches, its time follows these counts.",
        "",
        "| workload | batch | dtype | exit share | MainNet alone | minimal router | sidenet eager (× minimal) "
        "| sidenet issues more of | fewer of |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        more = ", ".join(f"{k} {v:g}" for k, v in row["more_than_minimal"].items()) or "–"
        fewer = ", ".join(f"{k} {v:g}" for k, v in row["fewer_than_minimal"].items()) or "–"
        lines.append(
            f"| {row['workload']} | {row['batch']} | {row['dtype']} | {row['exit_share']:.2f} | {row['mainnet']:.0f} "
            f"| {row['minimal_router']:.0f} | {row['sidenet_eager']:.0f} "
            f"({row['sidenet_eager'] / row['minimal_router']:.3f}×) | {more} | {fewer} |"
        )
    return [*lines, ""]
