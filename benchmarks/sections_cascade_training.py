"""The cascade-training section of BENCHMARKS.md (``fit(reach=...)``: what a cascade's later SideNets are
trained on; ``benchmarks/cascade_training.py``), rendered from ``cascade_training.json``."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import pct

TITLES = {"fmnist": "Fashion-MNIST, ResNet-20", "sst2": "SST-2, all-MiniLM-L6-v2"}
HELD_OUT = {
    "test": "test images, at the cascade chosen on validation",
    "dev": "SST-2 dev, two-fold cross-fitted (cascade chosen on one half, reported on the other)",
}
VARIANTS = {
    "all": "all (every sample)",
    "weighted": "weighted (chance of reaching the tap)",
    "hard": "hard (samples the earlier SideNets pass on)",
    "ztw": "ztw: all, reading the earlier SideNets' logits too",
}


def _rule(rule: dict[str, float]) -> str:
    if "max_accuracy_drop" in rule:
        return f"at most {100 * rule['max_accuracy_drop']:g} points below the MainNet"
    return f"at most {pct(rule['max_disagreement'])} of the samples exiting with another answer than the MainNet's"


def _shares(rows: list[dict[str, Any]]) -> str:
    """Mean effective share of the training cache per later SideNet (the first always trains on all)."""
    columns = list(zip(*(r["effective_share"] for r in rows), strict=True))[1:]
    values = [np.mean([v for v in c if v is not None]) if any(v is not None for v in c) else 1.0 for c in columns]
    return " / ".join(f"{v:.2f}" for v in values)


def _spread(s: dict[str, Any]) -> str:
    """The held-out FLOPs fraction's spread between seeds (results before it was recorded have none)."""
    return f" [{s['held_out_flops_fraction_spread']:.4f}]" if "held_out_flops_fraction_spread" in s else ""


