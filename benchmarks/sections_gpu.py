"""The GPU section of BENCHMARKS.md, rendered from ``gpu.json`` (written by ``benchmarks/gpu.py`` on a
CUDA machine); until a CUDA run's JSON is there it says that the GPU figures are not measured yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.sections_gpu_cpu import operations_lines, roofline_lines, roofline_summary
from benchmarks.sections_gpu_split import main_best_ms, split_cost_paragraph

# Issue 13's targets: bfloat16, exit share 0.8, the best served row over the best MainNet alone.
TARGETS = {("resnet50", 64): 1.3, ("resnet50", 256): 1.5, ("bert_base", 128): 1.4, ("bert_base", 32): 1.1}
EAGER_OVER_MINIMAL = 1.05  # sidenet eager at most 5% slower than the minimal eager router
SERVED = ("sidenet_cuda_graph", "sidenet_compiled", "sidenet_compiled_stream", "pooled_router")
COLUMNS = ("minimal_router", "sidenet_eager", *SERVED, "ideal")
HEADERS = ("minimal router", "sidenet eager", "eager kernels, CUDA graphs", "compiled", "compiled, pipelined")
HEADERS += ("PooledRouter, compiled", "ideal")
# The serving modes' compile seconds (the variants where a case has them) and their columns' names.
SERVING_MODES = {
    "sidenet_compiled": "serving mode",
    "sidenet_compiled_static": "serving mode, rest per bucket",
    "sidenet_compiled_autotune": "serving mode, autotuned",
}
# Rows of a run with --static-rest (the rest compiled per row bucket) or --serving-autotune (max-autotune's
# kernels), shown where a run has them.
VARIANTS = {
    "sidenet_compiled_static": "compiled, rest per bucket",
    "sidenet_compiled_static_stream": "pipelined, rest per bucket",
    "pooled_router_static": "PooledRouter, rest per bucket",
    "sidenet_compiled_autotune": "compiled, autotuned",
    "sidenet_compiled_autotune_stream": "pipelined, autotuned",
    "pooled_router_autotune": "PooledRouter, autotuned",
}
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune")
COMPILED = ("main_compile_default", "main_compile_reduce-overhead", "main_compile_max-autotune", "main_cuda_graph")
METHOD = (
    "Method: MainNets and SideNets have random weights, because the time of a routed batch depends on the "
    "shapes and on the share of samples that exit, not on what the weights know; each exit share is set by a "
    "threshold at that quantile of the SideNet's confidences on the timed batches (strictly between two of "
    "them; the realised share is shown). The baseline is the best MainNet alone at the same batch and "
    "precision: the fastest of eager, `torch.compile` (default, reduce-overhead, max-autotune) and one CUDA "
    "graph. Milliseconds per batch, median of interleaved passes after warm-up, device-synchronised; in "
    "brackets the speed-up over the best MainNet alone. Ideal: trunk + SideNet on every sample plus the rest "
    "on a full batch times the continuing share, from the serving mode's own stages timed in the same run. "
    "Compiled: `compile_for_serving`'s default, on CUDA `torch.compile`'s kernels captured in CUDA graphs "
    "per shape; eager kernels, CUDA graphs: the same stages with their eager kernels captured (what fused "
    "kernels add)."
)
RUN = (
    "Planned: ResNet-50 at 224 (tap layer1, batches 64 and 256) and BERT-base (tap 3, SST-2 dev sentences, "
    "batches 32 and 128), bfloat16 and float32, exit shares 0.5 and 0.8. On a CUDA machine (PyTorch, "
    "torchvision and transformers; no project pins needed): `PYTHONPATH=src python3 benchmarks/gpu.py` "
    "(a 270-second budget, compile times included, bfloat16 cases first; the JSON is rewritten after each "
    "case), then `python -m benchmarks report`. Of the `torch.compile` modes, reduce-overhead is always "
    "compiled, default only with 120 s of budget left and max-autotune (minutes to compile) with 300 s: "
    "`--dtypes bfloat16 --default-min-s 0 --autotune-min-s 0 --budget-s 540 --merge` remeasures the "
    "bfloat16 cases with every mode, keeping the other cases. With the device tool: `make gpu-inputs` "
    "here, then `bash benchmarks/gpu_check.sh` there (carrying `.gpu-inputs`): the CUDA tests, then this "
    "benchmark, in one call. `make gpu-rehearsal` runs that script on a CPU first, in a venv of the device "
    "image's torch 2.11, torchvision 0.26 and transformers 5.17 (every test of its modules, the benchmark's "
    "`--quick` run): what those releases break shows there, not in device time."
)

# Why a split ResNet-50 costs more than the whole: the reason found in PyTorch's source, and what to measure.
MINILM_NEXT = (
    "Not measured yet: the fine-tuned MiniLM MainNet of the SST-2 benchmarks with its fitted SideNet "
    "(`minilm_sst2`). `make gpu-inputs` carries them where this machine has them (the MainNet cast to bfloat16, "
    "44 MiB, to fit a device run; `benchmarks/gpu_inputs.py`), and `benchmarks/gpu_check.sh` then adds them: "
    '`GPU_MERGE=1 GPU_BENCH_ARGS="--workloads minilm_sst2 --compile-modes reduce-overhead default"`.'
)


def _passes(r: dict[str, Any]) -> str:
    """Timed and warm-up passes per row: each case's (merged runs may differ; ``--merge`` fills them in for
    the earlier cases, a JSON of one run may lack them and then took its settings)."""
    default = {"timed": r["settings"]["repeats"], "warmup": r["settings"]["warmup"]}
    passes = [c.get("passes", default) for c in r["cases"]] or [default]

    def span(key: str) -> str:
        low, high = min(p[key] for p in passes), max(p[key] for p in passes)
        return str(low) if low == high else f"{low}–{high}"

    return f"{span('timed')} timed passes per row after {span('warmup')} warm-up passes"


def _modes_tried(rows: list[dict[str, Any]]) -> str:
    """Which ``torch.compile`` modes the best MainNet alone was chosen from, case by case (merged runs may
    differ): the modes no case tried, and those only some cases tried."""
    cases: dict[tuple, set[str]] = {}
    for row in rows:
        modes = cases.setdefault((row["workload"], row["batch"], row["dtype"]), set())
        if row["mode"].startswith("main_compile_"):
            modes.add(row["mode"].removeprefix("main_compile_"))
    everywhere = [m for m in COMPILE_MODES if all(m in modes for modes in cases.values())]
    parts = []
    for mode in COMPILE_MODES:
        where = [f"{w} {b} {d}" for (w, b, d), modes in cases.items() if mode in modes]
        if mode not in everywhere:
            parts.append(f"{mode} ({'in ' + ', '.join(where) + ' only' if where else 'in no case'})")
    if not parts:
        return ""
    return (
        f"; `torch.compile` modes tried: {', '.join(everywhere) or 'none'} in every case (**not: {'; '.join(parts)}**)"
    )


def _cell(row: dict[str, Any] | None) -> str:
    return "–" if row is None else f"{row['ms']:.2f} ({row['speedup_vs_main_best']:.2f}×)"


def _spread(row: dict[str, Any]) -> str:
    low, high = row.get("ms_spread") or (row["ms"], row["ms"])
    return f"{row['ms']:.2f} [{low:.2f}–{high:.2f}] ms"


def _bound(case: dict[str, Any] | None, best: dict[str, Any] | None, share: float) -> str:
    """What caps a speed-up target: the served stages' own times against the best MainNet alone."""
    if not case or not best or not {"stage_front", "stage_rest"} <= set(case.get("stages_ms", {})):
        return ""
    front, rest = case["stages_ms"]["stage_front"], case["stages_ms"]["stage_rest"]
    ideal = best["ms"] / (front + (1 - share) * rest)
    static = case["stages_ms"].get("stage_rest_static")
    per_bucket = f"; the rest compiled per bucket {static:.2f} ms on a full batch against {rest:.2f}" if static else ""
    return (
        f"; the ideal of these stages is {ideal:.2f}× (the served front, run on every sample, takes "
        f"{front / best['ms']:.0%} of the best MainNet's time, and front + rest on a full batch "
        f"{(front + rest) / best['ms']:.2f}× it{per_bucket})"
    )


