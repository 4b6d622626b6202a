"""sidenet: adaptive compute for pretrained classifiers (Morisot, "Add a SideNet to your MainNet").

Attach a small SideNet to an early layer of a frozen MainNet; confident inputs exit there, the rest
continue through the MainNet from where they left off.

This module's ``__all__`` is the public API; each name is defined once, in the submodule named beside it.
"""

import importlib
import pkgutil
from types import ModuleType

from sidenet.attach import attach
from sidenet.cascade_choice import CascadeChoice, choose_taps, threshold_path
from sidenet.cascade_curve import CascadeCurve
from sidenet.cascade_record import CascadeRecord, collect_cascade
from sidenet.checkpoint import load_sidenet, save_sidenet
from sidenet.compiled import CompiledAdaptiveModel, compile_for_serving
from sidenet.config import SideNetConfig, mainnet_fingerprint
from sidenet.curve import TradeoffCurve, sweep
from sidenet.errors import (
    CheckpointError,
    ClassCountMismatchError,
    DataNotFoundError,
    FrozenExitPolicyError,
    MainNetMismatchError,
    ShippedWeightsError,
    SidenetError,
    SplitMismatchError,
    TapError,
    UnsupportedMainNetError,
)
from sidenet.flops import FlopLedger, FlopProfile, count_flops, profile_flops
from sidenet.head import SideNet
from sidenet.monitor import TrafficMonitor
from sidenet.part_costs import PartSeconds, batch_row_counts, measure_part_seconds, time_weighted
from sidenet.policy import NEVER_EXIT, ExitPolicy, format_threshold
from sidenet.record import SweepRecord, collect
from sidenet.routing import AdaptiveModel, AdaptiveOutput
from sidenet.splits import CallableSplit, MainNetSplit, TextEncoderSplit, register_splitter, split_mainnet
from sidenet.time_forecast import batch_time_rank, forecast_batch_time, measure_part_seconds_over, timing_batch_count
from sidenet.training import FeatureCache, cache_features, fit_sidenet, train_sidenet

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic] version = {attr = "sidenet.__version__"}).
__version__ = "0.1.0"

__all__ = [
    # attaching, saving, loading (sidenet.attach, sidenet.checkpoint, sidenet.config)
    "attach",
    "save_sidenet",
    "load_sidenet",
    "SideNetConfig",
    "mainnet_fingerprint",
    # the model and its parts (sidenet.routing, head, policy, flops, monitor)
    "AdaptiveModel",
    "AdaptiveOutput",
    "SideNet",
    "ExitPolicy",
    "NEVER_EXIT",
    "format_threshold",
    "FlopLedger",
    "FlopProfile",
    "count_flops",
    "profile_flops",
    "TrafficMonitor",
    # serving with compiled or captured stages (sidenet.compiled)
    "compile_for_serving",
    "CompiledAdaptiveModel",
    # splitting MainNets (sidenet.splits)
    "MainNetSplit",
    "CallableSplit",
    "TextEncoderSplit",
    "register_splitter",
    "split_mainnet",
    # training (sidenet.training)
    "FeatureCache",
    "cache_features",
    "fit_sidenet",
    "train_sidenet",
    # the trade-off (sidenet.record, sidenet.curve)
    "SweepRecord",
    "collect",
    "TradeoffCurve",
    "sweep",
    # cascades of SideNets (sidenet.cascade_record, sidenet.cascade_curve, sidenet.cascade_choice)
    "CascadeRecord",
    "collect_cascade",
    "CascadeCurve",
    "threshold_path",
    "CascadeChoice",
    "choose_taps",
    # choosing by time where the model runs, not FLOPs (sidenet.part_costs, sidenet.time_forecast)
    "PartSeconds",
    "measure_part_seconds",
    "batch_row_counts",
    "time_weighted",
    "forecast_batch_time",
    "batch_time_rank",
    "measure_part_seconds_over",
    "timing_batch_count",
    # errors (sidenet.errors)
    "SidenetError",
    "CheckpointError",
    "ClassCountMismatchError",
    "DataNotFoundError",
    "ShippedWeightsError",
    "FrozenExitPolicyError",
    "MainNetMismatchError",
    "SplitMismatchError",
    "TapError",
    "UnsupportedMainNetError",
]

# Every submodule (but ``__main__``, which runs the CLI): ``import sidenet`` loads the core, and
# ``sidenet.calibration``, ``sidenet.audit``, ``sidenet.report``, ... are imported on first use, so that
# ``import sidenet`` stays light (no plots, HTML, Ray) and ``sidenet.calibration.calibrate(...)`` still works.
_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def __getattr__(name: str) -> ModuleType:
    """A submodule not yet imported, imported now (PEP 562)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
