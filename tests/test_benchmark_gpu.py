"""The GPU benchmark (benchmarks/gpu.py) in its CPU ``--quick`` mode: the JSON's schema and invariants
(speed-ups consistent with the times, the best MainNet the fastest MainNet row, exit shares near their
targets), thresholds strictly between samples, the synthetic text fallback, the script entry point,
and the BENCHMARKS.md section it feeds. No timing target is checked here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmarks import gpu, gpu_case, gpu_runners, gpu_workloads
from benchmarks.sections_gpu import SERVED, VARIANTS, gpu_section, gpu_summary

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"workload", "batch", "dtype", "exit_share", "target_exit_share", "mode", "ms"}
ROW_KEYS |= {"speedup_vs_main_eager", "speedup_vs_main_best"}
ROUTED = {"minimal_router", "sidenet_eager", "sidenet_compiled", "sidenet_compiled_stream", "pooled_router", "ideal"}
ROUTED |= {"sidenet_compiled_static", "sidenet_compiled_static_stream", "pooled_router_static"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    result = gpu.run(gpu.options(["--quick", "--static-rest", "--channels-last", "--out", str(out)]))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))  # what was returned is what was written
    return written


def test_quick_run_writes_every_case_and_row(quick: dict[str, Any]) -> None:
    assert quick["complete"] and quick["quick"] and quick["device_type"] == "cpu"
    assert quick["torch"] == torch.__version__ and quick["device"]
    assert quick["text"]["source"] in ("SST-2 dev sentences", "synthetic")
    cases = {(c["workload"], c["batch"], c["dtype"]) for c in quick["cases"]}
    assert cases == {(w, 8, d) for w in ("resnet", "bert", "resnet_cl") for d in ("bfloat16", "float32")}
    # --channels-last: the image workload again with its MainNet and images channels-last, which reach the rest so.
    layouts = {c["workload"]: c.get("tap_layout") for c in quick["cases"]}
    assert layouts == {"resnet": "contiguous", "bert": None, "resnet_cl": "channels_last"}
    assert quick["workloads"]["resnet_cl"].endswith(", channels-last")
    for row in quick["rows"]:
        assert set(row) >= ROW_KEYS, row
        assert row["ms"] > 0 and math.isfinite(row["ms"])
    modes = {row["mode"] for row in quick["rows"]}
    assert {"main_eager", "main_compile_default", "main_best"} | ROUTED <= modes
    for case in quick["cases"]:
        # CUDA-only rows are skipped on the CPU, with the reason.
        assert "CUDA" in case["skipped"]["main_cuda_graph"]
        static = case["workload"] == "resnet"
        stages = set(gpu_case.STAGES) - (set() if static else {"stage_rest_static"})
        assert case["stage_basis"] == "eager" and set(case["stages_ms"]) == stages
        # --static-rest: the image MainNet's rest compiled per row bucket (eager here: the quick run's); not
        # for text nor channels-last, the other way to the layout a per-bucket graph gets.
        if not static:
            assert "sidenet_compiled_static" not in case["serving_backends"]
        else:
            assert case["serving_backends"]["sidenet_compiled_static"] == {"front": "eager", "rest": "eager"}


def test_speedups_agree_with_times_and_best_is_the_fastest_mainnet(quick: dict[str, Any]) -> None:
    for case in quick["cases"]:
        key = (case["workload"], case["batch"], case["dtype"])
        rows = [r for r in quick["rows"] if (r["workload"], r["batch"], r["dtype"]) == key]
        main = {r["mode"]: r for r in rows if r["mode"] in gpu_case.MAIN_MODES}
        best = next(r for r in rows if r["mode"] == "main_best")
        assert best["ms"] == min(r["ms"] for r in main.values())
        assert best["ms"] == main[best["best_of"]]["ms"]
        for row in rows:
            assert row["speedup_vs_main_eager"] == pytest.approx(main["main_eager"]["ms"] / row["ms"])
            assert row["speedup_vs_main_best"] == pytest.approx(best["ms"] / row["ms"])
            assert row["speedup_vs_main_best"] <= row["speedup_vs_main_eager"] + 1e-12
            # MainNet rows carry no exit share; routed rows the realised one, near their target.
            assert (row["exit_share"] is None) == (row["mode"] in main or row["mode"] == "main_best")
            if row["exit_share"] is not None:
                assert abs(row["exit_share"] - row["target_exit_share"]) <= 0.1


def test_ideal_row_is_front_plus_continuing_share_of_rest(quick: dict[str, Any]) -> None:
    for case in quick["cases"]:
        stages = case["stages_ms"]
        ideal = [
            r
            for r in quick["rows"]
            if r["mode"] == "ideal" and (r["workload"], r["batch"], r["dtype"]) == (case["workload"], 8, case["dtype"])
        ]
        assert len(ideal) == 2
        for row in ideal:
            assert row["ms"] == pytest.approx(stages["stage_front"] + (1 - row["exit_share"]) * stages["stage_rest"])


def test_threshold_lies_strictly_between_samples_at_the_share() -> None:
    scores = torch.linspace(0.5, 0.99, 100)
    for share in (0.5, 0.8, 0.05, 1.0):
        t = gpu_runners.threshold_for_share(scores, share)
        assert not bool((scores == t).any())
        assert int((scores >= t).sum()) == round(share * 100)
    assert gpu_runners.threshold_for_share(scores, 0.0) == math.inf
    # ties: the nearest gap between distinct values is taken, the share moves to the nearest reachable one
    tied = torch.tensor([0.6] * 6 + [0.7] * 4)
    t = gpu_runners.threshold_for_share(tied, 0.5)
    assert 0.6 < t < 0.7 and int((tied >= t).sum()) == 4
    # two adjacent float32 values leave no float32 strictly between them: another gap is used
    a = torch.tensor(0.75, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(1.0))
    close = torch.stack([torch.tensor(0.6), a, b, torch.tensor(0.9)])
    t = gpu_runners.threshold_for_share(close, 0.5)
    assert int((close >= t).sum()) in (1, 3)


def test_synthetic_text_follows_the_sst2_length_histogram(tmp_path: Path) -> None:
    lengths = gpu_workloads.synthetic_lengths(872)
    assert sorted(lengths) == sorted(k for k, n in gpu_workloads.SST2_DEV_TOKEN_LENGTHS.items() for _ in range(n))
    batches = gpu_workloads.synthetic_text_batches(lengths[:20], 8)
    assert len(batches) == 2  # the 4 left over do not fill a batch
    for batch, chunk in zip(batches, (lengths[:8], lengths[8:16]), strict=True):
        assert batch["input_ids"].shape == (8, max(chunk))
        assert batch["attention_mask"].sum(1).tolist() == chunk
        assert bool((batch["input_ids"][:, 0] == 101).all())
    args = gpu.options(["--quick", "--sst2-data", str(tmp_path)])  # an empty folder: no dev.tsv
    sentences, tokenizer, described = gpu_workloads.text_source(args)
    assert sentences is None and tokenizer is None
    assert described["source"] == "synthetic" and "not found" in described["why"]
    padded = gpu_workloads.pad_text(batches[0], gpu_workloads.bucket_length(batches[0]["input_ids"].shape[1]))
    assert padded["input_ids"].shape[1] in gpu_workloads.LENGTH_BUCKETS
    assert torch.equal(padded["attention_mask"].sum(1), batches[0]["attention_mask"].sum(1))


def test_runs_as_a_script_with_only_src_on_the_path() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--budget-s" in done.stdout


# What the GPU image may lack: the device tool's list of 2026-11-17 has some of these (scipy, matplotlib, typer,
# hypothesis), an image may change, and the CUDA tests need none of them (benchmarks/gpu_check.sh carries pytest).
ABSENT_ON_THE_GPU_IMAGE = ("scipy", "matplotlib", "typer", "ray", "yaml", "pyarrow", "rich", "hypothesis")
BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError("absent on the GPU image: " + name)
sys.meta_path.insert(0, Absent())
for module in {modules!r}:
    __import__(module)
"""


