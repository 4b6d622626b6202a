"""Every error sidenet raises on purpose, under one base: ``except sidenet.SidenetError`` catches them all.

Each is a ``ValueError`` (a bad input, a bad file, a MainNet that does not fit), so code written
before the base existed, catching ``ValueError``, still catches them. Some also keep a second base
for the callers who catch by the standard meaning (as scikit-learn's ``NotFittedError`` is both a
``ValueError`` and an ``AttributeError``): a missing checkpoint is a ``FileNotFoundError``, an
unknown MainNet type a ``TypeError``, an assignment to the frozen exit rule a ``FrozenInstanceError``.

The classes are re-exported from the modules that raised them before (``sidenet.config``,
``sidenet.attach``, ``sidenet.splits``, ``sidenet.routing``), so old imports keep working.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError

__all__ = [
    "SidenetError",
    "CheckpointError",
    "MainNetMismatchError",
    "SplitMismatchError",
    "TapError",
    "UnsupportedMainNetError",
    "ClassCountMismatchError",
    "FrozenExitPolicyError",
    "DataNotFoundError",
    "ShippedWeightsError",
]


class SidenetError(ValueError):
    """Base of every error sidenet raises on purpose."""


class CheckpointError(SidenetError, FileNotFoundError):
    """A saved SideNet folder is missing, incomplete or corrupt."""


class MainNetMismatchError(SidenetError):
    """A saved SideNet is being loaded onto a MainNet other than the one it was trained on."""


class SplitMismatchError(SidenetError):
    """The splitter's ``rest(trunk(x))`` does not compute what the MainNet's own ``forward`` computes."""


class TapError(SidenetError):
    """A tap that the MainNet does not have; the message lists the valid ones."""


class UnsupportedMainNetError(SidenetError, TypeError):
    """No registered splitter knows the MainNet's type. A ``TypeError`` too, as earlier releases raised."""


class ClassCountMismatchError(SidenetError):
    """The SideNet and the MainNet predict different numbers of classes."""


class FrozenExitPolicyError(SidenetError, FrozenInstanceError):
    """An assignment to a field of an :class:`~sidenet.ExitPolicy`, which never changes once built.

    A ``ValueError`` as well, so that ``rule.threshold = 5`` is refused like ``ExitPolicy(threshold=5)``
    is; the message names the model setting to use instead (``model.threshold = ...``).
    """


class DataNotFoundError(SidenetError, FileNotFoundError):
    """A dataset was found neither where the user named nor in the places sidenet looks, nor could it be
    downloaded; the message lists those places and how to get the data."""


class ShippedWeightsError(SidenetError):
    """The demo MainNet's weights that ship with the package are missing or do not match their hash."""
