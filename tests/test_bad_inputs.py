"""Bad inputs at every public entry point: each gets a ``ValueError`` (or a subclass) that names the
problem, and none gets an answer. Hypothesis draws the values where a range of them is wrong."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, build_tiny_mainnet, make_images, tiny_bert
from sidenet import AdaptiveModel, SweepRecord, TradeoffCurve
from sidenet.serving import PooledRouter

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values that are not a threshold: outside [0, 1] (inf aside, which is NEVER_EXIT), NaN, strings,
# booleans, None, containers.
BAD_THRESHOLDS = st.one_of(
    st.floats(max_value=-1e-9, allow_infinity=False, allow_nan=False),
    st.floats(min_value=1.0 + 1e-9, allow_infinity=False, allow_nan=False),
    st.just(math.nan),
    st.just(-math.inf),
    st.sampled_from(["0.5", "never", "", True, False, None, [0.5], {"t": 0.5}]),
)
BAD_TEMPERATURES = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.just(math.nan),
    st.just(math.inf),
    st.sampled_from(["1", True, None, [1.0]]),
)


@pytest.fixture(scope="module")
def model() -> AdaptiveModel:
    return sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)


def loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


# -- attach -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mainnet", "tap", "options", "message"),
    [
        (object(), "layer1", {}, "splitter"),
        (nn.Linear(3, 2), "layer1", {}, "splitter"),
        ("resnet18", "layer1", {}, "splitter"),
        (None, "layer1", {}, "splitter"),
        (build_tiny_mainnet(), "nope", {}, "valid taps"),
        (build_tiny_mainnet(), 3, {}, "valid taps"),
        (build_tiny_mainnet(), None, {}, "tap"),
        (nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Linear(8, 4)), 2.7, {}, "tap"),
        (nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Linear(8, 4)), True, {}, "tap"),
        (nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Linear(8, 4)), 3, {}, "tap"),
        (build_tiny_mainnet(), "layer1", {"input_shape": (3, 16, 16)}, "channels"),
        (build_tiny_mainnet(), "layer1", {"input_shape": (16, 16)}, "shape"),
        (build_tiny_mainnet(), "layer1", {"num_classes": NUM_CLASSES + 1}, "classes"),
        (build_tiny_mainnet(), "layer1", {"hidden": 0}, "hidden"),
        (build_tiny_mainnet(), "layer1", {"pool_size": -1}, "pool_size"),
        (build_tiny_mainnet(), "layer1", {"policy": "softmax"}, "policy"),
        (build_tiny_mainnet(), "layer1", {"threshold": 1.5}, "threshold"),
        (build_tiny_mainnet(), "layer1", {"temperature": 0.0}, "temperature"),
    ],
)
def test_attach_refuses(mainnet: object, tap: object, options: dict, message: str) -> None:
    options = {"input_shape": IMAGE_SHAPE, **options}
    with pytest.raises(ValueError, match=message):
        sidenet.attach(mainnet, tap, **options)  # type: ignore[arg-type]


def test_attach_needs_an_input_shape_for_images() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        sidenet.attach(build_tiny_mainnet(), "layer1")


# -- the exit rule ------------------------------------------------------------------------------------
@FUZZ
@given(value=BAD_THRESHOLDS)
def test_bad_threshold_is_refused_everywhere(model: AdaptiveModel, value: object) -> None:
    before = model.threshold
    with pytest.raises(ValueError, match="threshold"):
        model.threshold = value  # type: ignore[assignment]
    with pytest.raises(ValueError, match="threshold"):
        model.policy.threshold = value  # type: ignore[assignment]
    with pytest.raises(ValueError, match="threshold"):
        sidenet.ExitPolicy(threshold=value)  # type: ignore[arg-type]
    assert model.threshold == before


@FUZZ
@given(value=BAD_TEMPERATURES)
def test_bad_temperature_is_refused_everywhere(model: AdaptiveModel, value: object) -> None:
    before = model.temperature
    with pytest.raises(ValueError, match="temperature"):
        model.temperature = value  # type: ignore[assignment]
    with pytest.raises(ValueError, match="temperature"):
        model.policy.temperature = value  # type: ignore[assignment]
    assert model.temperature == before


@pytest.mark.parametrize("kind", ["softmax", "", None, 3, "MAX_SOFTMAX"])
def test_bad_policy_is_refused(model: AdaptiveModel, kind: object) -> None:
    with pytest.raises(ValueError, match="policy"):
        model.policy_kind = kind  # type: ignore[assignment]
    assert model.policy_kind == "max_softmax"


# -- model(x) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "message"),
    [
        ([[1.0, 2.0]], "tensor"),
        (np.zeros((2, *IMAGE_SHAPE), dtype=np.float32), "tensor"),
        (torch.zeros(0, *IMAGE_SHAPE), "empty"),
        (torch.zeros(()), "empty"),
        (torch.zeros(2, 3, 16, 16), "channels"),
        (torch.zeros(2, 16, 16), "shape"),
        (torch.full((2, *IMAGE_SHAPE), math.nan), "NaN"),
        (torch.full((2, *IMAGE_SHAPE), math.inf), "infinite"),
        (torch.zeros(2, *IMAGE_SHAPE, dtype=torch.float64), "dtype"),
    ],
)
@pytest.mark.parametrize("mode", ["adaptive", "main", "side", "batch"])
def test_forward_refuses(model: AdaptiveModel, x: object, message: str, mode: str) -> None:
    seen = model.samples_seen
    with pytest.raises(ValueError, match=message):
        model(x, mode=mode)
    assert model.samples_seen == seen  # a refused batch is not counted


@pytest.mark.parametrize("mode", ["fast", "", None, "ADAPTIVE"])
def test_forward_refuses_unknown_modes(model: AdaptiveModel, mode: object) -> None:
    with pytest.raises(ValueError, match="mode"):
        model(make_images(2), mode=mode)  # type: ignore[arg-type]


# -- fit, sweep ---------------------------------------------------------------------------------------
def bad_labels() -> list[tuple[torch.Tensor, str]]:
    n = 8
    return [
        (torch.zeros(n, 1, dtype=torch.long), "shape"),
        (torch.zeros(n, 2, dtype=torch.long), "shape"),
        (torch.full((n,), NUM_CLASSES, dtype=torch.long), "range|classes"),
        (torch.full((n,), -1, dtype=torch.long), "range|classes"),
        (torch.full((n,), 0.5), "integer"),
    ]


@pytest.mark.parametrize(("labels", "message"), bad_labels())
def test_fit_refuses_bad_labels(labels: torch.Tensor, message: str) -> None:
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8, pool_size=2)
    with pytest.raises(ValueError, match=message):
        model.fit(loader(make_images(len(labels)), labels), epochs=1, progress=False)


@pytest.mark.parametrize(("labels", "message"), bad_labels())
def test_sweep_refuses_bad_labels(model: AdaptiveModel, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sidenet.sweep(model, loader(make_images(len(labels)), labels), progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"distill_weight": 1.5}, "distill"),
    ],
)
def test_fit_refuses_bad_settings(options: dict, message: str) -> None:
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8, pool_size=2)
    data = loader(make_images(8), torch.arange(8) % NUM_CLASSES)
    with pytest.raises(ValueError, match=message):
        model.fit(data, progress=False, **options)


def test_fit_and_sweep_refuse_an_empty_loader(model: AdaptiveModel) -> None:
    empty = loader(make_images(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no batches"):
        sidenet.sweep(model, empty, progress=False)
    fresh = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8, pool_size=2)
    with pytest.raises(ValueError, match="no batches"):
        fresh.fit(empty, progress=False)


# -- threshold_for ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curve() -> TradeoffCurve:
    rng = np.random.default_rng(0)
    n = 200
    agree = rng.random(n) < 0.9
    return TradeoffCurve(
        SweepRecord(
            confidence=rng.random(n).astype(np.float32).astype(np.float64),
            side_correct=agree & (rng.random(n) < 0.9),
            main_correct=rng.random(n) < 0.9,
            agree=agree,
            trunk_side_flops=np.full(n, 10.0),
            rest_flops=np.full(n, 90.0),
            mainnet_flops=np.full(n, 95.0),
        )
    )


@FUZZ
@given(
    rule=st.sampled_from(["max_accuracy_drop", "max_disagreement"]),
    limit=st.one_of(
        st.floats(max_value=-1e-9, allow_nan=False),
        st.floats(min_value=1.0 + 1e-9, allow_nan=False),
        st.just(math.nan),
        st.sampled_from(["0.1", None, True]),
    ),
)
def test_threshold_for_refuses_bad_limits(curve: TradeoffCurve, rule: str, limit: object) -> None:
    if limit is None:  # no rule given at all
        with pytest.raises(ValueError, match="exactly one"):
            curve.threshold_for(**{rule: limit})
        return
    with pytest.raises(ValueError, match=rule):
        curve.threshold_for(**{rule: limit})


@FUZZ
@given(
    confidence=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=1.0, allow_nan=False),
        st.just(math.nan),
        st.sampled_from(["0.9", True]),
    )
)
def test_threshold_for_refuses_bad_confidence(curve: TradeoffCurve, confidence: object) -> None:
    with pytest.raises(ValueError, match="confidence"):
        curve.threshold_for(max_accuracy_drop=0.01, confidence=confidence)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [-0.1, math.nan, "0.5", 0.0])
def test_threshold_for_refuses_bad_or_unreachable_budgets(curve: TradeoffCurve, budget: object) -> None:
    with pytest.raises(ValueError, match="compute_budget"):
        curve.threshold_for(compute_budget=budget)  # type: ignore[arg-type]


def test_threshold_for_refuses_two_rules(curve: TradeoffCurve) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        curve.threshold_for(max_accuracy_drop=0.01, compute_budget=0.5)


@pytest.mark.parametrize("limit", [0.0, 0.01, 0.2, 1.0])
def test_threshold_for_answers_with_a_threshold_the_model_takes(
    curve: TradeoffCurve, model: AdaptiveModel, limit: float
) -> None:
    for confidence in (None, 0.9):
        threshold = curve.threshold_for(max_accuracy_drop=limit, confidence=confidence)
        assert sidenet.ExitPolicy(threshold=threshold).threshold == threshold


# -- save_sidenet / load_sidenet ----------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [{"f": object()}, {"t": torch.zeros(2)}, {1: "x"}, "notes", [1, 2]])
def test_save_refuses_metadata_that_is_not_json(model: AdaptiveModel, metadata: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metadata"):
        sidenet.save_sidenet(model, tmp_path / "s", metadata=metadata)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_load_refuses_what_is_not_a_saved_sidenet(model: AdaptiveModel, tmp_path: Path) -> None:
    mainnet = build_tiny_mainnet()
    with pytest.raises(sidenet.CheckpointError):
        sidenet.load_sidenet(mainnet, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sidenet.CheckpointError):
        sidenet.load_sidenet(mainnet, tmp_path / "empty")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(sidenet.CheckpointError):
        sidenet.load_sidenet(mainnet, tmp_path / "file")


@FUZZ
@given(data=st.binary(max_size=200))
def test_load_refuses_a_config_of_random_bytes(
    model: AdaptiveModel, tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    folder = tmp_path_factory.mktemp("saved")
    sidenet.save_sidenet(model, folder)
    (folder / sidenet.config.CONFIG_NAME).write_bytes(data)
    with pytest.raises(sidenet.CheckpointError):
        sidenet.load_sidenet(build_tiny_mainnet(), folder)


@FUZZ
@given(
    key=st.sampled_from(
        [
            "tap",
            "feature_shape",
            "num_classes",
            "hidden",
            "pool_size",
            "threshold",
            "temperature",
            "policy",
            "split_options",
            "mainnet_fingerprint",
            "format_version",
        ]
    ),
    value=st.one_of(
        st.none(),
        st.text(max_size=5),
        st.integers(-3, 3),
        st.floats(allow_nan=False),
        st.lists(st.integers(-1, 3), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers()),
    ),
)
def test_load_refuses_or_survives_any_edited_value(
    model: AdaptiveModel, tmp_path_factory: pytest.TempPathFactory, key: str, value: object
) -> None:
    """An edited config either loads (the value was valid) or raises CheckpointError; never anything
    else, and never a model that reads another tap."""
    import json

    folder = tmp_path_factory.mktemp("saved")
    sidenet.save_sidenet(model, folder)
    path = folder / sidenet.config.CONFIG_NAME
    config = json.loads(path.read_text())
    original = config[key]
    config[key] = value
    path.write_text(json.dumps(config))
    try:
        loaded = sidenet.load_sidenet(build_tiny_mainnet(), folder)
    except sidenet.CheckpointError:
        return
    except sidenet.MainNetMismatchError:
        assert key == "mainnet_fingerprint"
        return
    assert loaded.tap == model.tap or value == original
    x = make_images(4)
    with torch.no_grad():
        loaded(x)


# -- PooledRouter -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rest_batch": 0}, "rest_batch"),
        ({"rest_batch": "8"}, "rest_batch"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_wait": 1.5}, "max_wait"),
        ({"rest_batch": True}, "rest_batch"),
    ],
)
def test_router_refuses_bad_settings(model: AdaptiveModel, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PooledRouter(model, **options)


def test_router_refuses_a_bad_batch_and_keeps_serving(model: AdaptiveModel) -> None:
    router = PooledRouter(model, rest_batch=4, max_wait=1)
    for bad in (torch.zeros(0, *IMAGE_SHAPE), torch.zeros(2, 3, 16, 16), [1, 2]):
        with pytest.raises(ValueError):
            router.submit(bad)
    answered = router.run([make_images(3, seed=1), make_images(2, seed=2)])
    assert [routed.batch_id for routed in answered] == [0, 1]


# -- the command line ---------------------------------------------------------------------------------
def _valid_fit_option(option: str, value: str) -> bool:
    """Whether ``sidenet fit`` should accept ``value`` for ``option`` (the few good values drawn)."""
    try:
        number = float(value)
    except ValueError:
        return False
    if option in ("--max-drop", "--distill"):
        return 0.0 <= number <= 1.0
    if option in ("--hidden", "--pool", "--epochs"):
        # Click reads "1000000.0" as the integer 1000000: whole numbers are valid whatever their spelling.
        return math.isfinite(number) and number.is_integer() and number > 0
    return False


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from(
        [
            "--max-drop",
            "--confidence",
            "--distill",
            "--hidden",
            "--pool",
            "--epochs",
            "--tap",
            "--policy",
            "--features",
            "--task",
        ]
    ),
    value=st.one_of(
        st.sampled_from(["-1", "2", "nan", "inf", "-inf", "0", "1.5", "abc", "", "layer9", "1e309"]),
        st.floats(min_value=1.0 + 1e-6, max_value=1e6).map(str),
        st.integers(max_value=0).map(str),
    ),
)
def test_cli_refuses_bad_option_values_before_any_work(
    touched: list[str], tmp_path: Path, option: str, value: str
) -> None:
    """Any bad value of a `sidenet fit` option: exit code 2 and one `error:` line (Typer's own usage
    error for values it cannot parse), never a traceback, a trained MainNet or data read."""
    from typer.testing import CliRunner

    from sidenet import cli

    if _valid_fit_option(option, value):
        return
    result = CliRunner().invoke(cli.app, ["fit", "-q", "--out", str(tmp_path / "side"), option, value])
    assert touched == [], touched
    assert result.exit_code == 2, (option, value, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not (tmp_path / "side").exists()


# -- validate_input: a ValueError for every wrong input, never a TypeError ---------------------------------
WRONG_INPUTS = [
    None,
    "abc",
    b"x",
    3,
    2.5,
    [1, 2],
    [[1.0]],
    (torch.zeros(2),),
    {"a": 1},
    {1: 2},
    np.zeros((2, *IMAGE_SHAPE)),
    torch.zeros(()),
    torch.zeros(0, *IMAGE_SHAPE),
    torch.zeros(2, *IMAGE_SHAPE, dtype=torch.complex64),
    torch.zeros(2, *IMAGE_SHAPE, dtype=torch.float64),
    torch.full((2, *IMAGE_SHAPE), math.nan),
]
IDS = torch.zeros(2, 3, dtype=torch.long)
WRONG_TEXT_INPUTS = [
    {"input_ids": None},
    {"input_ids": [[1, 2]]},
    {"input_ids": IDS.float()},
    {"input_ids": IDS.bool()},
    {"input_ids": IDS.to(torch.complex64)},
    {"input_ids": IDS.unsqueeze(0)},
    {"input_ids": IDS, "attention_mask": "x"},
    {"input_ids": IDS, "attention_mask": np.ones((2, 3))},
    {"input_ids": IDS, "token_type_ids": [0]},
    {"input_ids": IDS, "attention_mask": torch.full((2, 3), 2)},
    {"input_ids": torch.full((2, 3), 99)},
    {"input_ids": torch.full((2, 3), -1)},
    {"input_ids": np.zeros((2, 3), dtype=np.int64)},
]


def wrong_input_splits() -> list:
    splits = [
        sidenet.split_mainnet(build_tiny_mainnet(), "layer1"),
        sidenet.split_mainnet(nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Linear(8, NUM_CLASSES)), 2),
        sidenet.CallableSplit(lambda x: x, lambda state: state, mainnet=nn.Linear(4, 4), tap="t"),
    ]
    return [(split, x) for split in splits for x in WRONG_INPUTS]


@pytest.mark.parametrize(("split", "x"), wrong_input_splits())
def test_validate_input_raises_value_errors_only(split: sidenet.MainNetSplit, x: object) -> None:
    with pytest.raises(ValueError):
        split.validate_input(x)


@pytest.mark.parametrize("x", [*WRONG_INPUTS, *WRONG_TEXT_INPUTS])
def test_text_validate_input_raises_value_errors_only(x: object) -> None:
    split = sidenet.split_mainnet(tiny_bert(), 1)
    with pytest.raises(ValueError):
        split.validate_input(x)


@pytest.mark.parametrize(
    "x",
    [torch.full((4, 3), 3e38), torch.full((2, 100_000), 60_000.0, dtype=torch.float16)],
    ids=["float32 near its maximum", "float16 whose sum overflows float16"],
)
def test_large_finite_inputs_are_not_taken_for_infinite(x: torch.Tensor) -> None:
    # The value check first sums the input; a sum that overflows must fall back to the exact check.
    sidenet.CallableSplit(trunk=lambda s: s, rest=lambda s: s).check_values(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sidenet.CallableSplit(trunk=lambda s: s, rest=lambda s: s).check_values(
            x.index_fill(1, torch.tensor([1]), float("nan"))
        )
