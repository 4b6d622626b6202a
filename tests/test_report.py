"""The trade-off report: its numbers agree with the curve and calibration functions, the page is
self-contained, the CLI writes it, and (where Chromium is installed) it renders to a non-blank image."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import sidenet.report
from helpers import NUM_CLASSES, separable_dataset
from sidenet import AdaptiveModel, TradeoffCurve, cli
from sidenet.calibration import calibration_metrics
from sidenet.curve import collect
from sidenet.policy import NEVER_EXIT, POLICIES, ExitPolicy
from sidenet.report import ReportSettings, _rescored, adaptive_log_probs, build_report
from sidenet.report_page import write_report


def mixed_loader(seed: int) -> DataLoader:
    """Half separable images, half noise with random labels: confidences spread out."""
    x, y = separable_dataset(64, seed=seed).tensors
    generator = torch.Generator().manual_seed(seed + 100)
    noise = torch.randn(64, *x.shape[1:], generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (64,), generator=generator)
    return DataLoader(TensorDataset(torch.cat([x, noise]), torch.cat([y, labels])), batch_size=32)


@pytest.fixture(scope="module")
def built(shared_model: AdaptiveModel):
    model = shared_model
    model.fit(DataLoader(separable_dataset(128), batch_size=32), epochs=2, lr=3e-3, progress=False)
    model.threshold, model.temperature = 0.77, 1.3
    settings = ReportSettings(max_accuracy_drop=0.05, timing_samples=64, repeats=1, table_rows=4)
    report = build_report(
        model, mixed_loader(1), mixed_loader(2), settings, class_names=("a", "b", "c", "d"), progress=False
    )
    return model, report


def test_model_settings_are_restored(built) -> None:
    model, _ = built
    assert (model.policy_kind, model.temperature, model.threshold) == ("max_softmax", 1.3, pytest.approx(0.77))


def test_report_numbers_agree_with_the_library(built) -> None:
    model, report = built
    assert set(report.policies) == set(POLICIES) and report.recommended is report.policies[report.recommended.kind]
    raw = report.raw_evaluation
    before = calibration_metrics(raw.side_logits, raw.labels)
    assert report.calibration.sidenet_before.ece == pytest.approx(before.ece)
    t = report.temperature
    after = calibration_metrics(raw.side_logits, raw.labels, temperature=t)
    assert report.calibration.sidenet_after.nll == pytest.approx(after.nll)
    # The recommended point is the evaluation curve of that policy at the guaranteed threshold.
    best = report.recommended
    curve = report.curves[best.kind]
    assert best.guaranteed.evaluation == curve.at(best.guaranteed.threshold)
    assert best.oracle["accuracy"] == pytest.approx(curve.mainnet_accuracy)
    # The recommended rule is ready to deploy: its kind, the fitted temperature, the guaranteed threshold.
    assert (best.policy.temperature, best.policy.threshold) == (t, best.guaranteed.threshold)
    # Threshold rows: distinct, high to low, each with a measured throughput.
    thresholds = [row.threshold for row in report.thresholds]
    assert thresholds == sorted(set(thresholds), reverse=True)
    assert all(row.throughput > 0 for row in report.thresholds)
    assert sum(row.samples for row in report.per_class) == curve.num_samples == 128
    assert [name for name, _ in report.shift.items()] == ["calibration_vs_evaluation", "evaluation_half_vs_half"]


def test_report_json_serialises_the_typed_report(built) -> None:
    """report.json's keys, as before the report was typed, with the values of the typed fields."""
    model, report = built
    s = json.loads(json.dumps(report.to_dict(), default=float))
    assert list(s) == [
        "tap",
        "settings",
        "samples",
        "mainnet",
        "sidenet_accuracy",
        "calibration",
        "policies",
        "recommended",
        "shift",
        "per_class",
        "thresholds",
        "timing",
        "audit",
    ]
    assert s["audit"] is None  # no logged traffic given
    best = report.recommended
    assert s["recommended"]["policy"] == best.kind and s["recommended"]["threshold"] == best.guaranteed.threshold
    assert s["recommended"]["evaluation"] == best.guaranteed.evaluation
    assert s["samples"] == {"calibration": 128, "evaluation": 128}
    for kind, policy in report.policies.items():
        assert set(s["policies"][kind]) == {
            "guaranteed",
            "empirical",
            "best_compute_calibration",
            "best_compute_evaluation",
            "oracle",
        }
        assert s["policies"][kind]["best_compute_calibration"] == policy.best_compute_calibration
        assert s["policies"][kind]["empirical"]["calibration"] == policy.empirical.calibration
    assert s["calibration"]["temperature"] == report.temperature
    assert s["calibration"]["adaptive_at_guaranteed"] == report.calibration.adaptive_at_guaranteed.to_dict()
    assert [row["class"] for row in s["per_class"]] == ["a", "b", "c", "d"][: len(s["per_class"])]
    assert s["shift"]["calibration_vs_evaluation"]["p_value"] == report.shift.calibration_vs_evaluation.p_value
    assert [row["threshold"] for row in s["thresholds"]] == [row.threshold for row in report.thresholds]
    assert all(row["speedup"] == pytest.approx(report.timing.speedup(row["threshold"])) for row in s["thresholds"])
    assert set(s["timing"]["thresholds"]) == {"mainnet", *(repr(row.threshold) for row in report.thresholds)}
    # Where the time goes: the trunk, the SideNet and the rest, each timed alone, beside their FLOPs.
    parts = s["timing"]["parts"]
    assert len(parts["segments"]) == 2 and len(parts["sides"]) == 1 and min(parts["segments"]) > 0
    profile = model.flop_profile(next(iter(mixed_loader(2)))[0])
    assert report.timing.parts.segment_flops == (profile.trunk, profile.rest)
    assert report.timing.parts.side_flops == (profile.side,)
    assert "Where the time goes" in report.timing.describe()
    # Routed eagerly on the CPU: each threshold's speed-up also forecast per routed batch from those parts.
    assert set(s["timing"]["forecasts"]) == {repr(row.threshold) for row in report.thresholds}
    assert all(0 < f < 3 for f in s["timing"]["forecasts"].values()) and report.timing.parts.rows[0] == 1
    assert "; forecast " in report.timing.speed(report.thresholds[0].threshold)
    assert report.summary == report.to_dict()  # the name of earlier releases