def _family(workload: str) -> tuple[str, str]:
    """A target's workload and its channels-last variant (``--channels-last``)."""
    return workload, f"{workload}_cl"


def _layout(row: dict[str, Any]) -> str:
    return ", channels-last" if row["workload"].endswith("_cl") else ""


def _main_best(rows: list[dict[str, Any]], workload: str, batch: int) -> dict[str, Any] | None:
    """The best MainNet alone of a target case (bfloat16) in either layout: the faster where both ran."""
    found = [
        r
        for r in rows
        if r["workload"] in _family(workload)
        and (r["batch"], r["dtype"], r["mode"]) == (batch, "bfloat16", "main_best")
    ]
    return min(found, key=lambda r: r["ms"], default=None)


def _best_served(rows: list[dict[str, Any]], workload: str, batch: int) -> tuple[dict[str, Any], float] | None:
    """The fastest served row (compiled or graph-captured, the rest per bucket too, either layout) of a target
    case, bfloat16, exit share 0.8, and its speed-up over :func:`_main_best`; None where the rows have none."""
    served = [
        r
        for r in rows
        if r["workload"] in _family(workload)
        and (r["batch"], r["dtype"], r["target_exit_share"]) == (batch, "bfloat16", 0.8)
        and r["mode"] in (*SERVED, *VARIANTS)
    ]
    best, main = min(served, key=lambda r: r["ms"], default=None), _main_best(rows, workload, batch)
    return None if best is None or main is None else (best, main["ms"] / best["ms"])