def _task(name: str, t: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    sizes, held = t["sizes"], t["held_out"]
    shares = ", ".join(f"`{tap}` {pct(s)}" for tap, s in t["sidenet_flops_share"].items())
    pools = f" (pooling {', '.join(f'`{k}` {v}x{v}' for k, v in t['pools'].items())})" if "pools" in t else ""
    lines = [
        f"### {TITLES.get(name, name)}",
        "",
        f"Candidate taps {', '.join(f'`{x}`' for x in t['taps'])}{pools}; SideNets trained for {t['epochs']} epochs on "
        f"{sizes['train']:,} training samples; cascade chosen by `choose_taps` on {sizes['val']:,} validation samples, "
        f"{_rule(t['rule'])}; held out: {sizes[held]:,} {HELD_OUT[held]}. Each SideNet's FLOPs share of the "
        f"MainNet (the same in every `reach` variant): {shares}."
        + (
            " ztw's extra inputs add "
            + ", ".join(f"`{tap}` {100 * s:.2g}%" for tap, s in t["ztw_extra_flops_share"].items())
            + "."
            if "ztw_extra_flops_share" in t
            else ""
        )
        + f" Caching {t['cache_seconds']:.0f} s, task {t['seconds'] / 60:.1f} min.",
        "",
        "| SideNets after the first trained on | seeds | val FLOPs fraction at the choice [seed spread] | "
        "val cross-fitted FLOPs / drop (pt) | "
        f"{held} FLOPs fraction [seed spread] | {held} drop (pt) | {held} exit rate | {held} oracle | "
        "effective share of the cache (later SideNets) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = t["summary"]
    for reach, s in summary["by_reach"].items():
        rows = [r for r in t["rows"] if r["reach"] == reach]
        value = f"{s['val_flops_fraction']:.4f}"
        if reach == summary["winner_on_val"]:
            value = f"**{value}**"
        lines.append(
            f"| {VARIANTS.get(reach, reach)} | {s['seeds']} | {value} [{s['val_flops_fraction_spread']:.4f}] | "
            f"{s['val_crossfit_flops_fraction']:.4f} / {100 * s['val_crossfit_accuracy_drop']:+.2f} | "
            f"{s['held_out_flops_fraction']:.4f}{_spread(s)} | {100 * s['held_out_accuracy_drop']:+.2f} | "
            f"{pct(s['held_out_exit_rate'])} | {s['held_out_oracle_flops_fraction']:.4f} | {_shares(rows)} |"
        )
    if "ztw_minus_all" in summary:
        d = summary["ztw_minus_all"]
        spreads = [summary["by_reach"][v]["val_flops_fraction_spread"] for v in ("all", "ztw")]
        within = abs(d["val_flops_fraction"]) <= max(spreads)  # a gap the seeds alone could make
        lines += [
            "",
            f"ztw minus all (FLOPs fraction, mean over seeds): validation {d['val_flops_fraction']:+.4f}, "
            f"cross-fitted validation {d['val_crossfit_flops_fraction']:+.4f}, {held} "
            f"{d['held_out_flops_fraction']:+.4f}: ztw "
            + ("measures better" if d["val_flops_fraction"] < 0 else "does not measure better")
            + " on validation"
            + (" (within the seed spread: " if within else " (beyond the seed spread: ")
            + f"all {spreads[0]:.4f}, ztw {spreads[1]:.4f}).",
        ]
    lines += [
        "",
        "Per run: the taps chosen on validation (and per held-out fold), and each SideNet's validation accuracy.",
        "",
        "| seed | trained on | val taps | held-out taps | val SideNet accuracy per tap |",
        "|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        folds = " ; ".join(", ".join(f) or "MainNet" for f in r["held_out"]["taps"])
        accuracy = " / ".join(pct(p["val_sidenet_accuracy"]) for p in r["per_tap"])
        lines.append(
            f"| {r['seed']} | {r['reach']} | {', '.join(r['val']['taps']) or 'MainNet'} | {folds} | {accuracy} |"
        )
    lines.append("")
    return lines


def cascade_training_section(r: dict[str, Any]) -> list[str]:
    """Cascade training: every variant per task, averaged over seeds, and the per-run choices."""
    m, st = r["machine"], r["settings"]
    winner = r["winner_on_val"]
    lines = [
        "## Cascade training: later SideNets on the samples that reach them (issue 14, item 3)",
        "",
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"commit {m['commit'] or 'n/a'}; {r['seconds'] / 60:.1f} min."
        + (" **Quick run: a smoke check only.**" if r.get("quick") else ""),
        "",
        "Each variant trains the same SideNets from the same initialisation (per seed); the first SideNet is "
        "the same in all. `weighted`: each training sample weighted by prod over earlier SideNets of (1 - their "
        "max softmax), mean 1; `hard`: only the samples left when each earlier SideNet exits its "
        f"{pct(st['exit_share'])} most confident. `ztw` (Zero Time Waste, Wołczyk et al. 2021, issue 14 item 1; "
        "cascade connections, no ensemble): each later SideNet reads its tap's pooled features and the detached "
        "logits of the earlier ztw SideNets, trained on every sample as `all`; its figures pay for the extra "
        "inputs and for any skipped earlier SideNet a kept one reads. It is no `reach` of `fit`: the verdict is "
        "on the reaches. Variants are compared on the validation FLOPs fraction at the "
        "cascade `choose_taps` picks there (the figure a default would be chosen on; the FLOPs include the "
        "SideNets); the cross-fitted validation and held-out columns are checks, not the choice.",
        "",
    ]
    for name, t in r["tasks"].items():
        lines += _task(name, t, st)
    verdict = (
        f"least validation FLOPs on every task: **{winner}**"
        if winner
        else "no variant has the least validation FLOPs on every task ("
        + ", ".join(f"{k}: {v}" for k, v in r["winners_by_task"].items())
        + ")"
    )
    lines += [f"Verdict: {verdict}.", ""]
    return lines
