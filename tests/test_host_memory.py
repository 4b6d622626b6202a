"""sidenet.host_memory: freed CPU memory kept for the next batch (glibc's mallopt), the command line's
switch, and the integrations' choice. The allocator is process-wide, so its effects are checked in
child processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sidenet import host_memory
from sidenet.host_memory import (
    MMAP_THRESHOLD_MAX,
    CpuMemorySetting,
    retain_for_cpu_model,
    retain_freed_cpu_memory,
    switched_on,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A batch's worth of activations: six 4-MiB blocks alive together, every page written, then all freed.
# "start" pins glibc's starting thresholds (128 KiB; by default they then move with the blocks freed, so
# whether a block is mapped afresh depends on what else the process allocated: not reproducible), under
# which each block is a fresh mapping and the next batch faults every page in again.
FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys, torch
    from sidenet.host_memory import retain_freed_cpu_memory
    if sys.argv[1] == "retain":
        assert retain_freed_cpu_memory().applied
    else:
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)
    def batch():
        live = [torch.empty(1 << 20).fill_(1.0) for _ in range(6)]
        del live
    for _ in range(3):
        batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        batch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment, timeout=120
    )


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_retained_memory_is_reused_instead_of_faulted_in_again() -> None:
    pages = 10 * 6 * (4 << 20) // os.sysconf("SC_PAGESIZE")  # what ten batches write
    default = run_python(FAULTS, "start")
    retained = run_python(FAULTS, "retain")
    assert default.returncode == 0 and retained.returncode == 0, default.stderr + retained.stderr
    # At glibc's starting thresholds every page of every batch is a fresh one; retained, blocks are reused.
    assert int(default.stdout.split()[-1]) > pages // 2
    assert int(retained.stdout.split()[-1]) < pages // 100


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_setting_is_reported() -> None:
    code = (
        "from sidenet.host_memory import cpu_memory_setting, retain_freed_cpu_memory\n"
        "print(cpu_memory_setting().applied)\n"
        "setting = retain_freed_cpu_memory(8 << 20, 64 << 20)\n"
        "print(setting == cpu_memory_setting(), setting.mmap_threshold, setting.trim_threshold)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", str(8 << 20), str(64 << 20)]


@pytest.mark.parametrize(
    ("mmap_threshold", "trim_threshold"), [(0, 1 << 20), (MMAP_THRESHOLD_MAX + 1, 1 << 20), (1 << 20, 0)]
)
def test_bad_thresholds_are_refused(mmap_threshold: int, trim_threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        retain_freed_cpu_memory(mmap_threshold, trim_threshold)


def test_another_c_library_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    setting = retain_freed_cpu_memory()
    assert not setting.applied and "not glibc" in setting.reason


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("retain", True), (" System ", False)])
def test_the_environment_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("SIDENET_CPU_MEMORY", raising=False)
    else:
        monkeypatch.setenv("SIDENET_CPU_MEMORY", value)
    assert switched_on() is expected


def test_a_bad_switch_value_is_refused_by_the_command_line() -> None:
    refused = run_python("from sidenet.cli import main; main()", "--help", env={"SIDENET_CPU_MEMORY": "jemalloc"})
    assert refused.returncode == 2 and "SIDENET_CPU_MEMORY must be 'retain' or 'system'" in refused.stderr
    allowed = run_python("from sidenet.cli import main; main()", "--help", env={"SIDENET_CPU_MEMORY": "system"})
    assert allowed.returncode == 0 and "SideNet" in allowed.stdout


def test_integrations_retain_only_for_a_cpu_model_that_wants_it() -> None:
    off = retain_for_cpu_model(torch.nn.Linear(2, 2), wanted=False)
    assert off == CpuMemorySetting(False, reason="retain_cpu_memory=False")
    elsewhere = retain_for_cpu_model(torch.nn.Linear(2, 2, device="meta"))
    assert not elsewhere.applied and "meta" in elsewhere.reason


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_command_line_retains_memory_before_its_command_runs() -> None:
    # The command replaced by one that reports the process's setting when it runs.
    code = (
        "import sidenet.cli as cli, sidenet.host_memory as memory\n"
        "cli.app = lambda: print(memory.cpu_memory_setting().applied)\n"
        "cli.main()\n"
    )
    assert run_python(code).stdout.split() == ["True"]
    assert run_python(code, env={"SIDENET_CPU_MEMORY": "system"}).stdout.split() == ["False"]
