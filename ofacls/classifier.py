"""The one place that wires images -> model -> decoding -> Prediction."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, Union, cast

from ofacls.errors import (
    CheckpointError,
    DeviceError,
    InputError,
    ModelNotFoundError,
    UsageError,
)
from ofacls.images import DEFAULT_MAX_PIXELS, load_pixels, normalise, to_pixels
from ofacls.labels import LabelTrie, encode_prompt, load_tokenizer, read_label_names
from ofacls.libc import keep_freed_memory
from ofacls.model.config import OFAConfig, TaskConfig, check_image_fits, read_json
from ofacls.prediction import Prediction

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ofacls.model.ofa import OFAModel

# One image: a path, the bytes of an image file, or a decoded PIL image.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image"]
_PATH_TYPES = (str, os.PathLike)
_BYTES_TYPES = (bytes, bytearray, memoryview)
DECODE_MODES = ("exact", "beam")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; refuse devices that are not there."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {device!r}")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA, fp32 elsewhere."""
    import torch

    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (use auto, fp32, fp16 or bf16)")
    dtype = getattr(torch, PRECISIONS[precision])
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("fp16 is not supported on CPU; use fp32 or bf16")
    return dtype


def cpu_lacks_bf16() -> bool:
    """True on an x86 CPU without AMX or AVX-512 BF16, where torch emulates bf16
    (slower than fp32). False where it has them, or where torch cannot tell."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # ARM's bf16 extensions are not what these probes ask about
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if not all(callable(p) for p in probes):
        return False  # private probes: a torch without them gets no advice, not an error
    return not any(p() for p in probes)  # type: ignore[misc]


class Classifier:
    """An OFA image classifier loaded from a ModelScope model folder."""

    def __init__(self, model: OFAModel, trie: LabelTrie, prompt_ids: list[int], task: TaskConfig,
                 device: torch.device, dtype: torch.dtype, max_pixels: int | None) -> None:
        self.model, self.trie, self.task = model, trie, task
        self.prompt_ids = prompt_ids
        self.device, self.dtype = device, dtype
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: str = "auto",
                        labels: Sequence[str] | None = None,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        quantize: str | None = None) -> Classifier:
        """Load a local model folder (see `ofacls.hub.resolve_model` for ids).

        `labels` restricts answers to a subset of the model's labels;
        `quantize="int8"` swaps the Linear layers for dynamic int8 ones (CPU only:
        faster, answers may differ slightly from fp32)."""
        import torch

        from ofacls.model.weights import load_model

        folder = Path(path)
        if not folder.is_dir():
            # "owner/name/config.json: missing" would hide that this wants a folder
            raise ModelNotFoundError(f"no model folder at {path} (a ModelScope id goes "
                                     "through ofacls.hub.resolve_model first)")
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{path} is not an OFA model folder: it has no config.json")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        cfg = OFAConfig.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        task = TaskConfig.from_dict(read_json(folder / "configuration.json"),
                                    str(folder / "configuration.json"))
        check_image_fits(task, cfg, str(folder / "configuration.json"))
        tokenizer = load_tokenizer(folder)
        trie = LabelTrie.build(read_label_names(folder / task.answer2label), tokenizer,
                               cfg.vocab_size)
        # before the weights: a tokenizer that does not fit the model fails fast
        prompt = encode_prompt(tokenizer, task.prompt, task.max_src_length, cfg.vocab_size)
        if labels is not None:
            trie = trie.subset(labels)
        if quantize not in (None, "none", "int8"):
            raise UsageError(f"unknown quantization {quantize!r} (use int8)")
        if quantize == "int8" and (dev.type != "cpu" or torch_dtype != torch.float32):
            raise DeviceError("--quantize int8 needs --device cpu and fp32")
        model = load_model(folder, cfg, dev, torch_dtype)
        if torch_dtype != torch.float32 and dev.type in ("cpu", "cuda"):
            # the layout oneDNN and cuDNN run fastest; MPS keeps NCHW (not measured there)
            model.encoder.embed_images.use_channels_last()
        if dev.type == "cuda" and torch_dtype == torch.float32:
            # fp32 is the parity mode: TF32 convolutions/matmuls drift ~1e-3 from CPU
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if quantize == "int8":
            with warnings.catch_warnings():  # torch.ao's deprecation notices are not ours
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        _set_threads()
        keep_freed_memory()
        return cls(model, trie, prompt, task, dev, torch_dtype, max_pixels)

    @property
    def labels(self) -> list[str]:
        return self.trie.names

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input -> normalised (3, S, S) float32 CPU tensor, as the reference
        feeds its model. Thread-safe."""
        return normalise(self.pixels(image), *self.task.mean_std)

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """One input -> its resized RGB image, (3, S, S) uint8 on the CPU: what
        `classify_pixels` normalises on the model's device. Thread-safe.

        Paths and bytes get the EXIF orientation applied; PIL images are used
        as they are (as ModelScope does). Another type is a TypeError."""
        from PIL import Image as PILImage

        size = self.task.patch_image_size
        _check_input(image)
        if isinstance(image, PILImage.Image):
            return to_pixels(image, size)
        if isinstance(image, _PATH_TYPES):
            path = os.fsdecode(image)
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        else:
            data = bytes(image)
        return load_pixels(data, size, max_pixels=self.max_pixels)

    def classify_pixels(self, pixels: torch.Tensor, *, top_k: int = 5, decode: str = "exact"
                        ) -> list[list[tuple[str, float]]]:
        """(B,3,S,S) batch -> per image [(label, score)], best first. The batch is
        `pixels` (uint8, normalised here on the device) or `preprocess` (float) output.

        exact: the top_k labels with their probabilities under the model (what
        ModelScope's traverse mode computes); never empty. beam: ModelScope's
        beam search; scores are the finished beams' length-normalised log-probs,
        and an image whose beams all end without a label (the model's max_len /
        min_len leave none room) gets an empty list (make_prediction says why)."""
        import torch

        from ofacls.decoding import Stepper, beam_search, exact_topk

        if decode not in DECODE_MODES:
            raise UsageError(f"unknown decode mode {decode!r} (use exact or beam)")
        if top_k < 1:
            raise UsageError("--top-k must be at least 1")
        n = pixels.shape[0]
        beam = self.task.beam
        max_len = int(beam["max_len_a"] * len(self.prompt_ids) + beam["max_len_b"])
        positions = max(self.trie.max_tokens, max_len + 1) + 1
        with torch.inference_mode():
            ids = torch.tensor([self.prompt_ids] * n, device=self.device)
            if self.device.type == "cuda" and not pixels.is_pinned():
                pixels = pixels.pin_memory()  # lets the copy below run asynchronously
            images = pixels.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalise(images, *self.task.mean_std)
            images = images.to(self.dtype)
            memory = self.model.encode(ids, images, positions)
            stepper = Stepper(self.model, memory,
                              temperature=float(beam["temperature"]) if decode == "beam" else 1.0)
            if decode == "exact":
                found = exact_topk(stepper, self.trie, n, top_k)
                return [[(self.trie.names[i], math.exp(lp)) for i, lp in f] for f in found]
            found = beam_search(stepper, self.trie, n, beam, src_len=len(self.prompt_ids))
            return [[(self.trie.names[i], s) for i, s in f[:top_k]] for f in found]

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, top_k: int = 5,
                 decode: str = "exact") -> list[Prediction]:
        """Classify images in one batch: one input, or any iterable of them (read once).

        An input is a path (str or os.PathLike), the bytes of an image file
        (bytes, bytearray or memoryview: one image, never a sequence of ints)
        or a PIL image; anything else raises TypeError before any work. An
        input that cannot be read, or that beam search finishes no label for,
        gives a Prediction with `error` set; the others are still classified."""
        import torch

        inputs = _as_inputs(images)
        names = [_name(im) for im in inputs]
        tensors: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        for i, im in enumerate(inputs):
            try:
                tensors[i] = self.pixels(im)
            except InputError as e:
                errors[i] = str(e)
        results: dict[int, list[tuple[str, float]]] = {}
        if tensors:
            order = sorted(tensors)
            batch = torch.stack([tensors[i] for i in order])
            for i, res in zip(order, self.classify_pixels(batch, top_k=top_k, decode=decode)):
                results[i] = res
        return [make_prediction(names[i], results[i]) if i in results
                else Prediction.failed(names[i], errors[i]) for i in range(len(inputs))]


