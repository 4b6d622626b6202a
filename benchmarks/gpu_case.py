"""One case of the GPU benchmark (``benchmarks/gpu.py``): a (workload, batch, dtype), every row of it timed
in one interleaved session: the MainNet alone (eager, each ``torch.compile`` mode, one CUDA graph), the eager
routers, the compiled serving mode and its variants, and the served stages for the ideal."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import sidenet
from sidenet import AdaptiveModel
from sidenet.compiled import capture_cuda_graph, compile_for_serving
from sidenet.compiled_stages import COMPILING_BACKENDS, default_row_buckets, padded_text
from sidenet.timing import count_operations
from sidenet.training import to_mainnet

if __package__:  # imported as benchmarks.gpu_case
    from benchmarks import gpu_runners as runners
    from benchmarks import gpu_workloads as inputs
else:  # by benchmarks/gpu.py run as a script: its folder is on the import path, the checkout is not
    import gpu_runners as runners
    import gpu_workloads as inputs

# In the order tried: reduce-overhead (inductor + CUDA graphs) is the likeliest best MainNet on a GPU, and
# default then reuses its inductor graph from the FX graph cache; max-autotune costs minutes.
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune")
MAIN_MODES = ("main_eager", *(f"main_compile_{m}" for m in COMPILE_MODES), "main_cuda_graph")
ROUTED_MODES = ("minimal_router", "sidenet_eager", "sidenet_cuda_graph", "sidenet_compiled")
ROUTED_MODES += ("sidenet_compiled_stream", "pooled_router")
# With --static-rest: the serving mode with its rest compiled per row bucket (rest_shapes="static").
ROUTED_MODES += ("sidenet_compiled_static", "sidenet_compiled_static_stream", "pooled_router_static")
# With --serving-autotune: the serving mode's stages compiled with max-autotune's kernel choices.
ROUTED_MODES += ("sidenet_compiled_autotune", "sidenet_compiled_autotune_stream", "pooled_router_autotune")
STAGES = ("stage_front", "stage_rest", "stage_rest_static")


@dataclass
class Case:
    """One (workload, batch, dtype): the adaptive model (random SideNet) and the batches timed."""

    workload: inputs.Workload
    batch: int
    dtype: torch.dtype
    device: torch.device
    batches: list[Any]
    model: AdaptiveModel

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def key(self) -> dict[str, Any]:
        return {"workload": self.workload.name, "batch": self.batch, "dtype": self.dtype_name}


def build_case(workload: inputs.Workload, batch: int, dtype: torch.dtype, args: argparse.Namespace, text: Any) -> Case:
    """The MainNet (random weights, seed 0) on the device in ``dtype``, its SideNet and the batches."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if workload.sidenet_dir is not None:
        # Without the fingerprint check: the MainNet is carried to the device cast to bfloat16 to fit
        # (benchmarks/gpu_inputs.py), another MainNet to the fingerprint; the split is still checked.
        loaded = sidenet.load_sidenet(workload.build(), workload.sidenet_dir, check_fingerprint=False)
        model = loaded.to(device=device, dtype=dtype).eval()
    else:
        with device:  # parameters initialised on the device: seconds faster for BERT-base than on the CPU
            mainnet = workload.build()
        mainnet = mainnet.eval().to(device=device, dtype=dtype)
        if workload.channels_last:
            mainnet = mainnet.to(memory_format=torch.channels_last)
        shape = {"input_shape": (3, workload.image_size, workload.image_size)} if workload.kind == "vision" else {}
        model = sidenet.attach(mainnet, workload.tap, **shape).eval()
    if workload.kind == "vision":
        count = max(3, args.image_samples // batch)
        batches = inputs.image_batches(batch, count, workload.image_size, device, dtype)
        if workload.channels_last:
            batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    else:
        sentences, tokenizer, _ = text
        made = (
            inputs.tokenized_batches(sentences, tokenizer, batch)
            if sentences is not None
            else inputs.synthetic_text_batches(inputs.synthetic_lengths(args.text_limit or 872), batch)
        )
        batches = [to_mainnet(model.split, b) for b in made]  # token ids keep their dtype
    return Case(workload, batch, dtype, device, batches, model)


@torch.no_grad()
def confidences(case: Case) -> torch.Tensor:
    """The SideNet's exit scores on every timed sample (the model's own rule, in float32)."""
    model = case.model
    scores = [model.policy.confidence(model.side_logits(model.split.trunk(x))) for x in case.batches]
    return torch.cat(scores).float().cpu()


def compile_options(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Keywords of ``torch.compile`` for ``mode`` as a user writes them (the quick run: Dynamo only).
    Shapes are left to Dynamo's default: text compiles once static, then once with a dynamic length."""
    if args.compile_backend != "inductor":
        return {"backend": args.compile_backend}
    return {"mode": mode}


def mainnet_passes(case: Case, args: argparse.Namespace, clock: runners.Clock, report: dict) -> dict[str, Callable]:
    """Passes of the MainNet alone: eager on the batches as padded, compiled and graph-captured on the
    bucketed batches; each variant's compile time (its first pass) goes into ``report``."""
    kind, device = case.workload.kind, case.device
    mainnet = case.model.split.mainnet
    call = runners.mainnet_call(mainnet, kind)
    padded = inputs.bucketed(case.batches, kind)
    passes = {"main_eager": runners.loop(call, case.batches)}
    for mode in args.compile_modes:
        name = f"main_compile_{mode}"
        # reduce-overhead is tried always; the others, which rarely beat it on a GPU, while budget is left.
        needed, flag = {
            "default": (args.default_min_s, "--default-min-s"),
            "max-autotune": (args.autotune_min_s, "--autotune-min-s"),
        }.get(mode, (0.0, ""))
        if clock.left() < needed:
            report["skipped"][name] = f"time budget: less than {needed:.0f} s left (rerun with {flag} 0 --merge)"
            continue
        try:
            compiled = torch.compile(mainnet, **compile_options(args, mode))
            run = runners.loop(runners.mainnet_call(compiled, kind), padded)
            report["compile_s"][name] = runners.first_pass(run, device)
            passes[name] = run
        except Exception as exc:  # a mode that fails on this image is a finding, not the end of the run
            report["skipped"][name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if device.type != "cuda":
        report["skipped"]["main_cuda_graph"] = "CUDA graphs need a CUDA device"
        return passes
    try:
        started = time.perf_counter()
        graphed = runners.per_shape(lambda x: capture_cuda_graph(call, x), runners.shape_key)
        for x in padded:
            graphed(x)
        report["compile_s"]["main_cuda_graph"] = time.perf_counter() - started
        passes["main_cuda_graph"] = runners.loop(graphed, padded)
    except Exception as exc:
        report["skipped"]["main_cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return passes


def eager_passes(case: Case, tag: str, threshold: float) -> dict[str, Callable]:
    """The eager routers at ``threshold`` (named ``<mode>@<share>``): the minimal one and sidenet's."""
    routed = runners.at_threshold(case.model, threshold)
    return {
        f"minimal_router{tag}": runners.loop(runners.minimal_router(routed), case.batches),
        f"sidenet_eager{tag}": runners.loop(routed, case.batches),
    }


def at(model: AdaptiveModel, threshold: float, run: Callable[[], Any]) -> Callable[[], None]:
    """``run`` with ``model``'s threshold set first: one served model times every exit share, its stages
    compiled once (a threshold is an input of the compiled stages, not a recompilation)."""

    def one_pass() -> None:
        model.threshold = threshold
        run()

    return one_pass


def serving_variants(case: Case, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The served rows and their ``compile_for_serving`` settings: the backend asked for (``auto``:
    compiled kernels in CUDA graphs on CUDA); on CUDA the eager kernels captured alone (what fusion adds);
    with ``--static-rest`` the rest of an image workload compiled per row bucket (the CUDA default buckets, on
    any device): the remedy for the layout of convolutions, so not for text (a compilation per bucket and
    length) nor for a channels-last workload (the other way to that layout)."""
    variants: dict[str, dict[str, Any]] = {"sidenet_compiled": {"backend": args.serving_backend}}
    if case.device.type == "cuda" and args.serving_backend in ("auto", "inductor_cuda_graph"):
        variants["sidenet_cuda_graph"] = {"backend": "cuda_graph"}
    if args.static_rest and case.workload.kind == "vision" and not case.workload.channels_last:
        variants["sidenet_compiled_static"] = {
            "backend": args.serving_backend,
            "rest_shapes": "static",
            "rest_buckets": default_row_buckets(case.batch),
        }
    if args.serving_autotune and args.serving_backend in ("auto", *COMPILING_BACKENDS):
        variants["sidenet_compiled_autotune"] = {"backend": args.serving_backend, "autotune": True}
    return variants


# Per fully timed variant: its pipelined row, its PooledRouter row and the stage timing its rest gives.
FULL_VARIANTS = {
    "sidenet_compiled": ("sidenet_compiled_stream", "pooled_router", "stage_rest"),
    "sidenet_compiled_static": ("sidenet_compiled_static_stream", "pooled_router_static", "stage_rest_static"),
    "sidenet_compiled_autotune": ("sidenet_compiled_autotune_stream", "pooled_router_autotune", None),
}


@torch.no_grad()
def served_passes(
    case: Case, thresholds: dict[str, float], args: argparse.Namespace, report: dict
) -> dict[str, Callable]:
    """Passes of the compiled serving mode at every exit share (named ``<mode>@<share>``), and of its
    stages for the ideal: the served front on every batch and the served rest on every batch's full
    tap state (``stage_front``, ``stage_rest``; ``stage_rest_static`` with ``--static-rest``)."""
    base = runners.at_threshold(case.model, next(iter(thresholds.values())))
    batches, passes = case.batches, {}
    # Text pads to the buckets the compiled MainNet rows use: the same shapes on both sides.
    buckets = inputs.LENGTH_BUCKETS if case.workload.kind == "text" else None
    states: list[Any] = []  # every batch's full tap state, for the stage timings of each variant's rest
    # Every size the timed batches have (text: the last batch is partial), each warmed at its own size as
    # the MainNet rows run it, not padded to the full one; the rest's buckets those of the full size alone
    # (the CUDA default for one size: a partial batch's size is no bucket of its own).
    sizes = sorted({base.split.batch_size(x) for x in batches})
    buckets_of_rest = {"rest_buckets": default_row_buckets(case.batch)} if case.device.type == "cuda" else {}
    for name, settings in serving_variants(case, args).items():
        stream, pooled, rest = FULL_VARIANTS.get(name, (None, None, None))
        try:
            served = compile_for_serving(
                base, batches[0], batch_sizes=sizes, length_buckets=buckets, **{**buckets_of_rest, **settings}
            )
            report["compile_s"][name] = float(served.compile_seconds)
            report["serving_backends"][name] = dict(served.stage_backends)
            for tag, threshold in thresholds.items():
                passes[f"{name}{tag}"] = at(base, threshold, runners.loop(served, batches))
                if stream is None:
                    continue
                router = served.pooled_router(max_wait=args.max_wait)
                passes[f"{stream}{tag}"] = at(base, threshold, lambda s=served: list(s.stream(batches)))
                passes[f"{pooled}{tag}"] = at(base, threshold, lambda r=router: r.run(batches))
            first = f"{name}{next(iter(thresholds))}"
            report["compile_s"][f"{name}_first_pass"] = runners.first_pass(passes[first], case.device)
            if rest is not None:
                states = states or [base.split.trunk(padded_text(x, buckets)) for x in batches]
                passes[rest] = runners.loop(served.rest, states)
            if name == "sidenet_compiled":
                passes["stage_front"] = runners.loop(served.front_pass, batches)
                report["stage_basis"] = ", ".join(sorted(set(served.stage_backends.values())))
        except Exception as exc:
            for mode in (name, stream, pooled) if stream else (name,):
                for tag in thresholds:
                    passes.pop(f"{mode}{tag}", None)
                    report["skipped"][f"{mode}{tag}"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return passes


@torch.no_grad()
def run_case(case: Case, args: argparse.Namespace, clock: runners.Clock) -> tuple[list[dict], dict]:
    """Every row of one case, timed in one interleaved session, and the case's report."""
    report: dict[str, Any] = {
        **case.key(),
        "batches_timed": len(case.batches),
        "passes": {"timed": args.repeats, "warmup": args.warmup},  # per case: merged runs may differ
        "samples_per_pass": sum(case.model.split.batch_size(x) for x in case.batches),
        "compile_s": {},
        "skipped": {},
        "serving_backends": {},
        "thresholds": {},
    }
    passes = mainnet_passes(case, args, clock, report)
    if case.workload.kind == "vision":  # the layout the rest receives its rows in (routing keeps it)
        state = case.model.split.trunk(case.batches[0])
        report["tap_layout"] = (
            "contiguous"
            if state.is_contiguous()
            else "channels_last"
            if state.is_contiguous(memory_format=torch.channels_last)
            else f"strides {tuple(state.stride())}"
        )
    scores = confidences(case)
    shares: dict[str, tuple[float, float]] = {}
    thresholds: dict[str, float] = {}
    for share in args.exit_shares:
        threshold = runners.threshold_for_share(scores, share)
        realised = int((scores >= threshold).sum()) / len(scores)
        shares[f"@{share:g}"], thresholds[f"@{share:g}"] = (share, realised), threshold
        report["thresholds"][f"{share:g}"] = {"threshold": threshold, "realised_exit_share": realised}
        passes.update(eager_passes(case, f"@{share:g}", threshold))
    passes.update(served_passes(case, thresholds, args, report))
    # A runner that fails in its first pass is dropped, with the reason, rather than ending the run.
    for name, run in list(passes.items()):
        try:
            run()
        except Exception as exc:
            del passes[name]
            report["skipped"][name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    count = len(case.batches)
    # Operations per batch of the eager runners (after their first pass: no FLOPs measuring in it): on a
    # GPU each is a launch, the machine-independent side of sidenet eager against the minimal router.
    eager = [name for name in passes if name == "main_eager" or name.startswith(("minimal_router@", "sidenet_eager@"))]
    report["operations_per_batch"] = {name: sum(count_operations(passes[name]).values()) / count for name in eager}
    seconds = runners.time_passes(passes, args.repeats, args.warmup, case.device)
    ms = {name: 1000 * statistics.median(s) / count for name, s in seconds.items()}
    spread = {name: [1000 * min(s) / count, 1000 * max(s) / count] for name, s in seconds.items()}
    report["stages_ms"] = {k: ms.pop(k) for k in STAGES if k in ms}
    if args.profile_stages:  # after the timing: the profiler's overhead stays out of it
        profiled = [name for name in (*STAGES, *PROFILED_MAIN) if name in passes]
        kept = args.profile_rows
        report["profile"] = {name: runners.profile_pass(passes[name], case.device, kept) for name in profiled}
    return make_rows(case, ms, spread, shares, report), report


# The MainNet rows profiled beside the stages: compiled without CUDA graphs first (each kernel its launch).
PROFILED_MAIN = ("main_compile_default", "main_compile_reduce-overhead")


def make_rows(
    case: Case, ms: dict[str, float], spread: dict[str, list[float]], shares: dict, report: dict
) -> list[dict[str, Any]]:
    """Rows of one case with their speed-ups over the eager and the best MainNet alone."""
    main = {name: ms[name] for name in MAIN_MODES if name in ms}
    best_name = min(main, key=main.get)
    rows = [{"mode": name, "exit_share": None, "target_exit_share": None, "ms": t} for name, t in main.items()]
    rows.append({"mode": "main_best", "exit_share": None, "target_exit_share": None, "ms": main[best_name]})
    rows[-1]["best_of"] = best_name
    for tag, (target, realised) in shares.items():
        for name in ROUTED_MODES:
            if f"{name}{tag}" in ms:
                rows.append(
                    {"mode": name, "exit_share": realised, "target_exit_share": target, "ms": ms[f"{name}{tag}"]}
                )
                rows[-1]["ms_spread"] = spread[f"{name}{tag}"]
        stages = report["stages_ms"]
        if {"stage_front", "stage_rest"} <= set(stages):
            ideal = stages["stage_front"] + (1 - realised) * stages["stage_rest"]
            rows.append({"mode": "ideal", "exit_share": realised, "target_exit_share": target, "ms": ideal})
            rows[-1]["basis"] = f"the served stages ({report.get('stage_basis', '?')})"
    for row in rows:
        if row["mode"] in main:
            row["ms_spread"] = spread[row["mode"]]
        row.update(case.key())
        row["speedup_vs_main_eager"] = main["main_eager"] / row["ms"]
        row["speedup_vs_main_best"] = main[best_name] / row["ms"]
    return [{k: row[k] for k in sorted(row, key=ROW_ORDER.index)} for row in rows]


# The keys of a row, in the order the JSON shows them.
ROW_ORDER = ("workload", "batch", "dtype", "exit_share", "target_exit_share", "mode", "ms", "ms_spread")
ROW_ORDER += ("speedup_vs_main_eager", "speedup_vs_main_best", "best_of", "basis")
