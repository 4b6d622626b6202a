"""The compiled serving mode's rows in the CPU sections of BENCHMARKS.md (issue 13): Fashion-MNIST at
batch 64 and SST-2 at batch 32, from ``fmnist_resnet.json`` and ``sst2_minilm.json``'s ``compiled``."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import targets_line

LABELS = {
    "mainnet": "MainNet alone, eager",
    "mainnet_compiled": "MainNet alone, `torch.compile`",
    "adaptive": "sidenet eager (per-sample routing)",
    "minimal_router": "minimal eager router (reference: public split API only)",
    "compiled_serving": "compiled serving mode, per batch",
    "compiled_stream": "compiled serving mode, pipelined (`served.stream`)",
    "compiled_pooled": "compiled serving mode, `PooledRouter` (rest on 64 pooled rows, at most 16 batches waiting)",
    "compiled_front": "its served front alone (trunk, SideNet, scores: what every image pays; no answers)",
}


def _throughput_rows(
    timing: dict[str, Any], over: dict[str, float], labels: dict[str, str], best: str, number: str
) -> list[str]:
    """One table row per runner of ``labels`` that was timed (older results lack later rows): throughput
    [spread] (formatted with ``number``) and the speed-up over the best MainNet alone, that one marked."""
    rows = []
    for key, label in labels.items():
        if key not in timing:
            continue
        mark = " (best MainNet)" if key == best else ""
        low, high = timing[key]["throughput_spread"]
        value = timing[key]["throughput"]
        rows.append(f"| {label}{mark} | {value:{number}} [{low:{number}}–{high:{number}}] | {over[key]:.2f}× |")
    return rows


def sst2_compiled_lines(r: dict[str, Any]) -> list[str]:
    """The compiled serving mode at batch 32 on the CPU, for the SST-2 section (``sst2_minilm.json``'s
    ``compiled``); nothing for results written before it."""
    c = r.get("compiled")
    if not c:
        return []
    t, over = r["timing"]["batch32"], c["speedup_over_best_mainnet"]
    stages = "; ".join(", ".join(f"{k} {v}" for k, v in kept.items()) for kept in c["stage_backends"])
    labels = {
        "mainnet": "MainNet eager",
        "mainnet_compiled": "MainNet `torch.compile`",
        "adaptive": "sidenet eager",
        "compiled_serving": "compiled serving mode, per batch",
    }
    lines = [
        "### Compiled serving mode on the CPU (batch 32, issue 13)",
        "",
        f"`compile_for_serving` of each half's routed model, backend `{c['backend']}` (stages kept per half: "
        f"{stages}; {c['compile_seconds']:.1f} s to compile both), in the batch-32 timing run above, beside "
        f"the MainNet compiled alone (`torch.compile`, backend `{c['mainnet_backend']}`; first call "
        f"{c['mainnet_first_call_seconds']:.1f} s). Batches keep their own padded lengths (no length buckets on "
        "the CPU), so the compiled graphs see many shapes.",
        "",
        "| batch 32 | sentences/s [spread] | over the best MainNet alone |",
        "|---|---|---|",
    ]
    return [*lines, *_throughput_rows(t, over, labels, c["best_mainnet"], ",.1f"), ""]


def _operations(counted: dict[str, float] | None) -> str:
    """Tensor operations per batch of the eager runners, for a sentence (nothing for older results)."""
    if not counted:
        return ""
    return (
        f" (tensor operations per batch, `sidenet.timing.count_operations`: sidenet eager {counted['adaptive']:.0f}, "
        f"the minimal router {counted['minimal_router']:.0f}, the MainNet alone {counted['mainnet']:.0f})"
    )


def _eager_session(c: dict[str, Any]) -> str:
    """Where the eager ratio was timed, for a sentence (nothing for results timed in the one session)."""
    mixed = c.get("eager_time_over_minimal_router_beside_compiled")
    if mixed is None:
        return ""
    session = c["eager_session"]
    speeds = ", ".join(
        f"{name} {session[key]['throughput']:,.0f} img/s" for key, name in
        (("adaptive", "sidenet eager"), ("minimal_router", "minimal router"), ("mainnet", "MainNet eager"))
    )  # fmt: skip
    quartiles = c.get("eager_time_over_minimal_router_quartiles")
    if quartiles is None:  # results from before the ratio was paired by repeat
        return (
            f", timed in a session of the eager runners alone ({speeds}); in the table's session, between the "
            f"compiled runners, {mixed:.3f}×"
        )
    repeats = session["adaptive"]["repeats"]
    return (
        f", timed in a session of the eager runners alone, the median of the {repeats} repeats' ratios of the two "
        f"passes (quartiles {quartiles[0]:.3f}–{quartiles[2]:.3f}; the runners' order rotated each repeat; "
        f"speeds at the median pass: {speeds}); in the table's session, between the compiled runners, the ratio "
        f"of the median passes {mixed:.3f}×"
    )


def fmnist_compiled_lines(r: dict[str, Any]) -> list[str]:
    """The compiled serving mode at batch 64 on the CPU, for the Fashion-MNIST section (``fmnist_resnet.json``'s
    ``compiled``); nothing for results written before it."""
    c = r.get("compiled")
    if c is None:
        return []
    t, over, ideal = c["timing"], c["speedup_over_best_mainnet"], r["speedup"]["ideal"]
    stages = ", ".join(f"{k} {v}" for k, v in c["stage_backends"].items())
    lines = [
        "### Compiled serving mode on the CPU (batch 64, issue 13)",
        "",
        f"`compile_for_serving(model, batch)`, backend `{c['serving_backend']}` (stages kept: {stages}; "
        f"{c['serving_compile_seconds']:.1f} s to compile), against the best MainNet alone on this CPU: eager or "
        f"`torch.compile` (backend `{c['mainnet_backend']}`, {c['mainnet_compile_seconds']:.1f} s to compile). "
        f"{c['images']:,} test images per pass; the median of {t['mainnet']['repeats']} interleaved pass(es). "
        "Compile times depend on inductor's on-disk cache: a run on a machine where it is cold takes longer.",
        "",
        "| batch 64 | img/s [spread] | over the best MainNet alone |",
        "|---|---|---|",
    ]
    lines += _throughput_rows(t, over, LABELS, c["best_mainnet"], ",.0f")
    lines += [
        "",
        f"FLOPs ideal {ideal:.2f}×: the compiled mode ({LABELS[c['best_compiled']]}) reaches "
        f"{c['fraction_of_ideal']:.0%} of it; sidenet eager takes {c['eager_time_over_minimal_router']:.3f}× the "
        "minimal router's time" + _eager_session(c) + _operations(c.get("operations_per_batch")) + ".",
    ]
    if "trunk_time_fraction_batch64" in r:
        # What bounds it: trunk + SideNet, which every image runs, may take more of the time than of the FLOPs.
        trunk, exits = r["trunk_time_fraction_batch64"], r["adaptive"]["exit_rate"]
        bound = 1 / (trunk + (1 - exits) * (1 - trunk))
        best = over[c["best_compiled"]]
        sentence = (
            f"What bounds it: trunk + SideNet, run on every image, take {trunk:.0%} of the eager MainNet's time "
            f"for {r['trunk_flops_fraction']:.0%} of its FLOPs, which caps eager routing at {bound:.2f}× "
            f"({bound / ideal:.0%} of the FLOPs ideal) even with the rest at full-batch cost"
        )
        if "compiled_front" in t:  # the compiled front's own share of the best MainNet alone's time
            front = 1 / over["compiled_front"]
            cap = 1 / (front + (1 - exits) * (1 - front))
            sentence += (
                f"; compiled, the served front (trunk, SideNet, scores) takes {front:.0%} of the best MainNet "
                f"alone's time, which caps the compiled mode at {cap:.2f}× ({cap / ideal:.0%} of the FLOPs ideal); "
                f"it reaches {best / cap:.0%} of that cap."
            )
        else:
            sentence += f"; the compiled mode reaches {best / bound:.0%} of that cap."
        lines.append(sentence)
    lines += [
        "",
        targets_line("Targets (issue 13, CPU)", c["targets"]),
        "",
    ]
    return lines
