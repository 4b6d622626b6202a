"""The CPU memory benchmark (benchmarks/cpu_memory.py) without its child processes: the exit share its
thresholds give, the command a child gets, and the summary and BENCHMARKS.md section of its rounds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmarks import cpu_memory
from benchmarks.sections_cpu_memory import cpu_memory_section

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images


def test_the_threshold_lets_the_asked_share_exit_without_touching_a_confidence() -> None:
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    batches = [make_images(20, seed=s) for s in range(3)]
    share = cpu_memory.at_exit_share(model, batches)
    assert abs(share - 0.8) <= 1 / 60
    confidence = torch.cat([model(b, mode="side").confidence for b in batches]).double()
    assert not torch.isclose(confidence, torch.tensor(model.threshold, dtype=torch.float64), rtol=0, atol=1e-9).any()


def test_a_child_gets_the_parents_options() -> None:
    parent = cpu_memory.options(["--repeats", "3", "--image-batches", "5", "--workloads", "fmnist"])
    command = cpu_memory.child_command(parent, "retain", Path("out.json"))
    assert command[1:3] == ["-m", "benchmarks.cpu_memory"]
    child = cpu_memory.options(command[3:])
    assert (child.child, child.child_out) == ("retain", Path("out.json"))
    for name in ("repeats", "image_batches", "text_batches", "workloads", "sst2_data"):
        assert getattr(child, name) == getattr(parent, name), name


def child_result(ms: dict[str, float], faults: float) -> dict:
    rows = {k: {"ms_per_batch": v, "page_faults_per_batch": faults} for k, v in ms.items()}
    return {"setting": {}, "workloads": {"fmnist": {"exit_share": 0.8, "batches": 4, "rows": rows}}}


def rounds() -> list[dict]:
    """Two rounds: the default setting slower on the eager rows, with page faults; retained, none."""
    return [
        {
            "system": child_result({"mainnet": 30.0, "mainnet_compiled": 15.0, "sidenet_eager": 14.0}, 900 + i),
            "retain": child_result({"mainnet": 15.0 + i, "mainnet_compiled": 12.0, "sidenet_eager": 8.0}, 0),
        }
        for i in range(2)
    ]


def test_the_summary_compares_settings_and_routes_within_each() -> None:
    found = cpu_memory.summary(rounds())["fmnist"]
    rows = found["rows"]
    assert rows["mainnet"]["retain"]["ms_per_batch"] == 15.5  # the median of the rounds' 15 and 16
    assert rows["mainnet"]["retain"]["ms_range"] == [15.0, 16.0]
    assert rows["mainnet"]["system"]["page_faults_per_batch"] == 900.5
    assert rows["mainnet"]["retained_speedup"] == 30.0 / 15.5
    within = found["within_setting"]
    assert (
        within["system"]["best_mainnet"] == "mainnet_compiled"
        and within["retain"]["best_mainnet"] == "mainnet_compiled"
    )
    assert within["system"]["over_best_mainnet"] == {"sidenet_eager": 15.0 / 14.0}
    assert within["retain"]["over_mainnet_eager"] == {"sidenet_eager": 15.5 / 8.0}
    assert found["fastest_retained"] == "sidenet_eager"
    assert found["fastest_retained_over_default_best_mainnet"] == 15.0 / 8.0


def test_the_section_shows_every_row_of_both_settings() -> None:
    result = {
        "command": "python -m benchmarks.cpu_memory",
        "machine": {"date": "today", "cpu": "cpu", "cores": 2, "torch": "2", "commit": "abc"},
        "settings": {
            "system": {"applied": False, "mmap_threshold": None, "trim_threshold": None, "reason": ""},
            "retain": {"applied": True, "mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "reason": ""},
        },
        "repeats": 7,
        "memory_mib": {
            "system": {"peak_rss_mib": 1000.4, "final_rss_mib": 980.0},
            "retain": {"peak_rss_mib": 1012.6, "final_rss_mib": 1013.0},
        },
        "rounds": rounds(),
        "workloads": cpu_memory.summary(rounds()),
    }
    text = "\n".join(cpu_memory_section(result))
    assert "32 MiB" in text and "1024 MiB" in text
    assert "| MainNet eager | 30.00 | 900 [900–901] | 15.50 [15.00–16.00] | 0 | 1.94× |" in text
    assert "sidenet eager 1.07×" in text  # default: over the compiled MainNet, 15 / 14
    assert "peak resident memory 1,000 MiB with the defaults, 1,013 MiB retained; at its end 980 and 1,013 MiB" in text


def test_benchmarks_md_says_which_results_were_timed_with_retained_memory(tmp_path: Path) -> None:
    from benchmarks.report import memory_note

    def write(name: str, machine: dict) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps({"machine": {"cpu": "cpu", **machine}}))

    write("old", {})
    write("cpu_memory", {"cpu_memory": "default"})  # times both settings itself: not listed
    assert memory_note(tmp_path) == []  # nothing retained yet: no note
    write("new", {"cpu_memory": "retained"})
    (note,) = memory_note(tmp_path)
    assert note.endswith("): new; with glibc's defaults, before it existed: old.")
