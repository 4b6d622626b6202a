"""Helpers of the compression benchmarks that change models: they must keep the network valid."""

from __future__ import annotations

import pytest
import torch
from benchmarks.resnet_compression import prune_channels

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
    from benchmarks.text_pruning import prune_feed_forward

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, num_labels=2)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
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


class _Parsed(Exception):
    """Raised in place of running a benchmark once its command line has parsed."""


@pytest.mark.parametrize("quick", [False, True])
def test_every_runner_step_accepts_its_arguments(quick: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib
    import sys

    from benchmarks.__main__ import STEPS

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for script, full, quick_args, data_flag in STEPS.values():
        arguments = [*(quick_args if quick else full), *([data_flag, "/data/sst2"] if data_flag else [])]
        module = importlib.import_module(f"benchmarks.{script.removesuffix('.py')}")
        monkeypatch.setattr(sys, "argv", [script, *arguments])
        with pytest.raises(_Parsed):  # an unknown argument would exit with argparse's error instead
            module.main()


def test_benchmarks_md_renders_from_the_committed_results() -> None:
    """The renderer copes with every committed JSON result (older ones may lack newer fields)."""
    from benchmarks.common import RESULTS
    from benchmarks.report import render

    text = render(RESULTS)
    assert text.startswith("# Benchmarks") and "## Summary" in text
    assert "## Serving side by side" in text and "nan" not in text.lower().split()


def test_run_script_runs_main_under_its_command_line_and_restores_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import benchmarks.__main__ as runner

    seen: list[list[str]] = []
    fake = types.SimpleNamespace(main=lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(runner.importlib, "import_module", lambda name: fake if name == "benchmarks.serving" else None)
    before = list(sys.argv)
    runner.run_script("serving.py", ["--quick"])
    assert seen == [[str(runner.HERE / "serving.py"), "--quick"]] and sys.argv == before
