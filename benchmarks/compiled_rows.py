"""The compiled serving mode's rows in the CPU workload steps (issue 13): each routed model served by
``compile_for_serving`` as a timing runner over ``(key, batch)`` items, beside the MainNet compiled alone,
and the speed-ups over the best MainNet alone (the faster of eager and ``torch.compile``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import sidenet
from sidenet.compiled import compile_for_serving


def served_runner(
    models: Mapping[int, sidenet.AdaptiveModel | None],
    examples: Mapping[int, Any],
    backend: str,
    fallback: Callable[[Any], Any],
) -> tuple[Callable[[tuple[int, Any]], Any], dict[str, Any]]:
    """A runner answering item ``(key, batch)`` with ``models[key]`` in the compiled serving mode (compiled
    on ``examples[key]``; ``fallback(batch)`` where the model is None), and what was compiled: the backend,
    the backend kept per stage and the compile seconds."""
    started = time.perf_counter()
    served = {
        key: compile_for_serving(model, examples[key], backend=backend) if model is not None else None
        for key, model in models.items()
    }
    seconds = time.perf_counter() - started

    def run(item: tuple[int, Any]) -> Any:
        model = served[item[0]]
        return model(item[1]).logits if model is not None else fallback(item[1])

    kept = [dict(model.stage_backends) if model is not None else None for model in served.values()]
    return run, {"backend": backend, "stage_backends": kept, "compile_seconds": seconds}


def compiled_text_mainnet(mainnet: torch.nn.Module, example: dict, backend: str) -> tuple[Callable, float]:
    """A Hugging Face MainNet compiled alone (``torch.compile`` with ``backend``) as a runner over
    ``(key, batch)`` items, and the seconds of its first call on ``example`` (the compilation)."""
    compiled = torch.compile(mainnet, backend=backend)
    started = time.perf_counter()
    with torch.inference_mode():  # the mode measure_throughput runs in: no recompilation there
        compiled(**example)
    return (lambda item: compiled(**item[1]).logits), time.perf_counter() - started


def over_best_mainnet(timing: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The best MainNet alone of a timing run (the faster of ``mainnet`` and, where timed,
    ``mainnet_compiled``) and the throughput over it of each of ``keys`` (default: every runner)."""
    best = max((k for k in ("mainnet", "mainnet_compiled") if k in timing), key=lambda k: timing[k]["throughput"])
    return {
        "best_mainnet": best,
        "speedup_over_best_mainnet": {
            k: timing[k]["throughput"] / timing[best]["throughput"] for k in (timing if keys is None else keys)
        },
    }