def test_policies_scored_from_one_pass_equal_their_own_sweeps(built) -> None:
    model, report = built
    saved = model.policy
    try:
        for kind in POLICIES:
            model.policy = ExitPolicy(saved.threshold, report.temperature, kind)
            fresh = collect(model, mixed_loader(2), progress=False)
            got = report.curves[kind].record
            assert not got.order_dependent_flops and got.exit_rule == fresh.exit_rule
            np.testing.assert_allclose(got.confidence, fresh.confidence, rtol=1e-6)
            np.testing.assert_array_equal(got.rest_flops, fresh.rest_flops)
    finally:
        model.policy = saved


def test_text_records_are_swept_again_under_a_rule_that_reorders_them(built, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where FLOPs credit samples in confidence order (text), a rule ordering the samples otherwise needs
    a new sweep, run with the model under that rule; the model's own rule is back afterwards."""
    model, report = built
    raw = dataclasses.replace(report.curves["max_softmax"].record, order_dependent_flops=True)
    seen: list[ExitPolicy] = []
    monkeypatch.setattr(sidenet.report, "collect", lambda model, loader, progress: seen.append(model.policy) or raw)
    saved = model.policy
    same = ExitPolicy(NEVER_EXIT, report.temperature, "max_softmax")
    np.testing.assert_array_equal(_rescored(model, raw, [], False, same).confidence, raw.confidence)
    assert seen == []  # the same order: rescored from the logits alone
    reorders = ExitPolicy(NEVER_EXIT, report.temperature, "entropy")
    entropy = report.curves["entropy"].record.confidence
    assert not np.array_equal(np.argsort(-entropy, kind="stable"), np.argsort(-raw.confidence, kind="stable"))
    assert _rescored(model, raw, [], False, reorders) is raw and seen == [reorders]
    assert model.policy is saved


def test_adaptive_log_probs_mix_the_two_answers(built) -> None:
    model, _ = built
    record = collect(model, mixed_loader(2), progress=False)
    mixed = adaptive_log_probs(record, 0.8, temperature=model.temperature)
    exited = record.confidence.astype(np.float32) >= np.float32(0.8)
    side = torch.log_softmax(torch.as_tensor(record.side_logits, dtype=torch.float64) / model.temperature, 1).numpy()
    main = torch.log_softmax(torch.as_tensor(record.main_logits, dtype=torch.float64), 1).numpy()
    np.testing.assert_allclose(mixed[exited], side[exited])
    np.testing.assert_allclose(mixed[~exited], main[~exited])
    accuracy = (mixed.argmax(1) == record.labels).mean()
    assert accuracy == pytest.approx(TradeoffCurve(record).at(0.8)["accuracy"])


def test_page_is_self_contained(built, tmp_path: Path) -> None:
    _, report = built
    html_path, md_path = write_report(report, tmp_path / "r", "tiny report")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # nothing fetched from elsewhere
    for heading in ("Compute-accuracy trade-off", "Calibration", "Per class", "Shift check", "Thresholds"):
        assert heading in page and heading in md_path.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text()):
        assert (md_path.parent / image).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "r" / "report.json").read_text())["tap"] == "layer1"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package: chromium)")
