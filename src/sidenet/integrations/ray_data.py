"""Batch inference with per-sample routing: a ``map_batches`` callable class for Ray Data, and the same
class run in this process on a folder of images or a parquet file (no Ray needed).

Each actor (or the local run) holds one routed model and one :class:`sidenet.serving.PooledRouter`.
A Ray Data batch (``batch_size`` rows) is cut into model batches of ``model_batch`` samples; their
continuing samples are pooled across those model batches and finished together before the Ray Data
batch is returned, so rows stay in order and nothing is held across Ray Data batches. The output gains
the columns ``label``, ``class_name``, ``confidence`` (NaN where the SideNet did not run), ``exited``,
``flops`` and ``error`` (empty, or why the row could not be classified: its label is then -1).

    import ray
    from sidenet.integrations import SidenetSource, classify_dataset

    ds = ray.data.read_parquet("reviews.parquet")                       # a "text" column
    out = classify_dataset(ds, SidenetSource("sidenet-output/sst2-3"), column="text", concurrency=2)
    out.write_parquet("labelled/")
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidenet.audit import LiveAudit
from sidenet.host_memory import retain_for_cpu_model
from sidenet.integrations.inputs import BadInput, ImageInputs, SidenetSource, TextInputs, answers, compiled_on_neutral
from sidenet.integrations.options import COMPILE_BACKENDS, check_placement, placed
from sidenet.serving import PooledRouter
from sidenet.training import to_mainnet

__all__ = ["RoutedClassifier", "classify_dataset", "classify_file", "read_table", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RESULT_COLUMNS = ("label", "class_name", "confidence", "exited", "flops", "error")


def _build(model: Any) -> Any:
    if isinstance(model, SidenetSource):
        return model.load()
    if isinstance(model, torch.nn.Module):
        return model.eval()
    return model().eval()


class RoutedClassifier:
    """Callable class for ``Dataset.map_batches(..., batch_format="numpy")``: classifies ``column`` of
    each batch with per-sample routing, pooled across the batch's model batches.

    Args:
        model: a :class:`SidenetSource`, an :class:`sidenet.AdaptiveModel` or a function building one.
        inputs: how cells become samples (None: ``model.inputs()`` of a :class:`SidenetSource`).
        column: the input column (image bytes, uint8 pictures, arrays, or strings for text).
        model_batch: samples per model batch (and the rest's batch).
        max_wait: most later model batches a continuing sample waits for.
        mode: ``adaptive`` or ``main`` (the MainNet alone).
        keep_input: keep the input column in the output (dropped by default: it is the bulk of the data).
        audit_share: share of samples audited against the MainNet (see :class:`sidenet.audit.LiveAudit`).
        device: where the actor runs the model (e.g. ``"cuda"`` with ``num_gpus=1``; None: where it was loaded).
        dtype: the floating dtype it runs the model in (``float32``, ``bfloat16``, ``float16``; None: as
            loaded); batches are cast to it, confidences and the exit rule stay float32.
        channels_last: lay the MainNet's convolutions out channels-last (images only; see
            :func:`sidenet.placement.placed`); None (default): on a CUDA device for a MainNet with convolutions.
        compile_backend: route through :func:`sidenet.compile_for_serving` with this backend (``auto``,
            ``eager``, ``inductor``, ``cuda_graph``, ``inductor_cuda_graph``), compiled when the actor
            starts on a model batch of neutral samples; None (default): eager routing.
        retain_cpu_memory: on the CPU, keep the memory a batch frees for the next batch
            (:func:`sidenet.host_memory.retain_freed_cpu_memory`, process-wide).
    """

    def __init__(
        self,
        model: Any,
        inputs: ImageInputs | TextInputs | None = None,
        column: str | None = None,
        model_batch: int = 64,
        max_wait: int = 4,
        mode: str = "adaptive",
        keep_input: bool = False,
        audit_share: float = 0.0,
        device: str | None = None,
        dtype: str | None = None,
        channels_last: bool | None = None,
        compile_backend: str | None = None,
        retain_cpu_memory: bool = True,
    ) -> None:
        check_placement(device, dtype)  # before anything is loaded
        if inputs is None:
            if not isinstance(model, SidenetSource):
                raise ValueError("pass inputs= (ImageInputs or TextInputs) with a model that is not a SidenetSource")
            inputs = model.inputs()
        if mode not in ("adaptive", "main"):
            raise ValueError(f"mode must be 'adaptive' or 'main', got {mode!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {compile_backend!r}")
        self.inputs = inputs
        self.column = column or ("text" if inputs.kind == "text" else "image")
        self.model_batch = int(model_batch)
        self.mode = mode
        self.keep_input = keep_input
        self.model = placed(_build(model), device, dtype, channels_last)
        self.cpu_memory = retain_for_cpu_model(self.model, retain_cpu_memory)
        tolerance = model.tolerance() if isinstance(model, SidenetSource) else 0.01
        # Each actor draws its own audited rows (as each Serve replica does).
        self.audit = LiveAudit(audit_share, tolerance, seed=secrets.randbits(31)) if audit_share > 0 else None
        backend = compile_backend if mode == "adaptive" else None
        self.compiled = compiled_on_neutral(self.model, inputs, self.model_batch, backend)
        self.router = PooledRouter(
            self.model, rest_batch=self.model_batch, max_wait=max_wait, stages=self.compiled, audit=self.audit
        )

    def _samples(self, cells: Sequence[Any]) -> tuple[list[Any], list[int], list[str]]:
        samples, rows, errors = [], [], [""] * len(cells)
        for row, cell in enumerate(cells):
            try:
                samples.append(self.inputs.from_cell(cell))
                rows.append(row)
            except BadInput as bad:
                errors[row] = bad.message
        return samples, rows, errors

    @torch.no_grad()
    def classify(self, cells: Sequence[Any]) -> dict[str, np.ndarray]:
        """The result columns for a sequence of cells, in their order."""
        samples, rows, errors = self._samples(cells)
        chunks = [samples[i : i + self.model_batch] for i in range(0, len(samples), self.model_batch)]
        batches = [to_mainnet(self.model.split, self.inputs.collate(chunk)) for chunk in chunks]
        if self.mode == "main":
            outputs = [self.model(batch, mode="main") for batch in batches]
        else:
            outputs = [routed.output for routed in self.router.run(batches)]
        found = [answer for output in outputs for answer in answers(output, self.inputs.class_names)]
        n = len(cells)
        columns: dict[str, np.ndarray] = {
            "label": np.full(n, -1, dtype=np.int64),
            "class_name": np.full(n, "", dtype=object),
            "confidence": np.full(n, np.nan, dtype=np.float32),
            "exited": np.zeros(n, dtype=bool),
            "flops": np.zeros(n, dtype=np.float64),
            "error": np.asarray(errors, dtype=object),
        }
        for row, answer in zip(rows, found, strict=True):
            columns["label"][row] = answer["label"]
            columns["class_name"][row] = answer["class_name"]
            columns["confidence"][row] = np.nan if answer["confidence"] is None else answer["confidence"]
            columns["exited"][row] = answer["exited"]
            columns["flops"][row] = answer["flops"]
        return columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One Ray Data batch (numpy format) in, the same rows with the result columns out."""
        if self.column not in batch:
            raise KeyError(
                f"no column {self.column!r} in the dataset; columns: {', '.join(batch)} (name the one to read with "
                "--column, or column= in Python)"
            )
        kept = {k: v for k, v in batch.items() if self.keep_input or k != self.column}
        return {**kept, **self.classify(list(batch[self.column]))}


