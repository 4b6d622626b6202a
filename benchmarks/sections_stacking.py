"""Sections of BENCHMARKS.md on stacking the SideNet with compression: int8 quantisation, distillation
and pruning of the text MainNet, pruning and int8 of the ResNet (rendered from their JSON results)."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import pct


def _command_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    return (
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), commit {m['commit'] or 'n/a'}."
    )


def _variants_table(r: dict[str, Any], big: int, unit: str, digits: int) -> list[str]:
    """Rows of a side-by-side table: accuracy, exit rate, FLOPs, throughput at ``big`` and at batch 1."""
    lines = [
        f"| variant | accuracy | exit rate | FLOPs fraction | batch {big} ({unit}/s) | batch 1 ({unit}/s) |",
        "|---|---|---|---|---|---|",
    ]
    key = f"batch{big}"
    for name, v in r["variants"].items():
        low, high = r["timing"][key][name]["throughput_spread"]
        lines.append(
            f"| {name} | {pct(v['accuracy'])} | {pct(v['exit_rate'])} | {pct(v['flops_fraction'])} | "
            f"{v['throughput'][key]:,.{digits}f} [{low:,.{digits}f}–{high:,.{digits}f}] ({v['speedup'][key]:.2f}×) "
            f"| {v['throughput']['batch1']:,.{digits}f} ({v['speedup']['batch1']:.2f}×) |"
        )
    return lines


def stacking_section(r: dict[str, Any]) -> list[str]:
    mult, target = r["multiply"], r["target"]
    lines = [
        "## Stacking with int8 quantisation (SST-2, MiniLM)",
        "",
        _command_line(r),
        "",
        "int8 dynamic quantisation of every Linear layer (`torch.ao.quantization.quantize_dynamic`); the int8 "
        "SideNet (tap 3) is trained on the int8 MainNet's features. Thresholds: at most 1% of sentences exiting "
        f"with another answer than their MainNet's, chosen on one half of SST-2 dev, reported on the other "
        f"({r['report_size']} sentences). FLOPs of int8 models are float-equivalents (FlopCounterMode counts no "
        "int8 kernel): the int8 gain shows in time only. Speed-ups are against the float MainNet, same run.",
        "",
        *_variants_table(r, 32, "sentences", 1),
    ]
    lines += [
        "",
        f"Do the savings multiply? int8 alone {mult['int8_alone']:.2f}×, SideNet alone {mult['sidenet_alone']:.2f}×, "
        f"both {mult['both']:.2f}× (the product of the two alone would be {mult['product_of_alone']:.2f}×); the "
        f"SideNet on the int8 MainNet gives {mult['sidenet_on_int8']:.2f}× over int8 alone at "
        f"{100 * target['accuracy_drop_vs_int8']:+.2f} pt. Target ({target['target']}): "
        f"{'met' if target['met'] else 'not met'}.",
        "",
    ]
    return lines


def distillation_section(r: dict[str, Any]) -> list[str]:
    mult, st = r["multiply"], r["student"]
    lines = [
        "## Stacking with distillation (SST-2, 3-layer student of MiniLM)",
        "",
        _command_line(r),
        "",
        f"Student: the MainNet's layers {', '.join(str(i + 1) for i in st['keep_layers'])}, distilled for "
        f"{st['epochs']:g} epoch on SST-2 train (half cross-entropy, half KL to the MainNet at temperature "
        f"{st['temperature']:g}; {st['train_seconds'] / 60:.1f} min), SST-2 dev accuracy {pct(st['dev_accuracy'])}. "
        f"Its SideNet sits after layer {r['student_tap']}. Thresholds: at most 1% of sentences exiting with another "
        f"answer than their own MainNet's, chosen on one half of dev, reported on the other ({r['report_size']} "
        "sentences). Speed-ups against the 6-layer MainNet, same run.",
        "",
        *_variants_table(r, 32, "sentences", 1),
    ]
    lines += [
        "",
        f"Do the savings multiply? student alone {mult['student_alone']:.2f}×, SideNet alone "
        f"{mult['sidenet_alone']:.2f}×, both {mult['both']:.2f}×: the SideNet on the student gives "
        f"{mult['sidenet_on_student']:.2f}× over the student alone at {100 * mult['drop_vs_student']:+.2f} pt.",
        "",
    ]
    return lines


def text_pruning_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Stacking with pruning (SST-2, MiniLM)",
        "",
        _command_line(r),
        "",
        "Structured magnitude pruning of every layer's feed-forward network (neurons chosen by the L1 norm of "
        "their input weights with `torch.nn.utils.prune.ln_structured`, then removed from both matrices), "
        "fine-tuned briefly with the MainNet as teacher; a SideNet after layer 3 trained on each pruned MainNet. "
        "Thresholds: at most 1% of sentences exiting with another answer than their own MainNet's, chosen on one "
        f"half of SST-2 dev, reported on the other ({r['report_size']} sentences). MainNet parameters: "
        f"{r['mainnet_parameters']:,}"
        + "".join(
            f"; {name}: {m['parameters']:,} (dev accuracy {pct(m['dev_accuracy_before_finetuning'])} right after "
            f"pruning, {pct(m['dev_accuracy'])} after {m['epochs']:g} epoch of fine-tuning)"
            for name, m in r["compressed"].items()
        )
        + ". Speed-ups against the MainNet, same run.",
        "",
        *_variants_table(r, 32, "sentences", 1),
        "",
        "Do the savings multiply? "
        + "; ".join(
            f"{name}: alone {m['pruned_alone']:.2f}×, with a SideNet {m['both']:.2f}× ({m['sidenet_on_pruned']:.2f}× "
            f"over the pruned MainNet alone at {100 * m['drop_vs_pruned']:+.2f} pt)"
            for name, m in r["multiply"].items()
        )
        + f"; SideNet alone {next(iter(r['multiply'].values()))['sidenet_alone']:.2f}×.",
        "",
    ]
    return lines


def resnet_compression_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Stacking with pruning and int8 quantisation (Fashion-MNIST, ResNet-20)",
        "",
        _command_line(r),
        "",
        "Channel pruning inside every residual block (filters chosen by L1 norm with "
        "`torch.nn.utils.prune.ln_structured`, then physically removed), brief fine-tuning (one epoch by default); "
        "a SideNet "
        "at `layer1.0` (7x7) trained on each pruned MainNet; thresholds at most 0.5 points below that MainNet on "
        f"validation, reported on the test set. MainNet parameters: {r['mainnet_parameters']:,}"
        + "".join(f"; {name}: {p['parameters']:,}" for name, p in r["compressed"].items() if "parameters" in p)
        + ". int8: FX graph-mode static quantisation (x86 backend) of the trunk and the rest as two graphs "
        "joined by `sidenet.CallableSplit` (FX leaves no `layer1.0` module to cut at); int8 FLOPs are "
        "float-equivalents. Speed-ups against the MainNet, same run.",
        "",
        *_variants_table(r, 64, "img", 0),
    ]
    return [*lines, ""]