def test_page_renders_in_headless_chromium(built, tmp_path: Path) -> None:
    _, report = built
    html_path, _ = write_report(report, tmp_path / "r", "tiny report")
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1100,2400",
        html_path.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    # A rendered page: mostly white, with text, tables and plots (dark pixels) spread down the page.
    dark_rows = np.flatnonzero((pixels < 128).any(axis=1))
    assert pixels.mean() > 150 and len(dark_rows) > 400 and dark_rows.max() > 1200


def test_report_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_cli import TinyTask

    monkeypatch.setitem(cli.TASKS, "tiny", TinyTask())
    runner = CliRunner()
    out = tmp_path / "side"
    assert runner.invoke(cli.app, ["fit", "--task", "tiny", "--out", str(out), "--epochs", "2", "-q"]).exit_code == 0
    config = json.loads((out / "sidenet_config.json").read_text())
    assert config["temperature"] > 0 and (out / "reference.safetensors").is_file()
    options = ["--out", str(tmp_path / "rep"), "--no-timing", "--max-drop", "0.1", "-q"]
    result = runner.invoke(cli.app, ["report", "--sidenet", str(out), *options])
    assert result.exit_code == 0, result.output
    assert "Recommended: policy" in result.output and (tmp_path / "rep" / "report.html").is_file()
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["thresholds"]
    assert all("throughput" not in r for r in rows)
    halves = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--halves", *options])
    assert halves.exit_code == 0, halves.output
    samples = json.loads((tmp_path / "rep" / "report.json").read_text())["samples"]
    assert samples == {"calibration": 48, "evaluation": 48}
    capped = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--max-samples", "30", *options])
    assert capped.exit_code == 0, capped.output
    samples = json.loads((tmp_path / "rep" / "report.json").read_text())["samples"]
    assert samples == {"calibration": 30, "evaluation": 30}
    bad = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--split", "nope", "-q"])
    assert bad.exit_code == 2 and "splits are" in bad.output
    # Logged traffic: two replicas' /metrics answers, summed; 9 of 400 audits disagree, tolerance 1%.
    log = tmp_path / "metrics.jsonl"
    replica = {"share": 0.02, "tolerance": 0.01, "delta": 0.05, "samples_seen": 10_000, "audited": 200}
    lines = [{"requests": 10_000, "audit": {**replica, "disagreed": d}} for d in (4, 5)]
    log.write_text("\n".join(json.dumps(line) for line in lines))
    audited = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--audit", str(log), *options])
    assert audited.exit_code == 0, audited.output
    assert "WARNING: the live audit" in audited.output
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())["audit"]
    assert (summary["samples_seen"], summary["audited"], summary["disagreed"]) == (20_000, 400, 9)
    assert summary["state"] == "flagged" and summary["upper_bound"] > 0.01
    assert "Live audit of logged traffic" in (tmp_path / "rep" / "report.md").read_text()
    missing = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--audit", str(tmp_path / "none.json"), "-q"])
    assert missing.exit_code == 2 and f"--audit {tmp_path / 'none.json'}: No such file" in missing.output
    # Thresholds judged on the data that chose them promise nothing: refused unless split in halves.
    same = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--calibration-split", "test", "-q"])
    assert same.exit_code == 2 and "give another --calibration-split, or --halves" in same.output


