"""The roofline step (benchmarks/gpu_roofline.py) on the GPU benchmark's tiny --quick ResNet: its FLOPs
agree with the library's FLOP counter, each operation's time is the slower of its compute and its traffic,
the shares and ideals follow from the parts, and the BENCHMARKS.md lines render with and without a GPU run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmarks import gpu, gpu_roofline, gpu_workloads
from benchmarks.sections_gpu_cpu import roofline_lines

import sidenet


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("roofline")
    return gpu_roofline.run(gpu_roofline.options(["--quick", "--results-dir", str(folder)]))


def test_operation_time_is_the_slower_of_compute_and_traffic() -> None:
    op = gpu_roofline.Operation("Conv2d", flops=1e9, activation_bytes=1e6, weight_bytes=1e6)
    assert op.seconds(8, peak=1e12, bandwidth=1e9) == pytest.approx((8e6 + 1e6) / 1e9)  # memory-bound
    assert op.seconds(8, peak=1e12, bandwidth=1e15) == pytest.approx(8e9 / 1e12)  # compute-bound


def test_the_parts_flops_are_the_library_counters() -> None:
    # Convolutions and linear layers (what FlopCounterMode counts) of the trunk, SideNet and rest, as routing
    # cuts the MainNet, add up to the MainNet's and SideNet's counted FLOPs.
    own = gpu.options(["--quick", "--device", "cpu"])
    workload = next(w for w in gpu_workloads.workloads(own) if w.kind == "vision" and not w.channels_last)
    size = workload.image_size
    torch.manual_seed(0)
    model = sidenet.attach(workload.build().eval(), workload.tap, input_shape=(3, size, size)).eval()
    image = torch.randn(1, 3, size, size)
    parts = gpu_roofline.split_costs(model, image)

    def layers(ops: list) -> float:
        return sum(op.flops for op in ops if op.name in ("Conv2d", "Linear"))

    mainnet, _ = sidenet.count_flops(model.split.mainnet, image)
    assert layers(parts["trunk"]) + layers(parts["rest"]) == pytest.approx(mainnet, rel=1e-9)
    side, _ = sidenet.count_flops(lambda: model.sidenet(model.split.features(model.split.trunk(image))))
    trunk, _ = sidenet.count_flops(model.split.trunk, image)
    assert layers(parts["sidenet"]) == pytest.approx(side - trunk, rel=1e-9)


def test_shares_and_ideals_follow_from_the_parts(result: dict[str, Any]) -> None:
    (row,) = result["rows"]
    parts = row["parts"]
    front_ms = parts["trunk"]["roofline_ms"] + parts["sidenet"]["roofline_ms"]
    whole_ms = parts["trunk"]["roofline_ms"] + parts["rest"]["roofline_ms"]
    assert row["mainnet_roofline_ms"] == pytest.approx(whole_ms)
    assert row["front_roofline_share"] == pytest.approx(front_ms / whole_ms)
    for share, ideal in row["ideal_speedup"].items():
        assert ideal["roofline"] == pytest.approx(
            whole_ms / (front_ms + (1 - float(share)) * parts["rest"]["roofline_ms"])
        )
        assert ideal["flops"] > 1 and ideal["roofline"] > 1
    assert 0 < row["front_flops_share"] < 1 and 0 < row["front_roofline_share"] < 1


def test_benchmarks_lines_with_and_without_a_gpu_run(result: dict[str, Any], tmp_path: Path) -> None:
    assert roofline_lines(tmp_path) == []  # before the step ran
    (tmp_path / "gpu_roofline.json").write_text(json.dumps({**result, "machine": {**result["machine"], "commit": "c"}}))
    text = "\n".join(roofline_lines(tmp_path))
    assert "a roofline (computed on the CPU)" in text and "| 8 |" in text and "not measured" in text
    # A CUDA run's bfloat16 stage times of the same case fill the measured columns.
    workload = result["workload"]
    gpu_json = {
        "device_type": "cuda",
        "quick": False,
        "device": "NVIDIA H200",
        "cases": [
            {
                "workload": workload,
                "batch": 8,
                "dtype": "bfloat16",
                "stages_ms": {"stage_front": 2.0, "stage_rest": 5.0},
            }
        ],
        "rows": [{"workload": workload, "batch": 8, "dtype": "bfloat16", "mode": "main_best", "ms": 4.0}],
    }
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_json))
    text = "\n".join(roofline_lines(tmp_path))
    assert "| 50% | 1.33× |" in text and "Measured on NVIDIA H200" in text  # 2 / 4; 4 / (2 + 0.2 * 5)
    # A case measured on another card than the roofline's is not set beside it.
    (tmp_path / "gpu.json").write_text(json.dumps({**gpu_json, "device": "NVIDIA H100 80GB HBM3"}))
    assert "not measured" in "\n".join(roofline_lines(tmp_path))


def test_summary_sentence(result: dict[str, Any], tmp_path: Path) -> None:
    from benchmarks.sections_gpu_cpu import roofline_summary

    assert roofline_summary(tmp_path) == ""
    (tmp_path / "gpu_roofline.json").write_text(json.dumps(result))
    (row,) = result["rows"]
    text = roofline_summary(tmp_path)
    assert f"but {row['front_roofline_share']:.0%} of its time at batch 8" in text
    assert f"the ideal is {row['ideal_speedup']['0.8']['roofline']:.2f}×" in text
