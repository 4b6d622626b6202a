"""What a served or batch-classified sample looks like on the wire, and where its model comes from.

:class:`ImageInputs` and :class:`TextInputs` turn one request body (or one dataset cell) into one
sample, refusing bad ones with a :class:`BadInput` that carries an HTTP status and a message, and stack
samples into a model batch. :class:`SidenetSource` names a saved SideNet and its MainNet so that a Ray
replica or actor can load its own copy. All three are small picklable objects: Ray ships them to its
workers, which build the model and the tokenizer there.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidenet.datasets import eight_bit

__all__ = ["BadInput", "ImageInputs", "TextInputs", "SidenetSource", "answers", "compiled_on_neutral"]

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/gif")
NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"


class BadInput(ValueError):
    """A request or dataset cell that cannot be classified; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(400, f"the body is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class ImageInputs:
    """Images of one shape ``(C, H, W)``, normalised per channel by ``(x / 255 - mean) / std``.

    A sample is PNG/JPEG/... bytes (converted to grey or RGB as ``C`` says, resized to ``H x W``), a
    ``.npy`` array (``application/x-npy``) or JSON ``{"array": [...]}``; arrays are model inputs already
    (normalised, of exactly the input shape; ``(H, W)`` is accepted for one channel).
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    class_names: tuple[str, ...] = ()

    kind = "image"

    def decode_image(self, data: bytes) -> torch.Tensor:
        """Image file bytes to one normalised ``(C, H, W)`` sample."""
        from PIL import Image, UnidentifiedImageError

        channels, height, width = self.shape
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image, mode = eight_bit(opened), "L" if channels == 1 else "RGB"
                if image.mode != mode:
                    image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInput(400, f"the body is not a readable image: {exc}") from exc
        pixels = pixels.reshape(height, width, -1).transpose(2, 0, 1) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(np.ascontiguousarray((pixels - mean) / std))

    def from_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """A uint8 picture ``(H, W)`` or ``(H, W, C)`` (as ``ray.data.read_images`` gives) to one sample."""
        from PIL import Image

        if pixels.ndim not in (2, 3):  # a flat row of pixels has lost the picture's height and width
            raise BadInput(
                422, f"a picture is uint8 pixels of shape (H, W) or (H, W, C), got shape {list(pixels.shape)}"
            )
        buffer = io.BytesIO()
        try:
            Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        except (TypeError, ValueError, OSError) as exc:
            raise BadInput(422, f"not a picture of shape (H, W) or (H, W, C): {exc}") from exc
        return self.decode_image(buffer.getvalue())

    def from_cell(self, cell: Any) -> torch.Tensor:
        """A dataset cell to one sample: image file bytes (or a ``{"bytes": ...}`` record, as Hugging Face
        image columns store them), a uint8 picture, or a float array of the input shape."""
        if isinstance(cell, dict) and isinstance(cell.get("bytes"), (bytes, bytearray)):
            cell = cell["bytes"]
        if isinstance(cell, (bytes, bytearray)):
            if not cell:
                raise BadInput(400, "empty image bytes")
            return self.decode_image(bytes(cell))
        array = np.asarray(cell)
        if array.dtype == object and array.ndim == 1:  # nested lists stored row by row (their dtype kept: uint8
            try:  # rows are a picture's pixels, float rows a model input)
                array = np.stack([np.asarray(row) for row in array])
            except ValueError as exc:
                raise BadInput(422, f"the array's rows differ in length: {exc}") from exc
        if array.dtype == np.uint8:
            return self.from_pixels(array)
        return self.from_array(array)

    def from_array(self, array: Any) -> torch.Tensor:
        """A model-input array (nested lists or numpy) to one ``(C, H, W)`` sample, shape checked."""
        try:
            values = np.asarray(array, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise BadInput(422, f"the array is not numeric: {exc}") from exc
        if values.ndim == 2 and self.shape[0] == 1:
            values = values[None]
        if tuple(values.shape) != tuple(self.shape):
            raise BadInput(
                422, f"wrong shape {list(values.shape)}: this model takes one input of shape {list(self.shape)}"
            )
        if not np.isfinite(values).all():
            raise BadInput(422, "the array holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(values))

    def parse(self, body: bytes, content_type: str | None) -> torch.Tensor:
        """One request body to one sample (raises :class:`BadInput`)."""
        media = _media_type(content_type)
        if media in IMAGE_TYPES or media == "application/octet-stream":
            return self.decode_image(body)
        if media == NPY_TYPE:
            try:
                array = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise BadInput(400, f"the body is not a .npy array: {exc}") from exc
            return self.from_array(array)
        if media == JSON_TYPE:
            payload = _json_body(body)
            if not isinstance(payload, dict) or "array" not in payload:
                raise BadInput(422, 'JSON requests to an image model are {"array": [[...]]} of the input shape')
            return self.from_array(payload["array"])
        raise BadInput(
            415, f"unsupported content type {media or '(none)'!r}: send image bytes, {NPY_TYPE} or {JSON_TYPE}"
        )

    def collate(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """Samples to one batch."""
        return torch.stack(list(samples))

    def neutral_sample(self) -> torch.Tensor:
        """A sample of the input shape (zeros: the normalised mean), for compiling ahead of traffic."""
        return torch.zeros(self.shape)


@dataclass(frozen=True)
class TextInputs:
    """Sentences, tokenised by ``checkpoint``'s tokenizer (truncated to ``max_length`` tokens).

    A sample is JSON ``{"text": "..."}`` or a ``text/plain`` body of at most ``max_chars`` characters.
    """

    checkpoint: str
    max_length: int = 64
    class_names: tuple[str, ...] = ()
    max_chars: int = 4096

    kind = "text"

    def check(self, text: Any) -> str:
        """A sentence, or :class:`BadInput` for anything else."""
        if not isinstance(text, str) or not text.strip():
            raise BadInput(422, "the text must be a non-empty string")
        if len(text) > self.max_chars:
            raise BadInput(413, f"the text has {len(text)} characters; at most {self.max_chars} are accepted")
        return text

    def from_cell(self, cell: Any) -> str:
        """A dataset cell (a string) to one sentence."""
        if isinstance(cell, (bytes, bytearray)):
            try:
                cell = bytes(cell).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(400, f"not UTF-8 text: {exc}") from exc
        return self.check(cell)

    def parse(self, body: bytes, content_type: str | None) -> str:
        """One request body to one sentence (raises :class:`BadInput`)."""
        media = _media_type(content_type)
        if media == JSON_TYPE:
            payload = _json_body(body)
            if not isinstance(payload, dict) or "text" not in payload:
                raise BadInput(422, 'JSON requests to a text model are {"text": "a sentence"}')
            return self.check(payload["text"])
        if media == "text/plain":
            try:
                return self.check(body.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BadInput(400, f"the body is not UTF-8 text: {exc}") from exc
        raise BadInput(415, f"unsupported content type {media or '(none)'!r}: send {JSON_TYPE} or text/plain")

    def collate(self, samples: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sentences to one tokenised batch, padded to the longest."""
        collator = self.__dict__.get("_collator")
        if collator is None:  # built once per process, where the samples are: tokenizers do not travel
            from sidenet.loaders import TextCollator
            from sidenet.text_pretrain import load_tokenizer

            collator = TextCollator(load_tokenizer(self.checkpoint), self.max_length)
            object.__setattr__(self, "_collator", collator)
        return collator.encode(list(samples))

    def neutral_sample(self) -> str:
        """A one-word sentence, for compiling ahead of traffic."""
        return "fine"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_collator"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass(frozen=True)
class SidenetSource:
    """A saved SideNet (``sidenet fit``'s folder) and its MainNet: a built-in task's (``task``; default the
    one the SideNet was fitted on) or one built by a function named ``MODULE:FUNCTION`` (``mainnet``,
    e.g. ``torchvision.models:resnet50``; images only), with its weights loaded from ``mainnet_weights``
    (a safetensors state dict) unless the function loads them itself. Nothing is unpickled: a pickled
    module would run its file's code. ``threshold`` overrides the saved one."""

    sidenet: str
    task: str | None = None
    mainnet: str | None = None
    threshold: float | None = None
    mainnet_weights: str | None = None

    def _config(self) -> Any:
        from sidenet.config import SideNetConfig

        return SideNetConfig.load(Path(self.sidenet))

    def task_name(self) -> str | None:
        """The built-in task serving this SideNet, or None for a ``mainnet`` file."""
        if self.mainnet is not None:
            return None
        return self.task or self._config().metadata.get("task", "fmnist")

    def load(self) -> Any:
        """The routed model (an :class:`sidenet.AdaptiveModel` in eval mode), in the dtype the SideNet
        was fitted in (its MainNet cast likewise: :func:`sidenet.placement.load_placed`)."""
        from sidenet.placement import load_placed
        from sidenet.tasks import get_task

        if self.mainnet is not None:
            mainnet = build_mainnet(self.mainnet, self.mainnet_weights)
        else:
            mainnet = get_task(self.task_name()).mainnet(progress=False)
        model = load_placed(mainnet, Path(self.sidenet)).eval()
        if self.threshold is not None:
            model.thresholds = self.threshold  # a cascade: the same threshold for every SideNet
        return model

    def tolerance(self, default: float = 0.01) -> float:
        """The disagreement rate the saved threshold was chosen for, for the live audit: its rule's
        ``max_disagreement`` when it was chosen by that; for a threshold chosen by accuracy, the
        disagreement it had on the choosing data (``sidenet fit`` records it), rounded up to a whole
        percent; else ``default``."""
        choice = self._config().metadata.get("threshold_choice") or {}
        if isinstance(choice.get("max_disagreement"), (int, float)) and 0 < choice["max_disagreement"] < 1:
            return float(choice["max_disagreement"])
        measured = choice.get("disagreement")
        if isinstance(measured, (int, float)) and 0 <= measured < 0.99:
            return max(math.ceil(100 * measured - 1e-9), 1) / 100
        return default

    def inputs(self) -> ImageInputs | TextInputs:
        """How this model's samples arrive."""
        from sidenet.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
        from sidenet.tasks import get_task

        name = self.task_name()
        if name == "sst2":
            task = get_task(name)
            return TextInputs(task.recipe.checkpoint, task.recipe.max_length, tuple(task.class_names))
        if name == "fmnist":
            task = get_task(name)
            return ImageInputs(
                tuple(task.input_shape), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), tuple(task.class_names)
            )
        config = self._config()
        if not config.input_shape or len(config.input_shape) != 3:
            raise ValueError(f"the SideNet in {self.sidenet} records no (C, H, W) input shape: serve it from Python")
        return ImageInputs(tuple(config.input_shape), class_names=tuple(config.metadata.get("class_names", ())))


