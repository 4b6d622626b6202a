"""CUDA graphs of plain functions of tensors: :class:`CudaGraphStage` captures one at the shapes of an
example input and replays it on new inputs of those shapes, with no Python or kernel-launch cost per
operation. Used by the compiled serving mode (:mod:`sidenet.compiled`) and by benchmarks that compare
it with a MainNet captured alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["CudaGraphStage", "capture_cuda_graph", "shape_key"]


def shape_key(value: Any) -> tuple:
    """Structure, shapes and dtypes of an input or a state: what a captured graph is specific to."""
    return tuple((tuple(t.shape), t.dtype) for t in tree_leaves(value) if isinstance(t, torch.Tensor))


class CudaGraphStage:
    """``fn`` captured as a CUDA graph at the shapes of ``example``; calling it copies the inputs into
    the graph's own (static) input tensors and replays it.

    The outputs are the graph's static tensors: the next replay overwrites them, so copy what must
    outlive it. Inputs must have the example's structure, shapes, dtypes and device.
    """

    def __init__(self, fn: Callable[[Any], Any], example: Any, warmup: int = 2) -> None:
        leaves = [t for t in tree_leaves(example) if isinstance(t, torch.Tensor)]
        if not torch.cuda.is_available() or not leaves or leaves[0].device.type != "cuda":
            raise ValueError("a CUDA graph needs CUDA tensors as inputs (and a CUDA device)")
        self.inputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, example)
        # Warm-up on a side stream, as torch.cuda.graphs recommends: lazy initialisations (cuBLAS
        # handles, autotuning) must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.outputs = fn(self.inputs)

    def __call__(self, x: Any) -> Any:
        for static, given in zip(tree_leaves(self.inputs), tree_leaves(x), strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(given, non_blocking=True)
        self.graph.replay()
        return self.outputs


def capture_cuda_graph(fn: Callable[[Any], Any], example: Any) -> CudaGraphStage:
    """``fn`` (one argument: a tensor or a nesting of tensors) captured as a CUDA graph at the shapes
    of ``example``: e.g. a MainNet alone, for comparing with the served adaptive model."""
    return CudaGraphStage(fn, example)