def _targets(rows: list[dict[str, Any]], cases: list[dict[str, Any]]) -> list[str]:
    """One line per issue-13 target that the rows can answer, with what bounds it."""
    by_case = {(c["workload"], c["batch"]): c for c in cases if c["dtype"] == "bfloat16"}

    def find(workload: str, batch: int, mode: str, share: float | None = 0.8) -> dict[str, Any] | None:
        found = [
            r
            for r in rows
            if (r["workload"], r["batch"], r["dtype"], r["mode"]) == (workload, batch, "bfloat16", mode)
            and r["target_exit_share"] == share
        ]
        return found[0] if found else None

    lines = []
    for (workload, batch), bound in TARGETS.items():
        found = _best_served(rows, workload, batch)
        if found is None:
            continue
        (best, value), main = found, _main_best(rows, workload, batch) or {}
        case = by_case.get((best["workload"], batch))
        lines.append(
            f"- {workload}, batch {batch}, bf16, exit 0.8: {value:.2f}× over the best MainNet alone "
            f"({best['mode']}{_layout(best)}; MainNet {main.get('best_of', '?').removeprefix('main_')}{_layout(main)}) "
            f"vs ≥ {bound}: **{'met' if value >= bound else 'NOT met'}**" + _bound(case, main, best["exit_share"])
        )
        eager, minimal = find(workload, batch, "sidenet_eager"), find(workload, batch, "minimal_router")
        if eager and minimal:
            ratio = eager["ms"] / minimal["ms"]
            ops = (case or {}).get("operations_per_batch", {})
            counted = (
                f"; operations per batch: {ops['sidenet_eager@0.8']:.0f} against {ops['minimal_router@0.8']:.0f}"
                if {"sidenet_eager@0.8", "minimal_router@0.8"} <= set(ops)
                else ""
            )
            lines.append(
                f"- {workload}, batch {batch}: sidenet eager at {ratio:.3f}× the minimal router's time vs ≤ "
                f"{EAGER_OVER_MINIMAL}: **{'met' if ratio <= EAGER_OVER_MINIMAL else 'NOT met'}** (median [range] of "
                f"the passes: {_spread(eager)} against {_spread(minimal)}{counted})"
            )
    return lines


def _table(r: dict[str, Any], workload: str) -> list[str]:
    """Per (batch, dtype, exit share): the MainNet rows, then the routed ones."""
    rows = [row for row in r["rows"] if row["workload"] == workload]
    extra = [mode for mode in VARIANTS if any(row["mode"] == mode for row in rows)]
    headers, columns = (*HEADERS, *(VARIANTS[m] for m in extra)), (*COLUMNS, *extra)
    lines = [
        "| batch | dtype | exit share | MainNet eager | best MainNet alone | " + " | ".join(headers) + " |",
        "|---" * (5 + len(headers)) + "|",
    ]
    cases = sorted({(row["batch"], row["dtype"]) for row in rows}, key=lambda c: (c[1] != "bfloat16", c[0]))
    for batch, dtype in cases:
        mine = [row for row in rows if (row["batch"], row["dtype"]) == (batch, dtype)]
        by_mode = {row["mode"]: row for row in mine if row["exit_share"] is None}
        best = by_mode["main_best"]
        for target in sorted({row["target_exit_share"] for row in mine if row["target_exit_share"] is not None}):
            routed = {row["mode"]: row for row in mine if row["target_exit_share"] == target}
            share = next(iter(routed.values()))["exit_share"]
            lines.append(
                f"| {batch} | {dtype} | {share:.2f} | {by_mode['main_eager']['ms']:.2f} | {best['ms']:.2f} "
                f"({best['best_of'].removeprefix('main_')}) | "
                + " | ".join(_cell(routed.get(m)) for m in columns)
                + " |"
            )
    return lines