def test_the_cuda_test_modules_import_without_what_the_gpu_image_lacks() -> None:
    """benchmarks/gpu_check.sh runs these modules' CUDA tests on an image without the project's environment: a
    module that fails to import there loses its CUDA tests."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    modules = sorted({Path(word).stem for word in script.split() if word.startswith("tests/test_")})
    assert {"test_compiled", "test_compiled_cascade", "test_host_waits", "test_precision"} <= set(modules)
    code = BLOCKER.format(absent=ABSENT_ON_THE_GPU_IMAGE, modules=modules)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_section_says_not_measured_until_a_cuda_run(quick: dict[str, Any], tmp_path: Path) -> None:
    assert any("not measured yet" in line for line in gpu_section(tmp_path))
    (tmp_path / "gpu.json").write_text(json.dumps(quick))
    text = "\n".join(gpu_section(tmp_path))
    assert "not measured yet" in text and "| 8 | bfloat16 |" in text
    assert gpu_summary(tmp_path) == []  # the summary names GPU figures only
    # The same rows as if measured on CUDA at a target's batch: the section turns to figures and targets.
    measured = {**quick, "device_type": "cuda", "quick": False}
    for key in ("rows", "cases"):
        measured[key] = [
            {**item, "workload": item["workload"].replace("resnet", "resnet50"), "batch": 64} for item in quick[key]
        ]
    measured["workloads"] = {name.replace("resnet", "resnet50"): text for name, text in quick["workloads"].items()}
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    text = "\n".join(gpu_section(tmp_path))
    assert "not measured yet" not in text
    assert "resnet50, batch 64, bf16, exit 0.8:" in text and "minimal router's time" in text
    assert "operations per batch:" in text
    # The quick run's --static-rest rows get their columns, and the split-cost note no longer asks for them.
    assert "PooledRouter, rest per bucket" in text and "rest_shapes" in text and "not measured yet" not in text
    # The quick run compiles with default only, in every case; passes are read per case.
    assert (
        "modes tried: default in every case (**not: reduce-overhead (in no case); max-autotune (in no case)**)" in text
    )
    assert "2 timed passes per row after 1 warm-up passes" in text
    # A target takes the fastest served row of either layout over the faster best MainNet alone of the two.
    bf16 = [r for r in measured["rows"] if r["dtype"] == "bfloat16" and r["workload"] in ("resnet50", "resnet50_cl")]
    main = min(r["ms"] for r in bf16 if r["mode"] == "main_best")
    served = min(
        (r for r in bf16 if r["target_exit_share"] == 0.8 and r["mode"] in (*SERVED, *VARIANTS)), key=lambda r: r["ms"]
    )
    layout = ", channels-last" if served["workload"] == "resnet50_cl" else ""
    assert f"resnet50, batch 64, bf16, exit 0.8: {main / served['ms']:.2f}× over the best MainNet alone" in text
    assert f"({served['mode']}{layout}; MainNet " in text
    assert "tap layer1 (quick), channels-last\n" in text  # the channels-last workload's own table
    assert "Two ways around it" in text and "Not measured yet: the rest per bucket" not in text
    summary = "\n".join(gpu_summary(tmp_path))
    assert f"resnet50 batch 64 **{main / served['ms']:.2f}×**{layout}" in summary
    assert "served stages together take" in summary and "× channels-last" in summary
    # Without the channels-last rows, the section says they are not measured and how to measure them.
    for key in ("rows", "cases"):
        measured[key] = [item for item in measured[key] if not item["workload"].endswith("_cl")]
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    text = "\n".join(gpu_section(tmp_path))
    assert "Not measured yet: the channels-last MainNet; on a CUDA machine" in text and "--channels-last" in text


def test_operations_per_batch_of_the_eager_runners(quick: dict[str, Any]) -> None:
    for case in quick["cases"]:
        counted = case["operations_per_batch"]
        assert set(counted) == {
            "main_eager",
            "minimal_router@0.5",
            "minimal_router@0.8",
            "sidenet_eager@0.5",
            "sidenet_eager@0.8",
        }
        # Routing adds the SideNet and its own few operations to what the MainNet issues; fewer rows
        # continue at exit share 0.8 than at 0.5, not fewer operations.
        assert all(value > counted["main_eager"] / 2 for value in counted.values()), counted
        assert counted["sidenet_eager@0.8"] <= counted["minimal_router@0.8"] * 1.25, counted


def test_merge_keeps_the_cases_not_measured_again(quick: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(quick))
    kept = gpu.merged_cases(path, {("bert", 8, "bfloat16"), ("bert", 8, "float32")})
    assert kept is not None and {c["workload"] for c in kept["cases"]} == {"resnet", "resnet_cl"}
    assert kept["rows"] and {r["workload"] for r in kept["rows"]} == {"resnet", "resnet_cl"}
    assert kept["commands"] == [quick["command"]]
    assert {c["passes"]["timed"] for c in kept["cases"]} == {quick["settings"]["repeats"]}
    # A JSON from before cases recorded their passes: its cases take its own run's settings.
    legacy = {**quick, "cases": [{k: v for k, v in c.items() if k != "passes"} for c in quick["cases"]]}
    legacy["settings"] = {**quick["settings"], "repeats": 5}
    path.write_text(json.dumps(legacy))
    kept = gpu.merged_cases(path, set())
    assert kept is not None and {c["passes"]["timed"] for c in kept["cases"]} == {5}
    assert gpu.merged_cases(tmp_path / "absent.json", set()) is None


def test_operations_per_routed_batch_of_the_gpu_workloads(tmp_path: Path) -> None:
    from benchmarks import gpu_operations
    from benchmarks.sections_gpu import operations_lines

    args = gpu_operations.options(["--quick", "--results-dir", str(tmp_path)])
    result = gpu_operations.run(args)
    keys = {(r["workload"], r["dtype"], r["target_exit_share"]) for r in result["rows"]}
    assert keys == {(w, d, s) for w in ("resnet", "bert") for d in ("float32", "bfloat16") for s in (0.5, 0.8)}
    for row in result["rows"]:
        difference = sum(row["more_than_minimal"].values()) - sum(row["fewer_than_minimal"].values())
        assert row["sidenet_eager"] - row["minimal_router"] == pytest.approx(difference)
        assert row["mainnet"] > 0 and row["sidenet_eager"] > row["mainnet"] / 2
        # The per-sample FLOPs and exit stages are computed when read: a routed batch issues neither.
        assert not {"full", "where"} & set(row["more_than_minimal"]), row
    (tmp_path / "gpu_operations.json").write_text(json.dumps(result))
    text = "\n".join(operations_lines(tmp_path))
    assert "| resnet | 8 | float32 |" in text and "Tensor operations per routed batch" in text
    assert "not measured yet" in "\n".join(gpu_section(tmp_path))  # no gpu.json: still says so, counts below


def test_merged_runs_say_per_case_which_modes_and_passes_they_took() -> None:
    from benchmarks.sections_gpu import _modes_tried, _passes

    rows = [
        {"workload": "resnet50", "batch": 64, "dtype": "bfloat16", "mode": "main_compile_reduce-overhead"},
        {"workload": "resnet50", "batch": 64, "dtype": "bfloat16", "mode": "main_compile_max-autotune"},
        {"workload": "bert_base", "batch": 32, "dtype": "bfloat16", "mode": "main_compile_reduce-overhead"},
        {"workload": "bert_base", "batch": 32, "dtype": "bfloat16", "mode": "main_eager"},
    ]
    assert _modes_tried(rows) == (
        "; `torch.compile` modes tried: reduce-overhead in every case (**not: default (in no case); "
        "max-autotune (in resnet50 64 bfloat16 only)**)"
    )
    r = {"settings": {"repeats": 9, "warmup": 2}, "cases": [{"passes": {"timed": 5, "warmup": 2}}, {}]}
    assert _passes(r) == "5–9 timed passes per row after 2 warm-up passes"  # the second case: the settings'


def test_profile_stages_records_where_each_stage_spends_its_time(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    args = ["--quick", "--workloads", "resnet", "--dtypes", "float32", "--profile-stages", "--profile-rows", "5"]
    result = gpu.run(gpu.options([*args, "--out", str(out)]))
    (case,) = result["cases"]
    assert {"stage_front", "stage_rest", "main_compile_default"} <= set(case["profile"])
    for profiled in case["profile"].values():
        assert profiled["clock"] == "cpu" and profiled["own_ms_total"] > 0 and len(profiled["top"]) == 5
        own = [row["own_ms"] for row in profiled["top"]]
        assert own == sorted(own, reverse=True) and all(row["calls"] >= 1 and row["name"] for row in profiled["top"])
    # The front's convolutions are among its costliest operations (the trunk is convolutions).
    assert any("convolution" in row["name"] for row in case["profile"]["stage_front"]["top"])


def test_gpu_check_skips_the_tests_on_a_second_call(tmp_path: Path) -> None:
    """``GPU_TESTS=0 bash benchmarks/gpu_check.sh`` (a second call on the same warm device): the benchmark
    only, here its quick rehearsal of one small case."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "GPU_TESTS": "0",
        "GPU_BENCH_ARGS": "--workloads resnet --dtypes float32 --exit-shares 0.5",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this interpreter
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "cuda-tests.txt").exists()
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert {(c["workload"], c["dtype"]) for c in written["cases"]} == {("resnet", "float32")}


