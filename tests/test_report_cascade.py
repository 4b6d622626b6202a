"""``sidenet report`` on a saved cascade: the files, the key figures of ``report.json`` consistent with
each other and with the cascade's own curve, the saved model unchanged, the live audit of logged traffic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_cli import TinyTask, tiny_task  # noqa: F401 (the fixture)
from typer.testing import CliRunner

from sidenet import attach, cli, collect_cascade, load_sidenet, save_sidenet
from sidenet.cascade_choice import threshold_path
from sidenet.cascade_curve import CascadeCurve
from sidenet.report_cascade import saved_family

runner = CliRunner()
TAPS = ["stem", "layer2"]


@pytest.fixture()
def cascade_folder(tiny_task: TinyTask, tmp_path: Path) -> Path:  # noqa: F811
    """A fitted cascade of two SideNets of the tiny task, saved with thresholds set on val."""
    model = attach(tiny_task.mainnet(), TAPS, input_shape=(1, 28, 28), hidden=32, pool_size=2, seed=0)
    model.fit(tiny_task.loaders()["train"], epochs=2, progress=False)
    record = collect_cascade(model, tiny_task.loaders()["val"], progress=False)
    # Halfway along a path that exits at both SideNets (thresholds between scores, never on one).
    path = threshold_path(record, "geometric")
    model.thresholds = path[len(path) // 2]
    folder = tmp_path / "cascade"
    save_sidenet(model, folder, metadata={"task": "tiny"})
    return folder


def _report(folder: Path, *extra: str) -> tuple[dict, Path]:
    out = folder.parent / "report"
    args = ["report", "--sidenet", str(folder), "--out", str(out), "--max-drop", "0.05", "-q", *extra]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "Cascade of 2 SideNets at taps stem -> layer2" in result.output
    return json.loads((out / "report.json").read_text()), out


def test_cascade_report_files_and_figures(tiny_task: TinyTask, cascade_folder: Path) -> None:  # noqa: F811
    saved_config = (cascade_folder / "sidenet_config.json").read_text()
    report, out = _report(cascade_folder, "--no-timing")
    for name in ("report.html", "report.md", "curve.png", "reliability.png"):
        assert (out / name).stat().st_size > 500, name
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (cascade_folder / "sidenet_config.json").read_text() == saved_config  # the model is not changed

    assert report["taps"] == TAPS and report["timing"] is None
    assert report["samples"] == {"calibration": 96, "evaluation": 96}
    assert report["family"] == "equal_disagreement" and report["family_source"].startswith("default")
    model = load_sidenet(tiny_task.mainnet(), cascade_folder)
    mainnet = report["mainnet"]["flops"]
    # FLOPs: the segments add up to the MainNet; the SideNets are what the cascade adds.
    segments = sum(s["segment_flops"] for s in report["sidenets"]) + report["rest_flops"]
    assert segments == pytest.approx(mainnet, rel=1e-9)
    for summary, threshold, rule in zip(report["sidenets"], model.thresholds, model.policies, strict=True):
        assert summary["threshold"] == pytest.approx(threshold) and summary["temperature"] == rule.temperature
        assert summary["side_flops"] > 0 and summary["parameters"] > 0
        for name in ("ece_raw", "ece_saved", "ece_fitted"):
            assert 0 <= summary[name]["ece"] <= 1
            assert summary[name]["accuracy"] == pytest.approx(summary["accuracy"])  # same predictions at any T
        assert 0 <= summary["accuracy"] <= 1 and 0 <= summary["agreement"] <= 1

    # The table starts at the MainNet: every threshold never, no exit, every SideNet paid for.
    first = report["table"][0]
    assert first["thresholds"] == [None, None] and first["exit_rate"] == 0
    assert first["accuracy"] == pytest.approx(report["mainnet"]["accuracy"])
    extra = sum(s["side_flops"] for s in report["sidenets"]) / mainnet
    assert first["relative_compute"] == pytest.approx(1 + extra)
    assert all(row["relative_compute"] <= first["relative_compute"] + 1e-12 for row in report["table"])

    # The named points: exits per SideNet add up to the exit rate; evaluation figures match the table.
    table = {tuple(row["thresholds"]): row for row in report["table"]}
    for name, point in report["points"].items():
        for where in ("calibration", "evaluation"):
            assert sum(point[where]["exit_rates"]) == pytest.approx(point[where]["exit_rate"])
        row = table[tuple(point["thresholds"])]
        assert f"{name} thresholds" in row["marks"]
        assert row["relative_compute"] == pytest.approx(point["evaluation"]["relative_compute"])
    saved = report["points"]["saved"]
    assert saved["thresholds"] == pytest.approx(list(model.thresholds))
    assert min(saved["calibration"]["exit_rates"]) > 0  # both SideNets answer some samples
    oracle = report["oracle"]
    fraction = (1 - saved["evaluation"]["relative_compute"]) / (1 - oracle["relative_compute"])
    assert saved["oracle_fraction"] == pytest.approx(fraction)
    assert report["points"]["empirical"]["calibration"]["accuracy_drop"] <= 0.05 + 1e-9
    # The guaranteed vector is a point of the path it was certified along (built on the other half).
    guaranteed = report["points"]["guaranteed"]["thresholds"]
    assert guaranteed in report["guaranteed_path"]
    shift = report["shift"]["calibration_vs_evaluation"]
    assert shift["reference_size"] == shift["observed_size"] == 96
    # The shift check reads the first SideNet's scores: its exit rates are that SideNet's at the saved point.
    assert shift["reference_exit_rate"] == pytest.approx(saved["calibration"]["exit_rates"][0])
    assert shift["observed_exit_rate"] == pytest.approx(saved["evaluation"]["exit_rates"][0])

    # The evaluation figures are the cascade's own: the curve of the test data at the saved thresholds.
    record = collect_cascade(model, tiny_task.loaders()["test"], progress=False)
    direct = CascadeCurve(record, []).at(model.thresholds)
    assert saved["evaluation"]["accuracy"] == pytest.approx(direct["accuracy"])
    assert saved["evaluation"]["exit_rates"] == pytest.approx(direct["exit_rates"])
    assert saved_family(model) == ("equal_disagreement", "default (no family saved)")


def test_cascade_report_measures_throughput_on_halves(tiny_task: TinyTask, cascade_folder: Path) -> None:  # noqa: F811
    # Saved as `sidenet fit --taps` saves its choice: the report's path follows the saved family.
    folder = cascade_folder.parent / "fitted"
    choice = {"family": "geometric", "taps": TAPS}
    save_sidenet(load_sidenet(tiny_task.mainnet(), cascade_folder), folder, metadata={"threshold_choice": choice})
    report, out = _report(folder, "--halves", "--max-samples", "64")
    assert (report["family"], report["family_source"]) == ("geometric", "saved choice")
    assert report["samples"] == {"calibration": 32, "evaluation": 32}
    timing = report["timing"]
    assert set(timing["points"]) == {"saved", "empirical", "guaranteed"} and timing["samples"] == 32
    for point in timing["points"].values():
        assert point["throughput"] > 0 and point["speedup"] == pytest.approx(
            point["throughput"] / timing["mainnet"]["throughput"]
        )
    assert "samples/s (speed-up)" in (out / "report.md").read_text()
    # Where the time goes: each part timed alone beside its FLOPs share, one segment per tap and the rest.
    parts = timing["parts"]
    assert parts["taps"] == TAPS and len(parts["segments"]) == len(TAPS) + 1 == len(parts["flops_shares"]["segments"])
    assert sum(parts["shares"]["segments"]) == pytest.approx(1.0) == sum(parts["flops_shares"]["segments"])
    assert (
        f"to `{TAPS[0]}`" in (out / "report.md").read_text()
        and "Where the time goes" in (out / "report.md").read_text()
    )
    # Eager on the CPU: each point also forecast per routed batch from those parts, shown beside the measure.
    assert set(timing["forecasts"]) == {"saved", "empirical", "guaranteed"}
    assert all(0 < f < 3 for f in timing["forecasts"].values()) and parts["rows"][0] == 1
    page = (out / "report.md").read_text()
    assert "forecast from its parts' timing per routed batch" in page and "; forecast " in page


def test_cascade_report_shows_the_live_audit(cascade_folder: Path, tmp_path: Path) -> None:
    # Two replicas' /metrics answers: 9 of 400 audited samples disagree, above a 1% tolerance.
    replica = {"share": 0.02, "tolerance": 0.01, "delta": 0.05, "samples_seen": 10_000, "audited": 200}
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"audit": {**replica, "disagreed": d}}) for d in (4, 5)))
    report, out = _report(cascade_folder, "--audit", str(log), "--no-timing")
    audit = report["audit"]
    assert (audit["samples_seen"], audit["audited"], audit["disagreed"]) == (20_000, 400, 9) and audit["flagged"]
    page = (out / "report.md").read_text()
    assert "WARNING: the live audit" in page and "Live audit of logged traffic" in page
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = runner.invoke(cli.app, ["report", "--sidenet", str(cascade_folder), "--audit", str(bad), "-q"])
    assert result.exit_code == 2 and "no audit counts found" in result.output, result.output


def test_cascade_report_times_the_cascade_as_served(cascade_folder: Path) -> None:
    out = cascade_folder.parent / "report"
    args = ["report", "--sidenet", str(cascade_folder), "--out", str(out), "--max-drop", "0.05", "-q"]
    result = runner.invoke(cli.app, [*args, "--max-samples", "64", "--compile", "eager"])
    assert result.exit_code == 0, result.output
    assert "Compiling for --compile eager before timing" in result.output  # -q: no bar, one line instead
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert timing["served"] == "compile_for_serving (backend eager)" and timing["compile_seconds"] > 0
    unit = timing[timing["baseline"]]["throughput"]
    assert timing["mainnet_compiled"]["throughput"] > 0 and timing["forecasts"] is None  # no eager forecast
    for point in timing["points"].values():
        assert point["speedup"] == pytest.approx(point["throughput"] / unit)
    assert "over the best MainNet alone" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compile", "fast"], "--compile must be one of"),
        (["--compile", "auto", "--no-timing"], "it needs timing"),
    ],
)
def test_bad_compile_option_is_refused_before_any_work(
    tiny_task: TinyTask,  # noqa: F811
    cascade_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    def no_mainnet(*args, **kwargs):
        raise AssertionError("the MainNet was loaded before the options were checked")

    monkeypatch.setattr(tiny_task, "mainnet", no_mainnet)
    result = runner.invoke(cli.app, ["report", "--sidenet", str(cascade_folder), *extra])
    assert result.exit_code == 2 and message in result.output
