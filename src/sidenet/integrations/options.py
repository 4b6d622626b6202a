"""How a Ray Serve replica of :mod:`sidenet.integrations.ray_serve` batches, routes and audits: a
plain dataclass, importable (and checked) without Ray. Where a replica or actor places its model is
:mod:`sidenet.placement`'s (re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass

from sidenet.placement import DTYPES, check_placement, placed

__all__ = ["ServeOptions", "DTYPES", "check_placement", "placed"]


COMPILE_BACKENDS = (None, "auto", "eager", "inductor", "cuda_graph", "inductor_cuda_graph")


@dataclass(frozen=True)
class ServeOptions:
    """How a replica batches, routes and audits.

    Attributes:
        max_batch_size: most requests per ``@serve.batch`` batch.
        batch_wait_timeout_s: how long a batch waits to fill.
        mode: ``adaptive`` (per-sample routing, pooled) or ``main`` (the MainNet alone, as a baseline).
        rest_batch: run the rest once this many continuing samples wait (None: ``max_batch_size``).
        max_wait: most later batches a continuing sample waits for.
        flush_after_s: run the rest on what waits when no later batch has come for this long.
        audit_share: share of samples audited against the MainNet (0: no audit).
        tolerance: the audit's tolerance (None: from the SideNet's saved threshold choice, else 0.01).
        max_request_bytes: larger bodies get 413.
        torch_threads: torch's intra-op threads in the replica (None: Ray's setting, one per CPU).
        device: where the replica runs the model (e.g. ``"cuda"`` with ``num_gpus=1``; None: where it was
            loaded, the CPU for a :class:`SidenetSource`); batches are moved there.
        dtype: the floating dtype the replica runs the model in (``float32``, ``bfloat16``, ``float16``;
            None: as loaded, float32 for a :class:`SidenetSource`); batches are cast to it, confidences and
            the exit rule stay float32.
        channels_last: lay the MainNet's convolutions out channels-last (:func:`sidenet.placement.placed`;
            images only): on a GPU the layout its tensor cores run bfloat16 and float16 convolutions in.
            None (default): on a CUDA device for a MainNet with convolutions.
        compile_backend: route through :func:`sidenet.compile_for_serving` with this backend (``auto``:
            compiled kernels in CUDA graphs on a GPU, ``torch.compile`` on the CPU; ``eager``,
            ``inductor``, ``cuda_graph``, ``inductor_cuda_graph``),
            compiled when the replica starts on neutral samples (see
            :func:`~sidenet.integrations.inputs.compiled_on_neutral`: on CUDA at the powers of two up to
            ``max_batch_size``, other sizes padded to them); None (default): eager routing.
        retain_cpu_memory: on the CPU, keep the memory a batch frees for the next batch
            (:func:`sidenet.host_memory.retain_freed_cpu_memory`, process-wide in the replica).
    """

    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    mode: str = "adaptive"
    rest_batch: int | None = None
    max_wait: int = 4
    flush_after_s: float = 0.02
    audit_share: float = 0.01
    tolerance: float | None = None
    max_request_bytes: int = 1 << 20
    torch_threads: int | None = None
    device: str | None = None
    dtype: str | None = None
    channels_last: bool | None = None
    compile_backend: str | None = None
    retain_cpu_memory: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "main"):
            raise ValueError(f"mode must be 'adaptive' or 'main', got {self.mode!r}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0 or self.flush_after_s < 0:
            raise ValueError("max_batch_size must be >= 1 and the waits >= 0")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {self.max_wait}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}")
        check_placement(self.device, self.dtype)
        if not 0 <= self.audit_share <= 1:
            raise ValueError(f"audit_share must lie in [0, 1], got {self.audit_share}")
