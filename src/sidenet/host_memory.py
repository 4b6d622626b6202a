"""Keep freed CPU memory in the process for the next batch: what a server or a long job on the CPU wants
from the C library's allocator, and does not get by default.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks by ``mmap`` (above
a threshold that starts at 128 KiB and rises, block by block, up to 32 MiB) and hands the free memory
at the top of its heap back to the system once more than a trim threshold of it is free. A
convolutional MainNet's activations are megabytes per batch, all freed when the batch ends and asked
for again by the next one; so each batch gets fresh pages from the kernel and faults every one of them
in (zero-filled) before its kernels can write them. :func:`retain_freed_cpu_memory` raises both
thresholds (``mallopt``), so that freed blocks stay in the heap and the next batch reuses them: the
process then holds on to its peak memory instead. It is what preloading jemalloc or tcmalloc gives
(PyTorch's CPU performance tuning guide recommends those), in one call and without a second library.

Measured by ``python -m benchmarks.cpu_memory`` (see BENCHMARKS.md, "CPU memory"): convolutional
MainNets gain most (2.4x for the eager Fashion-MNIST ResNet-20 on the benchmarks' 2-core machine), text
encoders little (1.04x for MiniLM); how much depends on what a page fault costs on the machine.

The ``sidenet`` command line calls it at start (``SIDENET_CPU_MEMORY=system`` turns that off), as do
the Ray Serve replicas and Ray Data actors that run on the CPU (``retain_cpu_memory=False`` turns it
off); importing sidenet changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import asdict, dataclass

import torch

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above 32 MiB on 64-bit machines (HEAP_MAX_SIZE / 2): larger blocks
# are always mapped and unmapped, whatever is set.
MMAP_THRESHOLD_MAX = 32 << 20
DEFAULT_TRIM_THRESHOLD = 1 << 30
ENVIRONMENT_SWITCH = "SIDENET_CPU_MEMORY"


@dataclass(frozen=True)
class CpuMemorySetting:
    """What :func:`retain_freed_cpu_memory` did: whether the thresholds were set, to what, and why not."""

    applied: bool
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_current = CpuMemorySetting(False, reason="the C library's defaults (not changed by sidenet)")


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None where the C library is another (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def retain_freed_cpu_memory(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> CpuMemorySetting:
    """Have glibc keep freed blocks for reuse: blocks up to ``mmap_threshold`` bytes come from the heap
    (not fresh mappings), and free heap memory goes back to the system only beyond ``trim_threshold``
    bytes. Process-wide and idempotent; returns what was done (nothing, with the reason, where the C
    library is not glibc or refuses a value).

    The cost is memory: the process keeps what it freed, up to its peak plus ``trim_threshold``."""
    global _current
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}] bytes, got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be positive, got {trim_threshold}")
    libc = _glibc()
    if libc is None:
        return CpuMemorySetting(False, reason=f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})")
    # mallopt returns 1 on success and 0 where it refuses the value.
    if not (libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)):
        return CpuMemorySetting(False, reason="glibc's mallopt refused the thresholds")
    _current = CpuMemorySetting(True, mmap_threshold, trim_threshold, "set by sidenet.host_memory")
    return _current


def switched_on() -> bool:
    """Whether the environment asks for freed CPU memory to be retained: ``SIDENET_CPU_MEMORY`` unset
    or ``retain`` (yes), ``system`` (no: the C library's defaults); any other value is refused."""
    choice = os.environ.get(ENVIRONMENT_SWITCH, "retain").strip().lower()
    if choice not in ("retain", "system"):
        raise ValueError(f"{ENVIRONMENT_SWITCH} must be 'retain' or 'system', got {choice!r}")
    return choice == "retain"


def retain_unless_switched_off() -> CpuMemorySetting:
    """:func:`retain_freed_cpu_memory` unless ``SIDENET_CPU_MEMORY=system`` (:func:`switched_on`): what
    the command line runs at start."""
    if not switched_on():
        return CpuMemorySetting(False, reason=f"{ENVIRONMENT_SWITCH}=system")
    return retain_freed_cpu_memory()


def retain_for_cpu_model(model: object, wanted: bool = True) -> CpuMemorySetting:
    """:func:`retain_freed_cpu_memory` for a replica or actor about to serve ``model`` (a module), when
    ``wanted`` and the model's parameters live on the CPU (a GPU's activations do not come from
    ``malloc``): what the Ray integrations call."""
    if not wanted:
        return CpuMemorySetting(False, reason="retain_cpu_memory=False")
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if first is not None and first.device.type != "cpu":
        return CpuMemorySetting(False, reason=f"the model is on {first.device}")
    return retain_freed_cpu_memory()


def cpu_memory_setting() -> CpuMemorySetting:
    """The allocator setting sidenet last applied in this process (the C library's defaults if none)."""
    return _current
