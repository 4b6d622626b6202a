"""Splitter for Hugging Face encoder classifiers: BERT, DistilBERT and RoBERTa sequence classifiers.

The tap ``k`` cuts after encoder layer ``k`` (1 <= k < number of layers). The trunk is the embeddings
and layers 1..k; the state is the hidden states with the 2-D attention mask; the rest is layers
k+1..L and the model's own classification head. Gathering the samples that continue also cuts the
padding down to the longest of them, so the rest runs on shorter sequences when long ones exit.

Every module called is the model's own, with the attention mask built by ``transformers``' own
``create_bidirectional_mask`` for the model's attention implementation (``sdpa``, ``eager``, ...), so
that with no exit the logits equal ``model(**batch).logits``. ``transformers`` is imported only when
a model is split; ``import sidenet`` does not need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sidenet.errors import TapError, UnsupportedMainNetError
from sidenet.splits.base import MainNetSplit

__all__ = ["TextEncoderSplit", "EncoderLayout", "LAYOUTS", "FEATURES", "is_text_encoder_classifier"]

Features = Literal["first", "mean", "both"]
FEATURES = ("first", "mean", "both")
# Measured on SST-2 with a fine-tuned all-MiniLM-L6-v2 (benchmarks/sst2_minilm.py, SideNet accuracy on
# phrases held out of train, taps 1..5): the first token alone trails by 0.1-18 points (most at early
# taps), the mean and both are within 0.3 points of each other, both ahead on average.
DEFAULT_FEATURES: Features = "both"


@dataclass(frozen=True)
class EncoderLayout:
    """Where one model family keeps its parts.

    Attributes:
        base: attribute of the classifier holding the encoder model (``"bert"``).
        layers: dotted path from the encoder model to its list of layers (``"encoder.layer"``).
        embed: ``(encoder model, batch) -> embeddings``; the batch is a mapping of tensors.
        head: ``(classifier, last hidden states) -> logits``: pooling and classification, as the
            classifier's own ``forward`` does them.
        inputs: the batch keys the trunk reads, passed to the classifier's own ``forward`` when the
            split is checked against it (DistilBERT takes no ``token_type_ids``).
    """

    base: str
    layers: str
    embed: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")


def _bert_embed(base: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))


def _bert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def _distilbert_embed(base: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return base.embeddings(batch["input_ids"])


def _distilbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(torch.relu(model.pre_classifier(hidden[:, 0]))))


def _roberta_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(hidden)


# Keyed by class name so that matching needs no import of transformers; subclasses match too. The parts
# are module-level functions, not lambdas, so that splits pickle (Ray ships models by pickling them).
LAYOUTS: dict[str, EncoderLayout] = {
    "BertForSequenceClassification": EncoderLayout("bert", "encoder.layer", _bert_embed, _bert_head),
    "DistilBertForSequenceClassification": EncoderLayout(
        "distilbert",
        "transformer.layer",
        _distilbert_embed,
        _distilbert_head,
        inputs=("input_ids", "attention_mask"),
    ),
    "RobertaForSequenceClassification": EncoderLayout("roberta", "encoder.layer", _bert_embed, _roberta_head),
}


def _layout(model: nn.Module) -> EncoderLayout | None:
    for cls in type(model).__mro__:
        if cls.__name__ in LAYOUTS and cls.__module__.startswith("transformers."):
            return LAYOUTS[cls.__name__]
    return None


def is_text_encoder_classifier(model: nn.Module) -> bool:
    """True for the ``transformers`` sequence classifiers listed in :data:`LAYOUTS`."""
    return _layout(model) is not None


def _run_layer(layer: nn.Module, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


class TextEncoderSplit(MainNetSplit):
    """A ``transformers`` encoder classifier cut after encoder layer ``tap``.

    Args:
        model: a ``BertForSequenceClassification``, ``DistilBertForSequenceClassification`` or
            ``RobertaForSequenceClassification`` (from a config or ``from_pretrained``).
        tap: ``k`` in 1..L-1 (an int or a string of digits): the trunk is the embeddings and layers 1..k.
        features: what the SideNet reads: ``"first"`` (the first token's hidden state), ``"mean"``
            (the mean over real, non-padding tokens) or ``"both"`` concatenated (the default).

    Inputs are mappings (a dict or a tokenizer's ``BatchEncoding``) with ``input_ids`` and optionally
    ``attention_mask`` (all ones when absent) and ``token_type_ids``; other keys, such as ``labels``,
    are ignored. The state is ``{"hidden": (N, T, D), "mask": (N, T)}``.
    """

    def __init__(self, model: nn.Module, tap: int | str, features: Features = DEFAULT_FEATURES) -> None:
        layout = _layout(model)
        if layout is None:
            known = ", ".join(LAYOUTS)
            raise UnsupportedMainNetError(f"no text encoder layout for {type(model).__name__}; known: {known}")
        config = model.config
        if getattr(config, "is_decoder", False):
            raise ValueError(f"{type(model).__name__} is configured as a decoder; only encoders can be split")
        if config.num_labels < 2:
            raise ValueError(f"{type(model).__name__} has {config.num_labels} label(s); a classifier needs >= 2")
        base = getattr(model, layout.base)
        layers = base.get_submodule(layout.layers)
        depth = len(layers)
        try:
            cut = int(tap)
        except (TypeError, ValueError):
            cut = -1
        if isinstance(tap, float) or not 1 <= cut < depth:
            raise TapError(
                f"unknown tap {tap!r} for {type(model).__name__} with {depth} encoder layers; valid taps: "
                f"{', '.join(map(str, range(1, depth)))} (the trunk is the embeddings and the first `tap` layers)"
            )
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        super().__init__(model, cut, config.num_labels)
        self.layout = layout
        self.features_mode: Features = features
        self.valid_taps = list(range(1, depth))
        self.hidden_size = int(config.hidden_size if hasattr(config, "hidden_size") else config.dim)
        # Plain attributes, not submodules: the layers are registered inside ``mainnet`` already.
        self._base = (base,)
        self._layers = (list(layers[:cut]), list(layers[cut:]))

    # -- input ------------------------------------------------------------------------------------
    def check_structure(self, x: Any) -> None:
        if not isinstance(x, Mapping) or "input_ids" not in x:
            raise ValueError(
                f"expected a dict (or tokenizer BatchEncoding) with input_ids and attention_mask, got "
                f"{type(x).__name__}; tokenize with the model's tokenizer(..., return_tensors='pt')"
            )
        ids = x["input_ids"]
        integer = isinstance(ids, torch.Tensor) and not (ids.is_floating_point() or ids.is_complex())
        if not integer or ids.ndim != 2 or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of shape (N, T), got {_describe(ids)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"empty batch: input_ids has shape {tuple(ids.shape)}")
        device = next(self.mainnet.parameters()).device
        if ids.device != device:
            raise ValueError(f"input_ids are on {ids.device} but the MainNet is on {device}; move the batch there")
        config = self.mainnet.config
        if ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"sequences of {ids.shape[1]} tokens exceed the model's {config.max_position_embeddings} "
                "positions; tokenize with truncation=True"
            )
        for key in ("attention_mask", "token_type_ids"):
            value = x.get(key)
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
                raise ValueError(f"{key} must be a tensor of the shape of input_ids {tuple(ids.shape)}")

    def check_values(self, x: Any) -> None:
        """Token ids inside the vocabulary; a mask of 0 and 1 with a real token in every sample."""
        ids, config = x["input_ids"], self.mainnet.config
        if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {config.vocab_size - 1}] (the model's vocabulary)")
        mask = x.get("attention_mask")
        if mask is not None:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
            empty = (~mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"samples {empty[:10]} have no real token (their attention_mask is all 0)")

    def batch_size(self, x: Any) -> int:
        return int(x["input_ids"].shape[0])

    def flop_key(self, x: Any) -> tuple:
        """Text FLOPs depend on the padded length of the batch."""
        return (int(x["input_ids"].shape[1]),)

    def example(self, x: Any) -> Any:
        return {k: v[:1] for k, v in x.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}

    def dummy_input(self) -> dict[str, torch.Tensor]:
        device = next(self.mainnet.parameters()).device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def options(self) -> dict[str, Any]:
        return {"features": self.features_mode}

    def mainnet_logits(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``model(**inputs).logits`` with the keys the trunk reads (others, such as labels, dropped)."""
        inputs = {key: x[key] for key in self.layout.inputs if x.get(key) is not None}
        return self.mainnet(**inputs, return_dict=True).logits

    # -- the two halves ---------------------------------------------------------------------------
    def _attention_mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        """The mask the layers take, built as the model builds it for its attention implementation."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.mainnet.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            allow_is_bidirectional_skip=self.allows_mask_skip(mask),
        )

    def allows_mask_skip(self, mask: torch.Tensor) -> bool:
        """Whether ``transformers`` may drop the attention mask of a batch without padding, as the
        model's own forward does. Finding that out reads the mask (``mask.all()``): free on the CPU,
        where the skip is allowed (the answers then equal the model's own bit for bit), but a host
        wait on an accelerator, where the mask is always built instead (equal within float rounding)."""
        return mask.device.type == "cpu"

    def _layers_on(self, layers: list[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attention_mask = self._attention_mask(hidden, mask)
        for layer in layers:
            hidden = _run_layer(layer, hidden, attention_mask)
        return hidden

    def trunk(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings and layers 1..tap."""
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(x["input_ids"])
        hidden = self.layout.embed(self._base[0], x)
        return {"hidden": self._layers_on(self._layers[0], hidden, mask), "mask": mask}

    def rest(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Layers tap+1..L, then the model's pooling and classifier; returns logits."""
        hidden = self._layers_on(self._layers[1], state["hidden"], state["mask"])
        return self.layout.head(self.mainnet, hidden)

    def tap_depth(self) -> int:
        """Encoder layers in the trunk."""
        return int(self.tap)

    def advance(self, state: Mapping[str, torch.Tensor], later: MainNetSplit) -> dict[str, torch.Tensor]:
        """Layers tap+1..``later.tap`` (see :meth:`MainNetSplit.advance`); the mask goes along as it is."""
        self.check_follows(later)
        layers = self._layers[1][: int(later.tap) - int(self.tap)]
        return {"hidden": self._layers_on(layers, state["hidden"], state["mask"]), "mask": state["mask"]}

    def features(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) first-token state, (N, D) mean over real tokens, or both as (N, 2D)."""
        hidden = state["hidden"]
        parts = []
        if self.features_mode in ("first", "both"):
            parts.append(hidden[:, 0])
        if self.features_mode in ("mean", "both"):
            weights = state["mask"].to(hidden.dtype).unsqueeze(-1)
            parts.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # -- routing ----------------------------------------------------------------------------------
    @staticmethod
    def _kept_length(mask: torch.Tensor) -> int:
        """Columns up to the last one holding a real token of some sample (trailing padding dropped)."""
        real = mask.bool().any(0).nonzero()
        return int(real.max()) + 1 if len(real) else mask.shape[1]

    def select(self, state: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples ``index``, with the padding cut down to the longest of them."""
        mask = state["mask"].index_select(0, index)
        return self._cut(state, index, self._kept_length(mask))

    def selection_sizes(self, state: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """(1,) the length :meth:`select` keeps for the samples ``keep``, computed on the device: the
        last column holding a real token of a kept sample (0 when none is kept)."""
        columns = (state["mask"].bool() & keep.unsqueeze(1)).any(0)
        positions = torch.arange(1, columns.numel() + 1, device=columns.device)
        return (columns * positions).amax().reshape(1)

    def select_sized(
        self, state: Mapping[str, torch.Tensor], index: torch.Tensor, sizes: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """:meth:`select` with the kept length given (``sizes[0]``, from :meth:`selection_sizes`)."""
        length = int(sizes[0]) if sizes and sizes[0] > 0 else int(state["mask"].shape[1])
        return self._cut(state, index, length)

    @staticmethod
    def _cut(state: Mapping[str, torch.Tensor], index: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        mask = state["mask"][:, :length].index_select(0, index)
        return {"hidden": state["hidden"][:, :length].index_select(0, index), "mask": mask}

    def concat(self, states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Samples of several states in one, padded (masked out) to the longest state's length:
        padding at the end changes no real token's result, as in a batch padded by the tokenizer."""
        if not states:
            raise ValueError("nothing to concatenate: no states given")
        length = max(int(state["mask"].shape[1]) for state in states)
        hidden = [F.pad(s["hidden"], (0, 0, 0, length - s["hidden"].shape[1])) for s in states]
        masks = [F.pad(s["mask"], (0, length - s["mask"].shape[1])) for s in states]
        return {"hidden": torch.cat(hidden, 0), "mask": torch.cat(masks, 0)}

    def rest_flop_key(self, state: Mapping[str, torch.Tensor], index: torch.Tensor | None = None) -> tuple:
        """The length the rest runs at: the state's, or after :meth:`select`, the longest kept sample's."""
        if index is None:
            return (int(state["hidden"].shape[1]),)
        return (self._kept_length(state["mask"].index_select(0, index)),)

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, features={self.features_mode!r}, num_classes={self.num_classes}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