NO_BEAM_LABEL = ("beam search finished no label within the model's beam_search settings "
                 "(max_len, min_len); --decode exact always answers")


def make_prediction(name: str, ranked: list[tuple[str, float]]) -> Prediction:
    """One image's Prediction from its classify_pixels ranking (best first).

    The ranking is empty only where beam search finished no label: that image
    gets a failed Prediction saying so, not an answer."""
    if not ranked:
        return Prediction.failed(name, NO_BEAM_LABEL)
    label, score = ranked[0]
    return Prediction(input=name, label=label, score=score, top_k=list(ranked))


def _is_single_input(obj: object) -> TypeGuard[ImageInput]:
    from PIL import Image as PILImage

    return isinstance(obj, (*_PATH_TYPES, *_BYTES_TYPES, PILImage.Image))


def _check_input(image: object, what: str = "an object") -> None:
    """TypeError for what is not one image input. Checked before any work:
    bytes() of an int would allocate that many zero bytes."""
    if not _is_single_input(image):
        raise TypeError(f"cannot classify {what} of type {type(image).__name__!r}: give a path "
                        "(str or os.PathLike), image file bytes (bytes, bytearray, memoryview) "
                        "or a PIL image")


def _as_inputs(images: object) -> list[ImageInput]:
    """One input or an iterable of them -> a list, every element checked."""
    if _is_single_input(images):
        return [images]
    if not isinstance(images, Iterable):
        _check_input(images)  # neither one input nor several: raises
    inputs = list(cast("Iterable[object]", images))
    for i, im in enumerate(inputs):
        _check_input(im, f"images[{i}]")
    return cast("list[ImageInput]", inputs)


def _name(image: object) -> str:
    if isinstance(image, _PATH_TYPES):
        return os.fsdecode(image)
    return "<bytes>" if isinstance(image, _BYTES_TYPES) else "<image>"


def _set_threads() -> None:
    """Use every core for one forward at a time, without oversubscribing (once)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") is None:
        # the cores this process may run on (a container or taskset can give fewer
        # than the machine has); more threads than that only contend
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))
