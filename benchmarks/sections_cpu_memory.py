"""The "CPU memory" section of BENCHMARKS.md, rendered from ``cpu_memory.json`` (``benchmarks/cpu_memory.py``)."""

from __future__ import annotations

from typing import Any

LABELS = {
    "mainnet": "MainNet eager",
    "mainnet_compiled": "MainNet `torch.compile`",
    "sidenet_eager": "sidenet eager",
    "sidenet_compiled": "sidenet compiled serving mode",
}
WORKLOADS = {
    "fmnist": "Fashion-MNIST ResNet-20, tap `layer1.0`, batch 64",
    "minilm": "all-MiniLM-L6-v2, tap 3, batch 32 of SST-2 dev sentences",
}


def _mb(threshold: int | None) -> str:
    return "–" if threshold is None else f"{threshold / 2**20:g} MiB"


def _spread(cell: dict[str, Any], key: str, spec: str) -> str:
    """A setting's median over the rounds, with their range where the rounds differ."""
    median = cell[f"{key}_per_batch"]
    low, high = cell.get(f"{key}_range", (median, median))
    text = format(median, spec)
    return text if format(low, spec) == format(high, spec) else f"{text} [{low:{spec}}–{high:{spec}}]"


def cpu_memory_section(r: dict[str, Any]) -> list[str]:
    m, retained = r["machine"], r["settings"]["retain"]
    lines = [
        "## CPU memory: freed memory kept for the next batch",
        "",
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"commit {m['commit'] or 'n/a'}.",
        "",
        "PyTorch's CPU tensors come from glibc's `malloc`, which maps large blocks afresh and hands freed "
        "memory back to the system; a batch whose activations are megabytes then gets new pages from the "
        "kernel and faults each one in. `sidenet.host_memory.retain_freed_cpu_memory()` raises glibc's mmap "
        f"threshold to {_mb(retained['mmap_threshold'])} and its trim threshold to "
        f"{_mb(retained['trim_threshold'])}, so that freed blocks are reused; the `sidenet` command line, "
        "Ray Serve replicas and Ray Data actors on the CPU call it (`SIDENET_CPU_MEMORY=system` or "
        "`retain_cpu_memory=False` turn it off). Each setting runs in processes of its own, alternating "
        f"over {len(r['rounds'])} round(s) (the median shown, the rounds' range in brackets); milliseconds "
        "per batch (median of "
        f"{r['repeats']} interleaved passes), and minor page faults per batch. Untrained SideNets with "
        "their thresholds at the confidence quantile that lets 80% exit (the time depends on the shapes "
        "and the exit share, not on what the weights know). glibc's default thresholds follow the blocks a "
        "process has freed, so with the default a process may keep its memory by chance (one that has "
        "freed a block of ~30 MiB, e.g. while loading a dataset, or, as the ranges below show, sometimes "
        "a child that did no more than the others); the children here have loaded only their models, as "
        "a server has.",
        "",
    ]
    memory = r.get("memory_mib")
    if memory:
        d, k = memory["system"], memory["retain"]
        final = ""
        if d.get("final_rss_mib") and k.get("final_rss_mib"):
            final = f"; at its end {d['final_rss_mib']:,.0f} and {k['final_rss_mib']:,.0f} MiB"
        lines += [
            "What it costs (a child process, every workload below run in it; median over the rounds): peak "
            f"resident memory {d['peak_rss_mib']:,.0f} MiB with the defaults, {k['peak_rss_mib']:,.0f} MiB "
            f"retained{final}.",
            "",
        ]
    for name, w in r["workloads"].items():
        lines += [
            f"### {WORKLOADS.get(name, name)} (exit share {100 * w['exit_share']:.0f}%)",
            "",
            "| | default: ms / batch | page faults / batch | retained: ms / batch | page faults / batch "
            "| retained speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for runner, row in w["rows"].items():
            d, k = row["system"], row["retain"]
            lines.append(
                f"| {LABELS.get(runner, runner)} | {_spread(d, 'ms', '.2f')} | {_spread(d, 'page_faults', ',.0f')} "
                f"| {_spread(k, 'ms', '.2f')} | {_spread(k, 'page_faults', ',.0f')} | {row['retained_speedup']:.2f}× |"
            )
        within = w["within_setting"]
        parts = []
        for setting, label in (("system", "default"), ("retain", "retained")):
            s = within[setting]
            over_best = ", ".join(f"{LABELS[k]} {v:.2f}×" for k, v in s["over_best_mainnet"].items())
            parts.append(f"{label}: over the best MainNet alone ({LABELS[s['best_mainnet']]}) {over_best}")
        lines += [
            "",
            "Within each setting, " + "; ".join(parts) + ". "
            f"Retained memory with {LABELS[w['fastest_retained']]} against the default setting's best MainNet "
            f"alone: {w['fastest_retained_over_default_best_mainnet']:.2f}×.",
            "",
        ]
    return lines