def classify_dataset(
    dataset: Any,
    model: Any,
    inputs: ImageInputs | TextInputs | None = None,
    column: str | None = None,
    *,
    concurrency: int = 1,
    batch_size: int = 1024,
    model_batch: int = 64,
    num_cpus: float | None = None,
    num_gpus: float = 0.0,
    **options: Any,
) -> Any:
    """Classify a ``ray.data.Dataset`` with an actor pool of ``concurrency`` routed models; returns the
    (lazy) dataset with the result columns. ``num_cpus`` per actor defaults to an equal share of the
    cluster's CPUs less one, which is left to the tasks that read the data (actors holding every CPU
    would starve them). ``options``: :class:`RoutedClassifier`'s ``max_wait``, ``mode``, ``keep_input``,
    ``audit_share``, ``device``, ``dtype``, ``channels_last``, ``compile_backend``, ``retain_cpu_memory``."""
    import ray
    import ray.data

    if num_cpus is None:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        num_cpus = max(0.1, min(1.0, (cpus - 1.0) / concurrency))
    return dataset.map_batches(
        RoutedClassifier,
        fn_constructor_kwargs={
            "model": model,
            "inputs": inputs,
            "column": column,
            "model_batch": model_batch,
            **options,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def read_table(path: str | Path) -> Any:
    """A folder of images (columns ``path``, ``image``: file bytes; sorted by name) or a parquet file,
    as a ``pyarrow.Table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return pa.table({"path": [str(p) for p in files], "image": [p.read_bytes() for p in files]})
    if path.suffix.lower() == ".parquet" and path.is_file():
        return pq.read_table(path)
    raise ValueError(f"{path} is neither a folder of images nor a .parquet file")


def read_dataset(path: str | Path) -> Any:
    """As :func:`read_table`, as a ``ray.data.Dataset`` (read by Ray's workers)."""
    import ray.data

    path = Path(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return ray.data.read_binary_files(files, include_paths=True).map_batches(
            lambda batch: {"path": batch["path"], "image": batch["bytes"]}, batch_format="numpy"
        )
    return ray.data.read_parquet(str(path))


def classify_file(
    source: str | Path,
    output: str | Path,
    model: Any,
    inputs: ImageInputs | TextInputs | None = None,
    column: str | None = None,
    *,
    use_ray: bool = False,
    batch_size: int = 1024,
    **options: Any,
) -> int:
    """Classify a folder of images or a parquet file into the parquet file ``output`` (one file; with
    Ray, written by the driver from the dataset's blocks, in order). Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if use_ray:
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows out as they came in
        result = classify_dataset(read_dataset(source), model, inputs, column, batch_size=batch_size, **options)
        table = pa.concat_tables([pa.Table.from_pandas(frame, preserve_index=False) for frame in _frames(result)])
    else:
        constructor = {k: v for k, v in options.items() if k not in ("concurrency", "num_cpus", "num_gpus")}
        classifier = RoutedClassifier(model, inputs, column, **constructor)
        table = read_table(source)
        parts = []
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            batch = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
            parts.append(pa.table(classifier(batch)))
        table = pa.concat_tables(parts)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, output)
    return table.num_rows


def _frames(dataset: Any) -> list[Any]:
    return [batch for batch in dataset.iter_batches(batch_format="pandas", batch_size=None)]
