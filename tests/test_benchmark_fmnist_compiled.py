"""The Fashion-MNIST step's compiled serving rows (benchmarks/fmnist_resnet.py ``compiled_comparison``) on
a tiny MainNet: every runner is timed, the pooled runner answers as the model does, and the section
renders its rows (and older results, which lack the later rows)."""

from __future__ import annotations

import argparse

import torch
from benchmarks import fmnist_resnet
from benchmarks.sections_compiled_cpu import fmnist_compiled_lines

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between

RUNNERS = {
    "mainnet",
    "mainnet_compiled",
    "adaptive",
    "minimal_router",
    "compiled_serving",
    "compiled_stream",
    "compiled_pooled",
    "compiled_front",
}


def test_every_compiled_row_is_timed_and_rendered() -> None:
    mainnet = build_tiny_mainnet()
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    images = make_images(192, seed=4)
    model.threshold = threshold_between(model(images, mode="side").confidence, 0.5)
    args = argparse.Namespace(serving_backend="eager", repeats=1, compile_backend="eager")
    compiled = fmnist_resnet.compiled_comparison(model, mainnet, mainnet, images, args)
    assert set(compiled["timing"]) == RUNNERS
    assert compiled["best_compiled"] in {"compiled_serving", "compiled_stream", "compiled_pooled"}
    # The pooled router over the compiled stages answers every image as the routed model does.
    router = sidenet.compile_for_serving(model, images[:64], backend="eager").pooled_router(rest_batch=64, max_wait=16)
    pooled = torch.cat([routed.output.logits for routed in router.run(list(images.split(64)))])
    torch.testing.assert_close(pooled, model(images).logits)

    compiled |= {"fraction_of_ideal": 0.5, "targets": {}}
    result = {"compiled": compiled, "speedup": {"ideal": 4.0}}
    text = "\n".join(fmnist_compiled_lines(result))
    assert "| compiled serving mode, `PooledRouter` (rest on 64 pooled rows, at most 16 batches waiting) |" in text
    # The eager ratio from the eager runners' own session, the one beside the compiled runners named too.
    session = compiled["eager_session"]
    assert set(session) == {"mainnet", "adaptive", "minimal_router"}
    # Sidenet's time over the minimal router's: the median of the repeats' paired ratios (twice the repeats).
    assert session["adaptive"]["repeats"] == 2 * args.repeats
    low, middle, high = compiled["eager_time_over_minimal_router_quartiles"]
    assert low <= compiled["eager_time_over_minimal_router"] <= high and low <= middle <= high
    a, m = session["adaptive"], session["minimal_router"]
    ratio = compiled["eager_time_over_minimal_router"]
    assert a["min_seconds"] / m["max_seconds"] <= ratio <= a["max_seconds"] / m["min_seconds"]
    assert "timed in a session of the eager runners alone, the median of the 2 repeats' ratios" in text
    assert "between the compiled runners" in text
    older = {k: v for k, v in compiled.items() if k != "eager_time_over_minimal_router_quartiles"}
    assert "timed in a session of the eager runners alone (" in "\n".join(
        fmnist_compiled_lines({**result, "compiled": older})
    )
    # A result from before the pooled row: no such row (and its best compiled row one of the others).
    older = {**compiled, "timing": {k: v for k, v in compiled["timing"].items() if k != "compiled_pooled"}}
    older["best_compiled"] = "compiled_serving"
    assert "PooledRouter" not in "\n".join(fmnist_compiled_lines({**result, "compiled": older}))
    # What bounds it: the eager trunk caps eager routing, the served front the compiled mode.
    bounded = {
        **result,
        "trunk_time_fraction_batch64": 0.2,
        "trunk_flops_fraction": 0.1,
        "adaptive": {"exit_rate": 0.9},
    }
    text = "\n".join(fmnist_compiled_lines(bounded))
    assert "caps eager routing at 3.57×" in text and "which caps the compiled mode at" in text
    assert "| its served front alone (trunk, SideNet, scores" in text
    without_front = {k: v for k, v in compiled["timing"].items() if k != "compiled_front"}
    text = "\n".join(fmnist_compiled_lines({**bounded, "compiled": {**compiled, "timing": without_front}}))
    assert "the compiled mode reaches" in text and "caps the compiled mode" not in text