def test_merged_runs_on_two_cards_say_which_card_each_figure_is_from(quick: dict[str, Any], tmp_path: Path) -> None:
    measured = {**quick, "device_type": "cuda", "quick": False, "device": "Card B"}
    renamed = {"resnet": "resnet50", "resnet_cl": "resnet50_cl", "bert": "bert_base"}
    batch = {"resnet50": 64, "resnet50_cl": 64, "bert_base": 32}
    for key in ("rows", "cases"):
        measured[key] = [
            {**item, "workload": renamed[item["workload"]], "batch": batch[renamed[item["workload"]]]}
            for item in quick[key]
        ]
    for case in measured["cases"]:  # the BERT cases kept from an earlier run on another card
        case["device"] = "Card A" if case["workload"] == "bert_base" else "Card B"
    measured["workloads"] = {renamed[name]: text for name, text in quick["workloads"].items()}
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    summary = "\n".join(gpu_summary(tmp_path))
    assert "**GPU (Card B and Card A," in summary or "**GPU (Card A and Card B," in summary
    assert "resnet50 batch 64 **" in summary and "(Card B)" in summary and "bert_base batch 32 **" in summary
    assert "(Card A)" in summary
    section = "\n".join(gpu_section(tmp_path))
    assert "Cards (runs merged): " in section and "Card A: bert_base 32 bfloat16" in section
    # One card: no card named per figure.
    for case in measured["cases"]:
        case["device"] = "Card B"
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    assert "(Card B)" not in "\n".join(gpu_summary(tmp_path))
    assert "Cards (runs merged)" not in "\n".join(gpu_section(tmp_path))


