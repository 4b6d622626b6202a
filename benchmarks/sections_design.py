"""The SideNet design section of BENCHMARKS.md (hidden width, pooling grid, distillation weight;
``benchmarks/sidenet_design.py``), rendered from ``sidenet_design.json``."""

from __future__ import annotations

import inspect
from typing import Any

import sidenet
from benchmarks.harness import pct

TITLES = {"fmnist": "Fashion-MNIST, ResNet-20", "sst2": "SST-2, all-MiniLM-L6-v2"}
HELD_OUT = {
    "test": "test images at the validation threshold",
    "dev": "SST-2 dev, two-fold cross-fitted (threshold chosen on one half, reported on the other)",
}


def _name(c: dict[str, Any]) -> str:
    grid = "" if c["pool"] is None else f"pool {c['pool']}x{c['pool']}, "
    return f"{grid}hidden {c['hidden']}, distillation {c['distill_weight']:g}"


def _rule(rule: dict[str, float]) -> str:
    if "max_accuracy_drop" in rule:
        return f"at most {100 * rule['max_accuracy_drop']:g} points below the MainNet"
    return f"at most {pct(rule['max_disagreement'])} of the samples exiting with another answer than the MainNet's"


def _task(name: str, t: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    s, sizes = t["summary"], t["sizes"]
    default, winner = s["default"], s["winner"]
    held = t["held_out"]
    lines = [
        f"### {TITLES.get(name, name)}, tap `{t['tap']}`",
        "",
        f"SideNets trained for {t['epochs']} epochs on {sizes['train']:,} training samples; thresholds chosen on "
        f"{sizes['val']:,} validation samples (held out of train), {_rule(t['rule'])}; held-out check: "
        f"{sizes[held]:,} {HELD_OUT[held]}. MainNet: {t['mainnet_flops'] / 1e6:.1f} MFLOPs per sample"
        + (
            ", each sentence counted at its own length (as at batch 1; the benchmark's batch-32 sweeps add padding)"
            if name == "sst2"
            else ""
        )
        + f". Features cached in {t['cache_seconds']:.0f} s, whole task {t['seconds'] / 60:.1f} min.",
        "",
        "| pool | hidden | distill | seeds | SideNet FLOPs share | val SideNet acc. | val agreement | "
        f"val FLOPs fraction [seed spread] | val oracle | {held} FLOPs fraction | {held} drop (pt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in t["configs"]:
        mark = " (default)" if c == default else ""
        value = f"{c['val_flops_fraction']:.4f}"
        if c == winner:
            value = f"**{value}**"
        spread = f" [{c['val_flops_fraction_spread']:.4f}]" if c["seeds"] > 1 else ""
        lines.append(
            f"| {'–' if c['pool'] is None else c['pool']} | {c['hidden']}{mark} | {c['distill_weight']:g} | "
            f"{c['seeds']} | {pct(c['sidenet_flops_share'])} | {pct(c['val_sidenet_accuracy'])} | "
            f"{pct(c['val_agreement'])} | {value}{spread} | {c['val_oracle_flops_fraction']:.4f} | "
            f"{c['held_out_flops_fraction']:.4f} | {100 * c['held_out_accuracy_drop']:+.2f} |"
        )
    lines += [
        "",
        "At (roughly) equal SideNet cost: the configurations grouped by their SideNet's FLOPs over the default's, "
        "rounded to a power of two; the least validation FLOPs fraction in each group.",
        "",
        "| SideNet cost vs default | configurations | best on validation | val FLOPs fraction | "
        f"{held} FLOPs fraction |",
        "|---|---|---|---|---|",
    ]
    for b in s["equal_cost"]:
        c = b["best"]
        lines.append(
            f"| ×{b['cost_vs_default']:g} | {b['configs']} | {_name(c)} | {c['val_flops_fraction']:.4f} | "
            f"{c['held_out_flops_fraction']:.4f} |"
        )
    lines.append("")
    for d in sorted(s["distillation"], key=lambda d: (d["pool"] or 0, d["hidden"])):
        weights = sorted(d["val_flops_fraction"].items(), key=lambda item: float(item[0]))
        by_weight = ", ".join(f"weight {w}: {v:.4f}" for w, v in weights)
        grid = "" if d["pool"] is None else f"pool {d['pool']}x{d['pool']}, "
        lines.append(f"- Distillation at {grid}hidden {d['hidden']} (mean validation FLOPs fraction): {by_weight}.")
    spread = s["seed_spread_points"]
    lines += [
        "",
        f"Least validation FLOPs among the configurations run with {winner['seeds']} seed(s): **{_name(winner)}**, "
        f"{winner['val_flops_fraction']:.4f} against the default's ({_name(default)}) "
        f"{default['val_flops_fraction']:.4f}: {s['gain_points_val']:.2f} points of the MainNet's FLOPs less on "
        f"validation, {s['gain_points_held_out']:.2f} on the held-out check"
        + (f"; the largest spread between the seeds of one configuration is {spread:.2f} points." if spread else "."),
        "",
    ]
    return lines


def _defaults_since(then: dict[str, Any]) -> str:
    """The library's defaults now, where they differ from those the study compared against."""
    now = {
        "hidden": inspect.signature(sidenet.SideNet).parameters["hidden"].default,
        "pool_size": inspect.signature(sidenet.SideNet).parameters["pool_size"].default,
        "distill_weight": inspect.signature(sidenet.train_sidenet).parameters["distill_weight"].default,
    }
    changed = {k: v for k, v in now.items() if then.get(k) != v}
    if not changed:
        return ""
    names = {"hidden": "hidden", "pool_size": "pooling grid", "distill_weight": "distillation weight"}
    return " (changed since, after this study: " + ", ".join(f"{names[k]} {v:g}" for k, v in changed.items()) + ")"


def design_section(r: dict[str, Any]) -> list[str]:
    """SideNet design study: every configuration per task, the best at equal cost, the winner vs the default."""
    m, d, st = r["machine"], r["defaults"], r["settings"]
    lines = [
        "## SideNet design: hidden width, pooling grid, distillation (issue 14, item 3)",
        "",
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"commit {m['commit'] or 'n/a'}; {r['seconds'] / 60:.1f} min."
        + (" **Quick run: a smoke check only.**" if r.get("quick") else ""),
        "",
        f"The defaults when the study ran: hidden {d['hidden']}, pooling grid {d['pool_size']}x{d['pool_size']}, "
        f"distillation weight {d['distill_weight']:g}, {d['epochs']} epochs"
        + _defaults_since(d)
        + ". One pass of the MainNet caches the tap features; "
        "each configuration's SideNet trains on the cache, and its trade-off curve is built from the cache with "
        "the FLOPs `sidenet.sweep` counts (no timing). Stage 1 runs the grid at seed 0 (SideNets up to "
        f"{pct(st['max_share'])} of the MainNet's FLOPs), stage 2 the distillation weights at the default's and "
        f"the best size (vision), stage 3 more seeds ({st['seeds']} in all) for the default and the best "
        f"{st['top']} others. Configurations "
        "are compared on validation only; the held-out column is a check, not a choice. The FLOPs fraction "
        "includes the SideNet's own cost.",
        "",
    ]
    for name, t in r["tasks"].items():
        lines += _task(name, t, st)
    return lines
