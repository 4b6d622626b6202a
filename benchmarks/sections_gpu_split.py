"""The split-cost paragraph of BENCHMARKS.md's GPU section: why a ResNet-50's served stages cost more than
the MainNet they split, the two ways around it, and, once a CUDA run measured them (``gpu.json``), what each
gave and where the time still goes (``gpu.py --profile-stages``)."""

from __future__ import annotations

from typing import Any

STATIC_MODES = ("sidenet_compiled_static", "sidenet_compiled_static_stream", "pooled_router_static")
LAYOUT_KERNELS = ("nchwToNhwc", "nhwcToNchw")  # cuDNN's conversions between the two layouts

SPLIT_COST = (
    "Why the served stages of a ResNet-50 cost more than the MainNet they split: the rest is compiled "
    "once for all its row buckets (dynamic in its rows), and inductor lays a graph's convolutions out "
    "channels-last only where their shapes are static (`decide_layout_opt` in `torch/_inductor/graph.py`; "
    "pytorch/pytorch#102670), as they are in the MainNet compiled alone; `tests/test_compiled_static_rest.py` "
    "sees that decision on the CPU (mkldnn off, the path a GPU's graphs take). Two ways around it: "
    '`compile_for_serving(..., rest_shapes="static")` compiles the rest once per bucket (`--static-rest` adds '
    'its rows, "rest per bucket"), or the MainNet and its inputs converted to channels-last '
    "(`.to(memory_format=torch.channels_last)`), whose layout inductor keeps in a dynamic graph too (seen in "
    "the same test module; `--channels-last` adds the workload `resnet50_cl`, every row of it channels-last, "
    "the MainNet alone too). A target counts the fastest served row of either layout over the faster best "
    "MainNet alone of the two."
)
# What the split-cost rows still lack, and the run that measures them.
SPLIT_COST_MISSING = {"static": "the rest per bucket", "channels_last": "the channels-last MainNet"}
SPLIT_COST_NEXT = (
    ' on a CUDA machine, `GPU_MERGE=1 GPU_BUDGET_S=360 GPU_BENCH_ARGS="--workloads resnet50 resnet50_cl '
    '--dtypes bfloat16 --static-rest --channels-last --compile-modes reduce-overhead default" '
    "bash benchmarks/gpu_check.sh` "
    "(a compilation per bucket: minutes)."
)


def _split_cost_next(rows: list[dict[str, Any]]) -> str:
    """Which of the two ways around the split cost no run has measured yet, and the run that would."""
    measured = {
        "static": any(row["mode"] in STATIC_MODES for row in rows),
        "channels_last": any(row["workload"] == "resnet50_cl" for row in rows),
    }
    missing = [SPLIT_COST_MISSING[way] for way, done in measured.items() if not done]
    return f" Not measured yet: {' and '.join(missing)};{SPLIT_COST_NEXT}" if missing else ""


def main_best_ms(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], float]:
    """The best MainNet alone's milliseconds per (workload, batch, dtype) of a GPU run's rows."""
    return {(row["workload"], row["batch"], row["dtype"]): row["ms"] for row in rows if row["mode"] == "main_best"}


def _own_ms(profile: dict[str, Any] | None, batches: int, pick: Any) -> float:
    """Milliseconds per batch of the profiled kernels ``pick`` selects (by name), 0 without a profile."""
    if not profile:
        return 0.0
    return sum(row["own_ms"] for row in profile["top"] if pick(row["name"])) / batches


def _measured(r: dict[str, Any]) -> str:
    """What the two ways gave, per bfloat16 batch: the served front + rest on a full batch over the best
    MainNet alone of the same layout, the layout conversions the dynamic rest spent, and the front's share
    with its costliest kernel; empty before a CUDA run measured both."""
    cases = {(c["workload"], c["batch"]): c for c in r["cases"] if c["dtype"] == "bfloat16"}
    best = main_best_ms(r["rows"])
    parts, cards = [], []
    for batch in sorted({b for w, b in cases if w == "resnet50"}):
        plain, cl = cases.get(("resnet50", batch)), cases.get(("resnet50_cl", batch))
        if not plain or not cl or "stage_rest_static" not in plain.get("stages_ms", {}):
            continue
        s, t = plain["stages_ms"], cl["stages_ms"]
        cards.append(plain.get("device", r["device"]))
        main, main_cl = best[("resnet50", batch, "bfloat16")], best[("resnet50_cl", batch, "bfloat16")]
        batches = plain["batches_timed"]
        profile = plain.get("profile", {})
        converts = _own_ms(profile.get("stage_rest"), batches, lambda name: any(k in name for k in LAYOUT_KERNELS))
        front = profile.get("stage_front")
        top = front["top"][0] if front and front["top"] else None
        once = top is not None and top["calls"] == batches
        parts.append(
            f"batch {batch}: front + rest {(s['stage_front'] + s['stage_rest']) / main:.2f}× the best MainNet "
            f"alone with the rest dynamic, {(s['stage_front'] + s['stage_rest_static']) / main:.2f}× per bucket, "
            f"{(t['stage_front'] + t['stage_rest']) / main_cl:.2f}× channels-last"
            + (f" (the dynamic rest spent {converts:.2f} ms a batch in cuDNN's layout conversions)" if converts else "")
            + f"; the front alone {s['stage_front'] / main:.0%} of it"
            + (
                f", {top['own_ms'] / batches:.2f} ms of its {s['stage_front']:.2f} ms a batch in one convolution "
                "kernel that a single layer runs (by its cost, the 7x7 stem over 3 channels, which tensor cores "
                "handle poorly)"
                if once
                else ""
            )
        )
    if not parts:
        return ""
    return (
        f" Measured ({' and '.join(dict.fromkeys(cards))}, bfloat16; `--profile-stages` for the kernels): "
        + "; ".join(parts)
        + ". Both ways remove most of the split's cost; what stands in the way now is the front, which every "
        "sample pays."
    )


def split_cost_paragraph(r: dict[str, Any]) -> str:
    """The paragraph: the cause, the two ways, and what a run measured of them or still has to."""
    return SPLIT_COST + _split_cost_next(r["rows"]) + _measured(r)