def test_merge_keeps_the_card_of_earlier_cases(quick: dict[str, Any], tmp_path: Path) -> None:
    earlier = {
        **quick,
        "device": "Card A",
        "cases": [{k: v for k, v in c.items() if k != "device"} for c in quick["cases"]],
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(earlier))
    kept = gpu.merged_cases(path, {("resnet", 8, "float32")})
    assert kept is not None and {c["device"] for c in kept["cases"]} == {"Card A"}
    assert ("resnet", 8, "float32") not in {(c["workload"], c["batch"], c["dtype"]) for c in kept["cases"]}
    assert all(c["device"] for c in quick["cases"])  # a run records its card per case


def test_merge_keeps_an_earlier_case_the_budget_skips(tmp_path: Path) -> None:
    """``--merge``: an earlier case gives way only to the same case measured anew; one the budget skips keeps
    the earlier run's figures (and says so), where it used to vanish from the merged JSON."""
    out = tmp_path / "gpu.json"
    base = ["--quick", "--workloads", "resnet", "--dtypes", "float32", "--exit-shares", "0.5", "--out", str(out)]
    first = gpu.run(gpu.options(base))
    (case,) = first["cases"]
    starved = gpu.run(gpu.options([*base, "--merge", "--budget-s", "0"]))
    assert starved["cases"] == [case] and starved["rows"] == first["rows"]
    assert starved["skipped"][0]["kept"] == "the earlier run's case" and not starved["complete"]
    again = gpu.run(gpu.options([*base, "--merge"]))
    assert len(again["cases"]) == 1 and not again["skipped"]  # measured anew: replaced, not doubled
    assert len(again["rows"]) == len(first["rows"]) and again["complete"]


