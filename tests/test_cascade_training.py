"""Training a cascade's later SideNets on the samples that reach them (``fit(reach=...)``,
``sidenet.training.reach_weights``, ``train_sidenet(sample_weight=...)``): weights of ones give today's
training bit for bit, the first SideNet never changes, the weights are what the docstring says, bad
weights and options are refused, and one SideNet ignores the option."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, build_tiny_mainnet, separable_dataset
from sidenet import AdaptiveModel, FeatureCache, train_sidenet
from sidenet.training import REACH, reach_weights

FAST = {"epochs": 3, "lr": 1e-2, "batch_size": 32, "progress": False}


def cascade(seed: int = 0) -> AdaptiveModel:
    return sidenet.attach(
        build_tiny_mainnet(), ["stem", "layer1", "layer2"], input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=seed
    )


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    return DataLoader(separable_dataset(96, seed=0), batch_size=32)


def weights_of(model: AdaptiveModel) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in head.state_dict().items()} for head in model.sidenets]


def random_cache(n: int = 64, features: int = 12, seed: int = 0) -> FeatureCache:
    g = torch.Generator().manual_seed(seed)
    return FeatureCache(
        torch.randn(n, features, generator=g),
        torch.randn(n, NUM_CLASSES, generator=g),
        torch.randint(0, NUM_CLASSES, (n,), generator=g),
    )


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_weights_of_ones_reproduce_unweighted_training_exactly(distill_weight: float) -> None:
    cache = random_cache()
    runs = []
    for weight in (None, torch.ones(len(cache)), torch.full((len(cache),), 3.0)):
        torch.manual_seed(1)
        head = sidenet.SideNet([12], NUM_CLASSES, hidden=8)
        history = train_sidenet(head, cache, sample_weight=weight, distill_weight=distill_weight, **FAST)
        runs.append((head.state_dict(), history))
    (plain, plain_history), (ones, ones_history), (threes, _) = runs
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    assert plain_history == ones_history
    # A uniform weight other than 1 scales the loss, so AdamW (scale-invariant up to eps) lands close
    # but not bit-identical: the weights do reach the loss.
    assert any(not torch.equal(plain[k], threes[k]) for k in plain)


def test_a_zero_weight_sample_has_no_effect_on_training() -> None:
    cache = random_cache()
    weight = torch.ones(len(cache))
    weight[::2] = 0.0
    changed = FeatureCache(cache.features.clone(), cache.mainnet_logits.clone(), cache.labels.clone())
    changed.features[::2] += 100.0  # ignored samples get wild features and other labels
    changed.labels[::2] = (changed.labels[::2] + 1) % NUM_CLASSES
    heads = []
    for data in (cache, changed):
        torch.manual_seed(2)
        head = sidenet.SideNet([12], NUM_CLASSES, hidden=8)
        train_sidenet(head, data, sample_weight=weight, distill_weight=0.5, **FAST)
        heads.append(head.state_dict())
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key])


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.ones(63), "64 finite real numbers"),
        (torch.ones(64, 1), "64 finite real numbers"),
        (torch.ones(64, dtype=torch.bool), "finite real numbers"),
        (torch.tensor([math.nan] + [1.0] * 63), "finite"),
        (torch.tensor([math.inf] + [1.0] * 63), "finite"),
        (torch.tensor([-1.0] + [1.0] * 63), "non-negative"),
        (torch.zeros(64), "not all zero"),
    ],
)
def test_bad_sample_weights_are_refused(weight: torch.Tensor, message: str) -> None:
    head = sidenet.SideNet([12], NUM_CLASSES, hidden=8)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        train_sidenet(head, random_cache(), sample_weight=weight, **FAST)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())  # refused before training


@pytest.mark.parametrize("reach", ["weighted", "hard"])
def test_reach_changes_the_later_sidenets_only(loader: DataLoader, reach: str) -> None:
    everything, reaching = cascade(), cascade()
    everything.fit(loader, seed=3, **FAST)
    reaching.fit(loader, seed=3, reach=reach, **FAST)
    first, second = weights_of(everything), weights_of(reaching)
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])  # the first SideNet trains as before
    for k in (1, 2):
        assert any(not torch.equal(first[k][key], second[k][key]) for key in first[k]), k
    records = reaching.history_
    assert {r["tap"] for r in records} == {0, 1, 2}
    shares = [r["effective_share"] for r in records if r["tap"] > 0]
    assert shares and all(0.0 < s < 1.0 for s in shares)
    assert all("effective_share" not in r for r in records if r["tap"] == 0)
    assert all("effective_share" not in r for r in everything.history_)


def test_one_sidenet_ignores_reach(loader: DataLoader) -> None:
    models = [sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, seed=0) for _ in REACH]
    for model, reach in zip(models, REACH, strict=True):
        model.fit(loader, seed=3, reach=reach, **FAST)
    states = [m.sidenet.state_dict() for m in models]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    assert models[0].history_ == models[1].history_ == models[2].history_
    assert "tap" not in models[0].history_[0]


@pytest.mark.parametrize(
    ("options", "message"), [({"reach": "some"}, "reach must be one of"), ({"exit_share": 1.0}, "exit_share")]
)
def test_bad_reach_options_are_refused_before_the_mainnet_runs(loader: DataLoader, options: dict, message: str) -> None:
    model = cascade()
    calls: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda *args: calls.append(1)) for m in model.split.mainnet.modules()]
    with pytest.raises(ValueError, match=message):
        model.fit(loader, **options, **FAST)
    for hook in hooks:
        hook.remove()
    assert not calls


def test_weighted_reach_is_the_normalised_chance_of_reaching_the_tap() -> None:
    torch.manual_seed(0)
    heads = [sidenet.SideNet([12], NUM_CLASSES, hidden=8) for _ in range(2)]
    caches = [random_cache(seed=s) for s in (0, 1)]
    with torch.no_grad():
        conf = [torch.softmax(h.classify(c.features).double(), 1).amax(1) for h, c in zip(heads, caches, strict=True)]
    expected = (1 - conf[0]) * (1 - conf[1])
    expected = expected / expected.mean()
    weights = reach_weights(list(zip(heads, caches, strict=True)), "weighted")
    assert weights.dtype == torch.float32 and weights.shape == (64,)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(reach_weights(list(zip(heads, caches, strict=True)), "all"), torch.ones(64))


def test_weighted_reach_keeps_distinct_weights_for_saturated_confidences() -> None:
    # Confidences that round to 1.0 in float32 and float64 (logit gaps of 40 and 60) still rank.
    head = sidenet.SideNet([2], 2, hidden=2)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(2))
        head.mlp[0].bias.zero_()
        head.mlp[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        head.mlp[2].bias.zero_()
    features = torch.tensor([[40.0, 0.0], [60.0, 0.0], [1.0, 0.0]])
    cache = FeatureCache(features, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    weights = reach_weights([(head, cache)], "weighted")
    assert torch.isfinite(weights).all() and weights[2] > weights[0] > weights[1] > 0


def test_hard_reach_keeps_the_samples_no_earlier_sidenet_exits() -> None:
    torch.manual_seed(0)
    heads = [sidenet.SideNet([12], NUM_CLASSES, hidden=8) for _ in range(2)]
    caches = [random_cache(seed=s) for s in (0, 1)]
    with torch.no_grad():
        conf = [torch.softmax(h.classify(c.features).double(), 1).amax(1) for h, c in zip(heads, caches, strict=True)]
    # Each earlier SideNet exits its exit_share most confident among the samples reaching it.
    first_exit = conf[0].argsort(descending=True)[:16]  # a quarter of 64
    reached = torch.ones(64, dtype=torch.bool)
    reached[first_exit] = False
    left = reached.nonzero().squeeze(1)
    reached[left[conf[1][left].argsort(descending=True)[:12]]] = False  # a quarter of 48
    weights = reach_weights(list(zip(heads, caches, strict=True)), "hard", exit_share=0.25)
    assert torch.equal(weights > 0, reached)
    torch.testing.assert_close(weights[reached], torch.full((36,), 64 / 36))
