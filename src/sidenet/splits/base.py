"""``MainNetSplit``: a pretrained MainNet cut in two at a tap.

The adaptive model needs four things from a MainNet: run it from the input up to the tap (``trunk``),
take from that state what the SideNet reads (``features``), keep only some samples of the state
(``select``), and finish the forward pass from the state (``rest``). A state is a tensor or any
nesting of tuples, lists and dicts of tensors whose first dimension is the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from sidenet.errors import TapError

__all__ = ["MainNetSplit", "CallableSplit", "StagedSplit", "State", "select_samples", "concat_samples"]

State = Any


def select_samples(state: State, index: torch.Tensor) -> State:
    """Keep the samples ``index`` (1-D long tensor) of every tensor in ``state`` (batch on dim 0; a 0-d one,
    like anything else, kept as it is), each in its own memory format (``index_select`` would make a
    channels-last tensor contiguous)."""
    return tree_map(lambda t: _rows(t, index) if isinstance(t, torch.Tensor) and t.ndim else t, state)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    channels_last = t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return t[index] if channels_last else t.index_select(0, index)


def concat_samples(states: Sequence[State]) -> State:
    """One state holding the samples of ``states`` in order: every tensor concatenated on dim 0.

    The states must share their structure and, beyond the batch dimension, their tensor shapes;
    anything that is not a tensor is taken from the first state.
    """
    if not states:
        raise ValueError("nothing to concatenate: no states given")
    flat = [tree_flatten(state) for state in states]
    spec = flat[0][1]
    if any(other != spec for _, other in flat[1:]):
        raise ValueError("cannot concatenate states of different structures")
    leaves = []
    for column in zip(*(values for values, _ in flat), strict=True):
        if isinstance(column[0], torch.Tensor):
            shapes = {tuple(t.shape[1:]) for t in column}
            if len(shapes) > 1:
                raise ValueError(f"cannot concatenate state tensors of sample shapes {sorted(shapes)}")
            leaves.append(torch.cat(column, 0))
        else:
            leaves.append(column[0])
    return tree_unflatten(leaves, spec)


class MainNetSplit(nn.Module):
    """A MainNet cut at ``tap`` into ``trunk`` (input -> state) and ``rest`` (state -> logits).

    Subclasses implement :meth:`trunk` and :meth:`rest`; the defaults of :meth:`features` (the state
    itself) and :meth:`select` (index every tensor of the state) suit MainNets whose state is a tensor.
    The MainNet is registered as the submodule ``mainnet`` so that ``.to()`` and ``.eval()`` reach it.
    """

    def __init__(self, mainnet: nn.Module | None, tap: str | int, num_classes: int | None = None) -> None:
        super().__init__()
        self.mainnet = mainnet
        self.tap = tap
        self.num_classes = num_classes

    def trunk(self, x: Any) -> State:
        """Run the MainNet from its input to the tap."""
        raise NotImplementedError

    def rest(self, state: State) -> torch.Tensor:
        """Finish the MainNet's forward pass from the tap state; returns logits."""
        raise NotImplementedError

    def features(self, state: State) -> torch.Tensor:
        """What the SideNet reads from the tap state."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{type(self).__name__} must define features() for a non-tensor state")
        return state

    def select(self, state: State, index: torch.Tensor) -> State:
        """The state restricted to the samples ``index``."""
        return select_samples(state, index)

    def advance(self, state: State, later: MainNetSplit) -> State:
        """Run the MainNet from this split's tap to ``later``'s, a later tap of the same MainNet: the
        segment between two SideNets of a cascade. ``later.trunk(x)`` equals
        ``self.advance(self.trunk(x), later)``, and ``later.rest`` finishes it.

        Splitters that know their MainNet's layers implement it (ResNets, ``nn.Sequential``, text
        encoders) and :meth:`tap_depth`; the default refuses with :class:`TapError` (see
        :meth:`check_follows`), as a split of plain callables cannot run between two of its cuts."""
        self.check_follows(later)
        raise NotImplementedError

    def tap_depth(self) -> int | None:
        """How deep the tap lies, counted in the splitter's own units (stages, modules, layers), for
        ordering a cascade's taps; ``None`` (the default) for a split that cannot run between taps."""
        return None

    def check_follows(self, later: MainNetSplit) -> None:
        """Raise unless ``later`` can follow this split in a cascade: :class:`TapError` when this split
        cannot run the MainNet between taps or ``later``'s tap is not deeper, ``ValueError`` when it cuts
        another MainNet or with another splitter. Free: reads no tensor."""
        depth = self.tap_depth()
        if depth is None:
            raise TapError(
                f"{type(self).__name__} cannot run the MainNet between two taps, so it cannot hold a cascade of "
                "SideNets; attach one SideNet, or use a splitter that knows the MainNet's layers"
            )
        if type(later) is not type(self) or later.mainnet is not self.mainnet:
            raise ValueError(
                f"a cascade's taps must cut one MainNet with one splitter: {type(self).__name__} at {self.tap!r} "
                f"then {type(later).__name__} at {later.tap!r}"
            )
        later_depth = later.tap_depth()
        if later_depth is None or later_depth <= depth:
            raise TapError(
                f"a cascade's taps must go deeper one after another: {later.tap!r} does not follow {self.tap!r}"
            )

    def selection_sizes(self, state: State, keep: torch.Tensor) -> torch.Tensor | None:
        """Sizes that :meth:`select` would read from the device to keep the samples ``keep`` (an (N,)
        boolean mask), computed on the device as a 1-D integer tensor; ``None`` (the default) when
        selecting reads nothing. The adaptive model reads them together with the count of continuing
        samples, in the one host wait of a routed batch, and passes them to :meth:`select_sized`."""
        return None

    def select_sized(self, state: State, index: torch.Tensor, sizes: Sequence[int]) -> State:
        """:meth:`select` with the :meth:`selection_sizes` already read (no host wait); empty ``sizes``
        keep the state's own sizes (text: its padded length). The default has no sizes to use."""
        return self.select(state, index)

    def concat(self, states: Sequence[State]) -> State:
        """One state holding the samples of ``states`` in order (the inverse of :meth:`select`), for
        running the rest once on samples that continued from several batches."""
        return concat_samples(states)

    def validate_input(self, x: Any) -> None:
        """Raise ``ValueError`` for inputs the MainNet cannot take: :meth:`check_structure`, then
        :meth:`check_values`. Subclasses extend those two, not this."""
        self.check_structure(x)
        self.check_values(x)

    def check_structure(self, x: Any) -> None:
        """The checks that read no tensor value (type, shape, emptiness, device, dtype): free of host
        waits, so the adaptive model runs them on every batch wherever the input lives."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor input, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"empty batch: input has shape {tuple(x.shape)}")
        # Name a device or dtype mismatch here: the MainNet's own error ("expected scalar type Double
        # but found Float") names neither the input nor the fix. The first floating parameter is read
        # on every call (cheap) so that the check follows the MainNet through ``.to()``.
        parameters = self.mainnet.parameters() if isinstance(self.mainnet, nn.Module) else iter(())
        reference = next((p for p in parameters if p.is_floating_point()), None)
        if reference is not None:
            if x.device != reference.device:
                raise ValueError(
                    f"input is on {x.device} but the MainNet is on {reference.device}; "
                    f"move it with x.to({str(reference.device)!r})"
                )
            # Integer inputs are token ids, except for a MainNet that starts with a convolution (``in_channels``):
            # images. Autocast casts floating inputs itself; complex ones no real MainNet takes.
            inexact = x.is_floating_point() or x.is_complex()
            if not inexact and getattr(self, "in_channels", None) is not None:
                raise ValueError(f"expected floating-point images, got {x.dtype}: convert with x.float() and normalise")
            if inexact and x.dtype != reference.dtype and not torch.is_autocast_enabled(x.device.type):
                raise ValueError(f"input dtype {x.dtype} does not match the MainNet's {reference.dtype}; convert with "
                                 f"x.to({reference.dtype})")  # fmt: skip

    def check_values(self, x: Any) -> None:
        """The checks that read the input's values (NaN/inf here; token ids and masks for text). On an
        accelerator each is a host wait, so the adaptive model runs them only for CPU inputs unless
        asked (``AdaptiveModel.check_values``)."""
        # A finite float32 sum proves every value finite (NaN and inf propagate through a sum) and costs a
        # tenth of isfinite(x).all(); only a sum that overflows or is NaN needs the exact check. The sum is
        # read as a Python float (one read, no tensor operation on the 0-d result).
        if x.is_floating_point() and not (
            math.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)).item())
            or bool(torch.isfinite(x).all())
        ):
            raise ValueError("input contains NaN or infinite values")

    def input_device(self, x: Any) -> torch.device:
        """The device of an input batch (of its first tensor)."""
        leaves = [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]
        return leaves[0].device if leaves else torch.device("cpu")

    def batch_size(self, x: Any) -> int:
        """Number of samples in an input batch."""
        return int(x.shape[0])

    def flop_key(self, x: Any) -> tuple:
        """Inputs with equal keys cost the same FLOPs per sample (for vision: the sample shape)."""
        return tuple(x.shape[1:])

    def example(self, x: Any) -> Any:
        """A batch of one sample taken from ``x``, used to measure FLOPs per sample."""
        return x[:1]

    def rest_flop_key(self, state: State, index: torch.Tensor | None = None) -> tuple | None:
        """What the rest's FLOPs per sample depend on when it runs on ``select(state, index)`` (on
        ``state`` itself when ``index`` is None).

        ``None``, the default, says that the rest costs the same per sample for every state made from
        inputs of one :meth:`flop_key`, so the input's :class:`~sidenet.flops.FlopProfile` covers it
        (vision). A split whose :meth:`select` changes the size of the state (text: padding trimmed to
        the longest remaining sequence) returns a key such as ``(length,)``; the adaptive model then
        measures the rest's FLOPs once per key, on :meth:`example_state`.
        """
        return None

    def example_state(self, state: State) -> State:
        """One sample of ``state`` at the state's size, used to measure the rest's FLOPs per sample."""
        leaves = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        if not leaves:
            raise TypeError(f"{type(self).__name__}: the state holds no tensor")
        return select_samples(state, torch.zeros(1, dtype=torch.long, device=leaves[0].device))

    def options(self) -> dict[str, Any]:
        """Settings beyond the tap that rebuild this split (saved beside a SideNet, given back to the
        splitter on loading); none by default."""
        return {}

    def ensure_eval(self) -> MainNetSplit:
        """Put the split back in eval mode if any part of it is training, and return it.

        The MainNet must never run in train mode (its batch norms would update their statistics and
        its dropout change the answers), even after a user's ``mainnet.layer1.train()``. A scan of the
        modules' flags, so it runs before every pass: a plain walk of the module tree, four times faster
        than ``self.modules()`` (16 against 67 us for a ResNet-50's 151 modules on this machine), which
        matters where a batch is served in a few milliseconds.
        """
        pending: list[nn.Module | None] = [self]
        for part in pending:  # the list grows as it is walked
            if part is not None:
                if part.training:
                    self.eval()
                    break
                pending += part._modules.values()
        return self

    def dummy_input(self) -> Any:
        """A small valid input batch, used to size a SideNet when the caller gives no input shape;
        ``None`` when the split cannot make one (image MainNets need the image size)."""
        return None

    def forward(self, x: Any) -> torch.Tensor:
        """The whole MainNet: ``rest(trunk(x))``."""
        return self.rest(self.trunk(x))

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, num_classes={self.num_classes}"

    def mainnet_logits(self, x: Any) -> torch.Tensor:
        """The MainNet's own forward on ``x``, for checking that ``rest(trunk(x))`` reproduces it.

        Splitters match module names, so a model whose ``forward`` adds a step is cut wrongly without
        any error; ``attach`` and ``load_sidenet`` compare the two once. A splitter whose inputs differ
        from the model's call signature (text: a dict of keyword arguments) overrides this.
        """
        if self.mainnet is None:
            raise ValueError(f"{type(self).__name__} has no MainNet module to run (mainnet=None)")
        return self.mainnet(x)


class CallableSplit(MainNetSplit):
    """A split made of plain callables, for architectures sidenet has no splitter for.

    Example::

        split = CallableSplit(trunk=lambda x: net.body(x), rest=lambda h: net.head(h), mainnet=net)

    Args:
        trunk: input -> state.
        rest: state -> logits.
        mainnet: the module the callables use (so that ``.eval()``, ``.to()`` and the fingerprint
            of saved SideNets see it); optional.
        features: state -> SideNet input; defaults to the state itself.
        select: (state, index) -> state; defaults to indexing every tensor of the state.
        num_classes: the MainNet's number of classes, checked against the SideNet's when given.
        tap: a name for the tap, stored in saved configs.
    """

    def __init__(
        self,
        trunk: Callable[[Any], State],
        rest: Callable[[State], torch.Tensor],
        mainnet: nn.Module | None = None,
        features: Callable[[State], torch.Tensor] | None = None,
        select: Callable[[State, torch.Tensor], State] | None = None,
        num_classes: int | None = None,
        tap: str | int = "custom",
    ) -> None:
        super().__init__(mainnet, tap, num_classes)
        self._trunk_fn = trunk
        self._rest_fn = rest
        self._features_fn = features
        self._select_fn = select

    def trunk(self, x: Any) -> State:
        return self._trunk_fn(x)

    def rest(self, state: State) -> torch.Tensor:
        return self._rest_fn(state)

    def features(self, state: State) -> torch.Tensor:
        return self._features_fn(state) if self._features_fn else super().features(state)

    def select(self, state: State, index: torch.Tensor) -> State:
        return self._select_fn(state, index) if self._select_fn else super().select(state, index)


class StagedSplit(MainNetSplit):
    """A MainNet that is a chain of named stages followed by a head, cut after the stage ``tap``.

    Args:
        mainnet: the whole model.
        stages: ``(name, callable)`` in execution order; a tap names the stage after which to cut.
        head: the callable after the last stage (pooling, classifier).
        tap: a stage name, or an alias from ``aliases``.

    Stages and head should be submodules of ``mainnet`` or ``functools.partial`` of module-level
    functions over it, not closures: ``copy.deepcopy`` remaps a partial's arguments to the copied
    model but shares a closure's (the copy would run the original model), and pickle cannot store
    closures at all.
        aliases: other names for stages (``"layer2"`` for its last block ``"layer2.1"``).
        in_channels: when set, inputs must be image batches (N, in_channels, H, W).
    """

    def __init__(
        self,
        mainnet: nn.Module,
        stages: Sequence[tuple[str, Callable[[torch.Tensor], torch.Tensor]]],
        head: Callable[[torch.Tensor], torch.Tensor],
        tap: str,
        aliases: dict[str, str] | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__(mainnet, tap, num_classes)
        aliases = aliases or {}
        names = [name for name, _ in stages]
        self.valid_taps = sorted(set(names) | set(aliases), key=lambda n: (names.index(aliases.get(n, n)), n))
        resolved = aliases.get(str(tap), str(tap))
        if resolved not in names:
            raise TapError(
                f"unknown tap {tap!r} for {type(mainnet).__name__}; valid taps: {', '.join(self.valid_taps)}"
            )
        cut = names.index(resolved) + 1
        # Plain lists: the stages are already registered inside ``mainnet``.
        self._stages = [fn for _, fn in stages]
        self.depth = cut  # stages in the trunk: how deep the tap lies
        self._trunk_stages = [fn for _, fn in stages[:cut]]
        self._rest_stages = [fn for _, fn in stages[cut:]]
        self._head = head
        self.in_channels = in_channels

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self._trunk_stages:
            x = stage(x)
        return x

    def rest(self, state: torch.Tensor) -> torch.Tensor:
        for stage in self._rest_stages:
            state = stage(state)
        return self._head(state)

    def tap_depth(self) -> int:
        """Stages in the trunk."""
        return self.depth

    def advance(self, state: torch.Tensor, later: MainNetSplit) -> torch.Tensor:
        """The stages after this tap up to ``later``'s (see :meth:`MainNetSplit.advance`)."""
        self.check_follows(later)
        for stage in self._stages[self.depth : later.tap_depth()]:
            state = stage(state)
        return state

    def check_structure(self, x: Any) -> None:
        super().check_structure(x)
        if self.in_channels is not None:
            if x.ndim != 4:
                raise ValueError(
                    f"expected an image batch of shape (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
                )
            if x.shape[1] != self.in_channels:
                raise ValueError(
                    f"expected {self.in_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
                )