def _compile_times(r: dict[str, Any]) -> list[str]:
    """Compile (or capture) seconds per case: each MainNet variant's first pass, the serving mode's own."""
    serving = [m for m in SERVING_MODES if m == "sidenet_compiled" or any(m in c["compile_s"] for c in r["cases"])]
    names = [m.removeprefix("main_") for m in COMPILED] + [SERVING_MODES[m] for m in serving]
    lines = ["| workload | batch | dtype | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for case in r["cases"]:
        seconds = case["compile_s"]
        cells = [f"{seconds[m]:.1f}" if m in seconds else "–" for m in (*COMPILED, *serving)]
        lines.append(f"| {case['workload']} | {case['batch']} | {case['dtype']} | " + " | ".join(cells) + " |")
    return lines


def _read(results: Path) -> tuple[dict[str, Any] | None, bool]:
    """``results/gpu.json`` (None before a run wrote it) and whether it holds GPU figures (a CUDA run,
    not ``--quick``)."""
    path = results / "gpu.json"
    r = json.loads(path.read_text()) if path.is_file() else None
    return r, r is not None and r.get("device_type") == "cuda" and not r.get("quick")


def _cards(r: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The cases of each card a (merged) JSON's cases ran on; cases from before cards were recorded per case
    ran on the run's."""
    cards: dict[str, list[dict[str, Any]]] = {}
    for case in r["cases"]:
        cards.setdefault(case.get("device", r["device"]), []).append(case)
    return cards or {r["device"]: []}


def _card_of(r: dict[str, Any], workload: str, batch: int) -> str:
    """The card of the bfloat16 case of ``workload`` at ``batch`` (a family's, for ResNet-50)."""
    return next(
        (
            case.get("device", r["device"])
            for case in r["cases"]
            if case["workload"] in _family(workload) and case["batch"] == batch and case["dtype"] == "bfloat16"
        ),
        r["device"],
    )


def gpu_summary(results: Path) -> list[str]:
    """The GPU paragraph of BENCHMARKS.md's summary: each target case's best served speed-up over the best
    MainNet alone, and what holds the convolutional case back; nothing until a CUDA run wrote ``gpu.json``."""
    r, measured = _read(results)
    if not measured:
        return []
    best = {(w, b): _best_served(r["rows"], w, b) for w, b in TARGETS}
    several = len(_cards(r)) > 1  # merged runs on different cards: each figure says its card
    found = [
        f"{w} batch {b} **{got[1]:.2f}×**{_layout(got[0])}" + (f" ({_card_of(r, w, b)})" if several else "")
        for (w, b), got in best.items()
        if got
    ]
    if not found:
        return []
    text = (
        f"**GPU ({' and '.join(_cards(r))}, random weights, bfloat16, 80% exit).** Over the best MainNet alone "
        "(the fastest "
        f"of eager, `torch.compile` and a CUDA graph), the compiled serving mode: {', '.join(found)}. "
    )
    main_best = main_best_ms(r["rows"])
    sums: dict[str, list[float]] = {}  # ResNet-50's served front + rest on a full batch over its best MainNet
    fronts: list[float] = []  # and its served front alone
    for case in r["cases"]:
        stages, key = case.get("stages_ms", {}), (case["workload"], case["batch"], case["dtype"])
        if key[0] in _family("resnet50") and key[2] == "bfloat16" and {"stage_front", "stage_rest"} <= set(stages):
            rests = [stages["stage_rest"], stages.get("stage_rest_static", stages["stage_rest"])]
            sums.setdefault(key[0], []).append((stages["stage_front"] + min(rests)) / main_best[key])
            fronts.append(stages["stage_front"] / main_best[key])
    if sums:

        def span(values: list[float], form: str) -> str:
            low, high = format(min(values), form), format(max(values), form)
            return low if low == high else f"{low}–{high}"

        spans = [f"{span(v, '.2f')}×{' channels-last' if w.endswith('_cl') else ''}" for w, v in sorted(sums.items())]
        remedied = any(c.get("stages_ms", {}).get("stage_rest_static") for c in r["cases"]) and "resnet50_cl" in sums
        why = (
            f"the front alone, which every sample pays, takes {span(fronts, '.0%')} of the best MainNet's time"
            if remedied
            else "see the GPU section for why and what is not yet measured"
        )
        text += (
            f"Where it does not pay in full: ResNet-50's served stages together take {' and '.join(spans)} "
            f"the compiled MainNet's time ({why})."
        ) + roofline_summary(results)
    return [text, ""]


def gpu_section(results: Path) -> list[str]:
    """The GPU section from ``results/gpu.json``; "not measured yet" until a CUDA run wrote it."""
    r, measured = _read(results)
    lines = ["## GPU serving: compiled and pipelined stages (issue 13)", ""]
    if not measured:
        where = "no `gpu.json` yet" if r is None else f"the JSON here is from a {r['device_type']} run"
        lines += [f"**GPU figures: not measured yet** ({where}). {RUN}", ""]
    lines += [METHOD, ""]
    if r is None:
        return [*lines, *operations_lines(results), *roofline_lines(results)]
    if not measured:
        smoke = " (`--quick`: tiny models)" if r.get("quick") else ""
        lines += [f"The tables below are from that {r['device_type']} run{smoke}, not GPU figures.", ""]
    earlier = r.get("merged_commands", [])
    if earlier:  # --merge: the cases of earlier runs kept; each run's command, in order
        lines += ["Runs (the cases of earlier runs kept by `--merge`, the last one's details below):", ""]
        lines += [f"{i}. `{c}`" for i, c in enumerate([*earlier, r["command"]], 1)] + [""]
    lines += [
        f"Command: `{r['command']}` — {r['date']}, {r['device']}, torch {r['torch']}, torchvision "
        f"{r['torchvision']}, transformers {r['transformers']}, commit {r['commit'] or 'n/a'}; "
        f"{r['elapsed_s']:.0f} s{'' if r['complete'] else ' (incomplete: see what was not measured below)'}; "
        + _passes(r)
        + _modes_tried(r["rows"])
        + ".",
        *(
            [
                "Cards (runs merged): "
                + "; ".join(
                    f"{card}: " + ", ".join(f"{c['workload']} {c['batch']} {c['dtype']}" for c in cases)
                    for card, cases in _cards(r).items()
                )
                + ". Each speed-up compares the rows of one case, timed on one card in one run."
            ]
            if len(_cards(r)) > 1
            else []
        ),
        f"Text: {r['text']['source']}"
        + (f" ({r['text']['why']}; {r['text']['lengths']})" if r["text"].get("why") else "")
        + (f", tokenised by {r['text']['tokenizer']}" if r["text"].get("tokenizer") else "")
        + f"; compiled and graph-captured text rows pad to the lengths {r['length_buckets']}.",
        "",
    ]
    for workload, description in r["workloads"].items():
        if any(row["workload"] == workload for row in r["rows"]):
            lines += [f"### {description}", "", *_table(r, workload), ""]
    targets = _targets(r["rows"], r["cases"])
    if targets:
        lines += ["Targets (issue 13; served = the fastest of the compiled and graph-captured rows):", "", *targets, ""]
        lines += [split_cost_paragraph(r), ""]
        if not any(row["workload"] == "minilm_sst2" for row in r["rows"]):
            lines += [MINILM_NEXT, ""]
    if r["cases"]:
        lines += ["Compile and capture seconds (first pass over the timed batches):", "", *_compile_times(r), ""]
    skipped = [
        f"{c['workload']} {c['batch']} {c['dtype']}: {m} ({why})" for c in r["cases"] for m, why in c["skipped"].items()
    ]
    skipped += [
        f"{s['workload']} {s['batch']} {s['dtype']}: {s['reason']}" + (f" ({s['kept']} kept)" if s.get("kept") else "")
        for s in r["skipped"]
    ]
    if skipped:
        lines += ["Not measured: " + "; ".join(skipped) + ".", ""]
    return [*lines, *operations_lines(results), *roofline_lines(results)]