def build_mainnet(factory: str, weights: str | None = None) -> torch.nn.Module:
    """The module returned by the function ``factory``, called without arguments, with the state dict of
    the safetensors file ``weights`` loaded into it (strictly) when given. ``factory`` is
    ``MODULE:FUNCTION`` (an importable module, e.g. ``torchvision.models:resnet50``) or
    ``FILE.py:FUNCTION`` (a Python file of one's own, imported from its path: Ray workers need no
    import path set up for it)."""
    import hashlib
    import importlib
    import importlib.util

    module_name, _, function_name = factory.rpartition(":")
    if not module_name or not function_name:
        raise ValueError(f"--mainnet must name a function as MODULE:FUNCTION or FILE.py:FUNCTION, got {factory!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            unique = f"sidenet_mainnet_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(unique, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise ImportError(f"no Python file {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, AttributeError, OSError) as exc:
        raise ValueError(f"cannot find the MainNet function {factory!r}: {exc}") from exc
    mainnet = function()
    if not isinstance(mainnet, torch.nn.Module):
        raise ValueError(f"{factory} returned a {type(mainnet).__name__}, not a torch.nn.Module")
    if weights is not None:
        from safetensors.torch import load_file

        mainnet.load_state_dict(load_file(weights))
    return mainnet.eval()


def answers(output: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One JSON-ready answer per sample of an :class:`sidenet.AdaptiveOutput`: label, class name,
    confidence (the exit score, NaN-free: ``None`` where the SideNet did not run), exited, FLOPs."""
    labels = output.logits.argmax(dim=-1).tolist()
    confidence = output.confidence.float().tolist()
    exited = output.exited.tolist()
    flops = output.flops.double().tolist()
    return [
        {
            "label": label,
            "class_name": class_names[label] if label < len(class_names) else str(label),
            "confidence": None if score != score else score,
            "exited": bool(gone),
            "flops": cost,
        }
        for label, score, gone, cost in zip(labels, confidence, exited, flops, strict=True)
    ]


def compiled_on_neutral(model: Any, inputs: ImageInputs | TextInputs, batch_size: int, backend: str | None) -> Any:
    """``model`` served by :func:`sidenet.compile_for_serving` with ``backend``, compiled ahead of traffic
    on batches of neutral samples of ``inputs``: on CUDA at the powers of two up to ``batch_size`` and
    ``batch_size`` itself, to which a batch of another size is padded (Serve's batches come in every size
    up to ``batch_size``: none is captured while served); on the CPU at ``batch_size`` (other sizes are
    compiled when first seen). None where ``backend`` is None (eager routing)."""
    if backend is None:
        return None
    from sidenet.compiled import compile_for_serving
    from sidenet.compiled_stages import default_row_buckets
    from sidenet.training import to_mainnet

    example = to_mainnet(model.split, inputs.collate([inputs.neutral_sample()] * batch_size))
    cuda = model.split.input_device(example).type == "cuda"
    sizes = default_row_buckets(batch_size) if cuda else [batch_size]
    return compile_for_serving(model, example, batch_sizes=sizes, backend=backend)
