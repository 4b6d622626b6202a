"""The serving-engine section of BENCHMARKS.md (Ray Serve, ``benchmarks/serve.py``), rendered from
``serve.json``."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import pct, thr


def _row(label: str, o: dict[str, Any], main: dict[str, Any], model: bool = True) -> str:
    spread = o["throughput_spread"]
    quality = f"{pct(o['accuracy'])} | {pct(o['exit_rate'])} |" if model else "– | – |"
    return (
        f"| {label} | {o['throughput']:,.1f}/s [{spread[0]:,.1f}–{spread[1]:,.1f}] "
        f"({o['throughput'] / main['throughput']:.2f}×) | {o['p50_ms']:.1f} / {o['p95_ms']:.1f} / {o['p99_ms']:.1f} ms "
        f"| {quality}"
    )


def _audit_sentence(a: dict[str, Any] | None) -> str:
    if not a:
        return "No live audit in this run."
    bound = "–" if a["upper_bound"] is None else f"{a['upper_bound']:.4f}"
    text = (
        f"Live audit ({pct(a['share'])} of the samples, tolerance {pct(a['tolerance'])}, δ = {a['delta']}): "
        f"{a['audited']} of {a['samples_seen']:,} samples audited, {a['disagreed']} exited with another answer "
        f"than the MainNet's (observed rate {pct(a['disagreed'] / a['audited']) if a['audited'] else '–'}); "
        f"upper bound {bound}, state **{a['state']}**"
    )
    if a["state"] == "collecting":
        needed = a["min_audits"] / a["share"]
        text += (
            f" (the bound can fall below the tolerance only after {a['min_audits']} audits, about "
            f"{needed:,.0f} samples at this share)"
        )
    return text + "."


def serve_section(r: dict[str, Any]) -> list[str]:
    """Ray Serve: the MainNet-only and the sidenet deployment under the same closed-loop load."""
    m, s = r["machine"], r["settings"]
    lines = [
        "## Serving through an engine: Ray Serve, MainNet alone vs sidenet",
        "",
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"commit {m['commit'] or 'n/a'}."
        + (" **Quick run: few requests, a smoke check only.**" if r.get("quick") else ""),
        "",
        f"One local Ray (2 CPUs), HTTP on loopback. {s['clients']} closed-loop clients each keep one request (one "
        f"image as PNG, one sentence as JSON) in flight; {s['requests']:,} requests per timed phase after "
        f"{s['warmup']} untimed, {s['repeats']} phases per deployment, interleaved; throughput is the median "
        "phase [min–max], latency percentiles are client-side over all phases. Each deployment: "
        f"{s['replicas']} replica, {s['torch_threads']} torch thread, `@serve.batch` of at most "
        f"{s['max_batch_size']} with a {s['batch_wait_ms']:g} ms wait. The sidenet deployment pools the continuing "
        f"samples of up to {s['max_wait']} later batches (`PooledRouter`, finished after {s['flush_ms']:g} ms "
        "without a new batch) and audits a share of its samples against the MainNet (tolerance: the threshold "
        "rule's `max_disagreement`, or for a threshold chosen by accuracy the disagreement it has on the choosing "
        "data, rounded up to a whole percent; flagged while the one-sided bound lies above it, which a few dozen "
        "audits cannot rule out for a rate near the tolerance). *Engine only* parses and batches the same "
        "requests but answers without a model: the ceiling the engine, the proxy and the clients leave on "
        "these cores, which the model shares with them.",
        "",
    ]
    for name, w in r["workloads"].items():
        rows, main = w["rows"], w["rows"]["mainnet"]
        target = w["targets"]["throughput_ratio_at_equal_or_lower_p95"]
        lines += [
            f"### {name}: threshold {thr(w['threshold'])}, {w['distinct_requests']:,} distinct requests",
            "",
            "| deployment | throughput (req/s) | p50 / p95 / p99 latency | accuracy | exit rate |",
            "|---|---|---|---|---|",
            _row("MainNet alone", main, main),
            _row("sidenet (routed, pooled)", rows["sidenet"], main),
        ]
        if "engine_only" in rows:
            lines.append(_row("engine only (no model)", rows["engine_only"], main, model=False))
        lines += [
            "",
            f"Throughput ratio (sidenet over MainNet): **{w['throughput_ratio']:.2f}×**; p95 "
            f"{w['p95_ms']['sidenet']:.1f} ms vs {w['p95_ms']['mainnet']:.1f} ms. Target (issue 15): "
            f"{target['target']}: {'met' if target['met'] else 'NOT met'}.",
            "",
            _audit_sentence(w.get("audit")) + f" Shift check of the deployment: {w['shift']['state']}.",
            "",
        ]
    return lines
