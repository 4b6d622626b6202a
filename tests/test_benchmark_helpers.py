"""The benchmark harness: model edits of the compression benchmarks keep the network valid, every step
parses its command line and comes after the steps it needs, and BENCHMARKS.md renders from the
committed results exactly as committed."""

from __future__ import annotations

import pytest
import torch
from benchmarks.model_edits import prune_channels

from helpers import tiny_bert
from sidenet.models.cifar_resnet import cifar_resnet


@torch.no_grad()
def test_channel_pruning_shrinks_blocks_and_keeps_taps() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16)
    same = prune_channels(model, 0.0)
    torch.testing.assert_close(same(x), model(x))  # nothing removed, nothing changed
    half = prune_channels(model, 0.5)
    assert sum(p.numel() for p in half.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert half.layer1[0].conv1.out_channels == 8 and half.layer1[0].conv2.in_channels == 8
    assert half.layer1(half.forward_stem(x)).shape == model.layer1(model.forward_stem(x)).shape
    assert half(x).shape == (3, 4)
    # the kept filters are those with the largest L1 norms
    norms = model.layer2[0].conv1.weight.abs().sum((1, 2, 3))
    kept = half.layer2[0].conv1.weight.abs().sum((1, 2, 3))
    assert kept.min() >= norms.sort(descending=True).values[len(kept) - 1] - 1e-6


def test_pruning_leaves_the_original_alone() -> None:
    model = cifar_resnet(8, num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_channels(model, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        prune_channels(model, 1.5)


@torch.no_grad()
def test_feed_forward_pruning_shrinks_bert_layers_and_round_trips(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from benchmarks.model_edits import prune_feed_forward

    model = tiny_bert(intermediate_size=40, num_labels=2, max_position_embeddings=512)
    ids = torch.randint(0, 50, (3, 7))
    same = prune_feed_forward(model, 0.0)
    torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits)
    half = prune_feed_forward(model, 0.5)
    for before, after in zip(model.bert.encoder.layer, half.bert.encoder.layer, strict=True):
        assert after.intermediate.dense.out_features == 20 and after.output.dense.in_features == 20
        # the kept neurons are those whose input weights have the largest L1 norms
        norms = before.intermediate.dense.weight.abs().sum(1)
        kept = after.intermediate.dense.weight.abs().sum(1)
        assert kept.min() >= norms.sort(descending=True).values[19] - 1e-6
    assert half(input_ids=ids).logits.shape == (3, 2)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in model.parameters())
    half.save_pretrained(tmp_path)  # the config records the new width, so the model loads back
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, half(input_ids=ids).logits)
    with pytest.raises(ValueError):
        prune_feed_forward(model, 1.0)


def _variant(speedup: float, accuracy: float) -> dict:
    return {"speedup": {"batch32": speedup}, "accuracy": accuracy}


def test_compression_figure_takes_the_mainnet_pair_once(tmp_path) -> None:
    import json

    from benchmarks.compression_plot import plot_compression, variant_pairs

    main_pair = {"MainNet": _variant(1.0, 0.88), "MainNet + SideNet": _variant(1.6, 0.881)}
    files = {
        "stacking": {**main_pair, "int8": _variant(3.9, 0.883), "int8 + SideNet": _variant(5.5, 0.887)},
        "distillation": {**main_pair, "student": _variant(2.0, 0.89), "student + SideNet": _variant(2.9, 0.892)},
    }
    assert plot_compression(tmp_path, "sst2") is None  # no results, no figure
    for name, variants in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"variants": variants}))
    pairs = variant_pairs(tmp_path, ("stacking", "text_pruning", "distillation"))
    assert [label for label, _, _ in pairs] == ["MainNet", "int8", "student"]
    assert pairs[2][2]["speedup"]["batch32"] == 2.9
    path = plot_compression(tmp_path, "sst2")
    assert path is not None and path.stat().st_size > 10_000


@pytest.mark.parametrize("quick", [False, True])
def test_every_runner_step_accepts_the_runners_arguments(quick: bool, tmp_path) -> None:
    """Each step's own parser takes what the runner passes it, and --quick sets the step's QUICK defaults."""
    import importlib

    from benchmarks.__main__ import STEPS, step_arguments

    for step in STEPS.values():
        module = importlib.import_module(f"benchmarks.{step.module}")
        args = module.options(step_arguments(quick, tmp_path, tmp_path / "sst2"))
        assert args.quick is quick and args.results_dir == tmp_path.resolve() and args.sst2_data == tmp_path / "sst2"
        assert callable(module.run) and isinstance(module.NAME, str)
        for key, value in getattr(module, "QUICK", {}).items():
            assert quick is False or getattr(args, key) == value, (step.module, key)


def test_quick_defaults_yield_to_options_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import fmnist_resnet, harness

    monkeypatch.delenv("SIDENET_SST2_DIR", raising=False)
    args = fmnist_resnet.options(["--quick", "--repeats", "3"])
    assert args.repeats == 3 and args.taps == ["stem", "layer1.0"]  # given option kept, other quick defaults applied
    assert args.results_dir == harness.QUICK_RESULTS
    assert args.sst2_data == harness.ROOT.parent / "shared" / "data" / "sst2"
    assert fmnist_resnet.options([]).results_dir == harness.RESULTS
    monkeypatch.setenv("SIDENET_SST2_DIR", "/somewhere/sst2")
    assert str(fmnist_resnet.options([]).sst2_data) == "/somewhere/sst2"


def test_steps_run_after_what_they_need() -> None:
    from benchmarks.__main__ import STEPS

    order = list(STEPS)
    for name, step in STEPS.items():
        assert all(need in order[: order.index(name)] for need in step.needs), name


def test_results_folders_are_explicit(tmp_path) -> None:
    from benchmarks import harness

    assert harness.markdown_path(harness.RESULTS) == harness.ROOT / "BENCHMARKS.md"
    assert harness.markdown_path(tmp_path) == tmp_path / "BENCHMARKS.md"
    assert harness.sidenet_dir(tmp_path) == tmp_path / "sidenets"
    assert harness.link(tmp_path / "curve.png", tmp_path) == "curve.png"
    assert harness.link(harness.RESULTS / "curve.png", harness.RESULTS) == "benchmarks/results/curve.png"
    with pytest.raises(SystemExit, match="calibration"):
        harness.fitted_sidenet(torch.nn.Linear(2, 2), tmp_path, "sst2")


def test_benchmarks_md_renders_from_the_committed_results() -> None:
    """The renderer reproduces the committed BENCHMARKS.md from the committed JSON results."""
    from benchmarks.harness import RESULTS, markdown_path
    from benchmarks.report import render

    text = render(RESULTS)
    assert text.startswith("# Benchmarks") and "## Summary" in text
    assert "## Serving side by side" in text and "nan" not in text.lower().split()
    assert text == markdown_path(RESULTS).read_text()