def test_split_cost_paragraph_reads_the_bfloat16_cases(quick: dict[str, Any]) -> None:
    """Both ways around the split cost measured: the paragraph's figures are the bfloat16 cases' over their
    bfloat16 best MainNet alone, though float32 rows of the same workloads and batches come after them."""
    from benchmarks.sections_gpu_split import split_cost_paragraph

    renamed = {"resnet": "resnet50", "resnet_cl": "resnet50_cl", "bert": "bert_base"}
    measured = {**quick, "device_type": "cuda", "quick": False}
    for key in ("rows", "cases"):
        measured[key] = [{**item, "workload": renamed[item["workload"]]} for item in quick[key]]
    dtypes = [row["dtype"] for row in measured["rows"] if row["workload"] == "resnet50"]
    assert dtypes.index("float32") > dtypes.index("bfloat16")  # float32 rows last: the order that misled
    case = next(c for c in measured["cases"] if (c["workload"], c["dtype"]) == ("resnet50", "bfloat16"))
    main = next(
        row["ms"]
        for row in measured["rows"]
        if (row["workload"], row["batch"], row["dtype"], row["mode"])
        == ("resnet50", case["batch"], "bfloat16", "main_best")
    )
    stages = case["stages_ms"]
    text = split_cost_paragraph(measured)
    assert f"front + rest {(stages['stage_front'] + stages['stage_rest']) / main:.2f}× the best MainNet" in text


