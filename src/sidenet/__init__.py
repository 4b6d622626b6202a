"""sidenet: adaptive compute for pretrained classifiers (Morisot, "Add a SideNet to your MainNet").

Attach a small SideNet to an early layer of a frozen MainNet; confident inputs exit there, the rest
continue through the MainNet from where they left off.
"""

from sidenet.attach import (
    CheckpointError,
    MainNetMismatchError,
    SplitMismatchError,
    attach,
    load_sidenet,
    save_sidenet,
)
from sidenet.config import SideNetConfig, mainnet_fingerprint
from sidenet.curve import TradeoffCurve, sweep
from sidenet.flops import FlopProfile, count_flops, profile_flops
from sidenet.head import SideNet
from sidenet.policy import NEVER_EXIT, ExitPolicy
from sidenet.routing import AdaptiveModel, AdaptiveOutput, ClassCountMismatchError
from sidenet.splits import (
    CallableSplit,
    MainNetSplit,
    TapError,
    TextEncoderSplit,
    UnsupportedMainNetError,
    register_splitter,
    split_mainnet,
)
from sidenet.training import FeatureCache, cache_features, fit_sidenet, train_sidenet

__version__ = "0.1.0"

__all__ = [
    "AdaptiveModel",
    "AdaptiveOutput",
    "CallableSplit",
    "CheckpointError",
    "ClassCountMismatchError",
    "ExitPolicy",
    "FeatureCache",
    "FlopProfile",
    "MainNetMismatchError",
    "MainNetSplit",
    "NEVER_EXIT",
    "SideNet",
    "SideNetConfig",
    "SplitMismatchError",
    "TapError",
    "TextEncoderSplit",
    "TradeoffCurve",
    "UnsupportedMainNetError",
    "attach",
    "cache_features",
    "count_flops",
    "fit_sidenet",
    "load_sidenet",
    "mainnet_fingerprint",
    "profile_flops",
    "register_splitter",
    "save_sidenet",
    "split_mainnet",
    "sweep",
    "train_sidenet",
]