def test_report_times_the_model_as_served(built) -> None:
    model, _ = built
    settings = ReportSettings(
        max_accuracy_drop=0.05, timing_samples=64, repeats=1, table_rows=2, compile_backend="eager"
    )
    before = model.policies
    report = build_report(model, mixed_loader(1), mixed_loader(2), settings, progress=False)
    assert model.policies == before
    timing = report.timing
    assert timing.served == "compile_for_serving (backend eager)" and timing.mainnet_compiled is not None
    assert all(
        row.speedup == pytest.approx(row.throughput / timing.baseline_timing.throughput) for row in report.thresholds
    )
    saved = report.to_dict()["timing"]
    assert saved["baseline"] == timing.baseline and saved["mainnet_compiled"]["throughput"] > 0
    assert "over the best MainNet alone" in timing.describe()
    # Served compiled: eager parts forecast nothing about it, so no forecast is shown.
    assert (
        saved["forecasts"] is None
        and timing.parts.rows == ()
        and "forecast" not in timing.speed(report.thresholds[0].threshold)
    )


def test_report_batch_size_sets_the_batches_it_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_cli import TinyTask

    class BatchedTinyTask(TinyTask):
        def loaders(self, data_dir=None, batch_size=32):
            return {name: DataLoader(ds, batch_size=batch_size) for name, ds in self._splits.items()}

    monkeypatch.setitem(cli.TASKS, "tiny", BatchedTinyTask())
    runner = CliRunner()
    out = tmp_path / "side"
    assert runner.invoke(cli.app, ["fit", "--task", "tiny", "--out", str(out), "--epochs", "1", "-q"]).exit_code == 0
    for batch_size, batches in (("16", 4), ("48", 2)):
        options = ["--out", str(tmp_path / "rep"), "--max-samples", "64", "--batch-size", batch_size, "-q"]
        result = runner.invoke(cli.app, ["report", "--sidenet", str(out), *options])
        assert result.exit_code == 0, result.output
        timing = json.loads((tmp_path / "rep" / "report.json").read_text())["timing"]
        assert (timing["samples"], timing["batches"]) == (64, batches)
    refused = runner.invoke(cli.app, ["report", "--sidenet", str(out), "--batch-size", "0"])
    assert refused.exit_code == 2


def test_headline_says_the_drop_in_words_and_the_measured_speedup(built) -> None:
    from sidenet.report_page import _headline, below

    _, report = built
    text = "\n".join(_headline(report))
    assert "Measured at the recommended threshold: " in text and "Speed-ups are of eager routing" in text
    drop = report.recommended.guaranteed.evaluation["accuracy_drop"]
    assert f"({below(drop)})" in text
    assert (below(0.002), below(-0.0005), below(0.0)) == ("0.20 pt below", "0.05 pt above", "the same")
