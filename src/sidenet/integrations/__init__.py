"""Integrations with serving and data engines: Ray Serve (:mod:`sidenet.integrations.ray_serve`) and
Ray Data (:mod:`sidenet.integrations.ray_data`). Install the ``serve`` extra (``pip install
'sidenet[serve]'``); the Ray Data classifier also runs in this process without Ray.

Importing this package does not import Ray: :func:`build_app` is loaded from
:mod:`sidenet.integrations.ray_serve` when first used.
"""

from __future__ import annotations

from typing import Any

from sidenet.integrations.inputs import BadInput, ImageInputs, SidenetSource, TextInputs
from sidenet.integrations.options import ServeOptions
from sidenet.integrations.ray_data import RoutedClassifier, classify_dataset, classify_file

__all__ = [
    "BadInput",
    "ImageInputs",
    "TextInputs",
    "SidenetSource",
    "RoutedClassifier",
    "classify_dataset",
    "classify_file",
    "build_app",
    "ServeOptions",
]

_SERVE_NAMES = ("build_app", "app_builder", "SidenetDeployment")


def __getattr__(name: str) -> Any:
    if name in _SERVE_NAMES:
        from sidenet.integrations import ray_serve

        return getattr(ray_serve, name)
    raise AttributeError(f"module 'sidenet.integrations' has no attribute {name!r}")