def test_serving_autotune_rows_and_the_batches_chosen(tmp_path: Path) -> None:
    """``--serving-autotune``: the serving mode again with ``autotune=True`` (its rows, pipelined and pooled,
    compile time and stage backends beside the default's; in the section's table); ``--batches`` runs only
    the workloads' batches named."""
    out = tmp_path / "gpu.json"
    base = ["--quick", "--workloads", "resnet", "--dtypes", "float32", "--exit-shares", "0.8", "--out", str(out)]
    tuned = gpu.run(gpu.options([*base, "--serving-backend", "inductor", "--serving-autotune", "--batches", "8"]))
    (case,) = tuned["cases"]
    assert case["batch"] == 8 and tuned["settings"]["serving_autotune"]
    assert case["compile_s"]["sidenet_compiled_autotune"] > 0
    assert set(case["serving_backends"]["sidenet_compiled_autotune"].values()) <= {"inductor", "eager"}
    modes = {row["mode"] for row in tuned["rows"]}
    assert {"sidenet_compiled_autotune", "sidenet_compiled_autotune_stream", "pooled_router_autotune"} <= modes
    out.write_text(json.dumps({**tuned, "device_type": "cuda", "quick": False}))  # rendered as a GPU run's
    section = "\n".join(gpu_section(tmp_path))
    assert "| PooledRouter, autotuned |" in section and "| serving mode, autotuned |" in section
    none = gpu.run(gpu.options([*base, "--batches", "16"]))  # the quick workload serves batch 8 only
    assert none["cases"] == [] and none["rows"] == [] and none["complete"]
