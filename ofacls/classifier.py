"""The one place that wires images -> model -> decoding -> Prediction."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeGuard, Union, cast

from ofacls.errors import DeviceError, UsageError, debug
from ofacls.hub import DEFAULT_MODEL_ID
from ofacls.images import DEFAULT_MAX_PIXELS, load_pixels, normalise, to_pixels
from ofacls.labels import LabelTrie, encode_prompt
from ofacls.model.config import TaskConfig
from ofacls.model.folder import ModelFolder
from ofacls.prediction import Prediction
from ofacls.sources.expand import Source, is_url, read_source
from ofacls.sources.fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from PIL import Image
    from tokenizers import Tokenizer

    from ofacls.calibration import Calibration
    from ofacls.decoding import Stepper
    from ofacls.model.ofa import OFAModel
    from ofacls.runner import Item

# One image: a path, the bytes of an image file, or a decoded PIL image.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image"]
_PATH_TYPES = (str, os.PathLike)
_BYTES_TYPES = (bytes, bytearray, memoryview)
DECODE_MODES = ("exact", "beam")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The labels one call chooses from: the model's (None), some of them, or any strings.
Labels = Sequence[str] | LabelTrie | None


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


@contextlib.contextmanager
def _exact_fp32(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """TF32 off for an fp32 CUDA forward, and the caller's settings back after it.

    fp32 is the parity mode: TF32 convolutions and matmuls drift ~1e-3 from the
    CPU's answers. The flags are process-wide, so they are only borrowed."""
    import torch

    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    """An OFA image classifier loaded from a ModelScope model folder or id."""

    def __init__(self, model: OFAModel, trie: LabelTrie, prompt_ids: list[int], task: TaskConfig,
                 device: torch.device, dtype: torch.dtype, max_pixels: int | None,
                 folder: Path | None = None, model_labels: LabelTrie | None = None,
                 tokenizer: Tokenizer | None = None, vocab_size: int | None = None) -> None:
        self.model, self.task = model, task
        self.trie = trie  # the labels answers are chosen from when a call names none
        self.folder = folder  # the model folder it was loaded from, for reports
        self.prompt_ids = prompt_ids
        self.device, self.dtype = device, dtype
        self.max_pixels = max_pixels
        # the model's own labels and tokenizer, from which a call's own labels are made
        self.model_labels = model_labels or trie
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._chosen: dict[tuple[str, ...], LabelTrie] = {}
        self._chosen_lock = threading.Lock()  # a service's decode threads share them

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str] = DEFAULT_MODEL_ID, *,
                        device: str = "auto", precision: str = "auto",
                        labels: Sequence[str] | None = None,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        quantize: str | None = None, offline: bool | None = None,
                        cache_dir: str | os.PathLike[str] | None = None,
                        revision: str | None = None, progress: bool = False) -> Classifier:
        """Load a model: a local model folder, or a ModelScope id taken from the local
        cache, else downloaded on first use (never with `offline`, which defaults to
        the OFACLS_OFFLINE variable). `cache_dir` defaults to MODELSCOPE_CACHE, else
        ModelScope's own cache; `progress` shows download bars on stderr.

        `device`: auto (CUDA when available), cpu, cuda, cuda:N or mps. `precision`:
        auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16. `labels` restricts
        answers to those labels: some of the model's (they keep its class indices) or
        any strings its tokenizer spells (their indices their positions in `labels`:
        the model ranks them by the probability of their text); `quantize="int8"` swaps the
        Linear layers for dynamic int8 ones (CPU and fp32 only: faster, answers may
        differ slightly). Changes no process-wide setting (see `ofacls.tune_process`)."""
        import torch

        from ofacls.hub import env_offline, resolve_model
        from ofacls.model.weights import load_model

        if quantize not in (None, "none", "int8"):
            raise UsageError(f"unknown quantize {quantize!r} (use 'int8' or None)")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(precision, dev)
        if quantize == "int8" and (dev.type != "cpu" or torch_dtype != torch.float32):
            raise DeviceError("quantize='int8' needs the cpu device and fp32 precision")
        folder = ModelFolder.open(resolve_model(
            os.fspath(model), offline=env_offline() if offline is None else offline,
            cache_dir=cache_dir, revision=revision, progress=progress))
        cfg, task = folder.config, folder.checked_task()
        tokenizer = folder.tokenizer()
        label_file = folder.label_file()
        model_labels = LabelTrie.build(label_file.names, tokenizer, cfg.vocab_size, label_file.indices)
        # before the weights: a tokenizer that does not fit the model fails fast
        prompt = encode_prompt(tokenizer, task.prompt, task.max_src_length, cfg.vocab_size)
        trie = model_labels if labels is None else model_labels.choose(labels, tokenizer, cfg.vocab_size)
        net = load_model(folder.path, cfg, dev, torch_dtype)
        if dev.type in ("cpu", "cuda"):
            # the layout oneDNN and cuDNN run fastest; MPS keeps NCHW (not measured there)
            net.encoder.embed_images.use_channels_last()
        if quantize == "int8":
            with warnings.catch_warnings():  # torch.ao's deprecation notices are not ours
                warnings.simplefilter("ignore")
                net = torch.ao.quantization.quantize_dynamic(
                    net, _int8_linears(net), dtype=torch.qint8, inplace=True)
        return cls(net, trie, prompt, task, dev, torch_dtype, max_pixels, folder.path,
                   model_labels, tokenizer, cfg.vocab_size)

    @property
    def class_index(self) -> dict[str, int]:
        """Label name to its class index, for the labels answers are chosen from."""
        return self.trie.class_index

    # A service gets a few label sets from its clients again and again; each costs a
    # tokenisation and a trie, so the last few are kept.
    _CHOSEN_KEPT = 32

    def label_set(self, labels: Sequence[str] | LabelTrie | None) -> LabelTrie:
        """The trie a call with `labels` answers from: the default (`labels=None`), a
        subset of the model's labels with their class indices, or any other strings
        (indices their positions in `labels`), as `from_pretrained(labels=)` takes them."""
        if labels is None:
            return self.trie
        if isinstance(labels, LabelTrie):
            return labels
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of label strings, not one str")
        key = tuple(labels)
        with self._chosen_lock:
            trie = self._chosen.get(key)
        if trie is None:
            if self._tokenizer is None:
                raise UsageError("this classifier has no tokenizer to spell other labels with")
            # made outside the lock: another thread may make the same set meanwhile
            trie = self.model_labels.choose(key, self._tokenizer, self._vocab_size)
            with self._chosen_lock:
                if key not in self._chosen and len(self._chosen) >= self._CHOSEN_KEPT:
                    self._chosen.pop(next(iter(self._chosen)))
                self._chosen[key] = trie
        return trie

    @property
    def labels(self) -> list[str]:
        return self.trie.names

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: the precision `precision="auto"` resolved to."""
        return next(k for k, v in PRECISIONS.items() if str(self.dtype) == f"torch.{v}")

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input -> normalised (3, S, S) float32 CPU tensor, as the reference
        feeds its model. Thread-safe."""
        return normalise(self.pixels(image), *self.task.mean_std)

    def pixels(self, image: ImageInput, *, timeout: float = DEFAULT_TIMEOUT,
               max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """One input -> its resized RGB image, (3, S, S) uint8 on the CPU: what
        `classify_pixels` normalises on the model's device. Thread-safe.

        A str that is an http(s) URL is downloaded (within `timeout` seconds and
        `max_bytes`); other paths are read as files, under the same rules as
        `ofacls batch`. Paths and bytes get the EXIF orientation applied; PIL
        images are used as they are (as ModelScope does). Another type is a TypeError."""
        from PIL import Image as PILImage

        size = self.task.patch_image_size
        _check_input(image)
        if isinstance(image, PILImage.Image):
            return to_pixels(image, size)
        if isinstance(image, _PATH_TYPES):
            data = read_source(_source(image), timeout=timeout, max_bytes=max_bytes)
        else:
            data = bytes(image)
        return load_pixels(data, size, max_pixels=self.max_pixels)

    def classify_pixels(self, pixels: torch.Tensor, *, top_k: int = 5, decode: str = "exact",
                        labels: Labels = None, set_floor: float | None = None
                        ) -> list[list[tuple[str, float]]]:
        """(B,3,S,S) batch -> per image [(label, score)], best first. The batch is
        `pixels` (uint8, normalised here on the device) or `preprocess` (float) output.

        exact: the top_k labels with their probabilities under the model (what
        ModelScope's traverse mode computes); never empty. With `set_floor`, the
        list goes on past top_k to every label of at least that probability (a
        prediction set's labels). beam: ModelScope's beam search; scores are the
        finished beams' length-normalised log-probs, and an image whose beams all
        end without a label (the model's max_len / min_len leave none room) gets
        an empty list (predict_pixels says why). `labels`: as `label_set` takes them."""
        import torch

        from ofacls.decoding import beam_search, exact_topk

        _check_settings(top_k, decode)
        trie = self.label_set(labels)
        n = pixels.shape[0]
        beam = self.task.beam
        with torch.inference_mode(), _exact_fp32(self.device, self.dtype):
            stepper = self._stepper(pixels, trie, decode)
            if decode == "exact":
                floor = math.log(set_floor) if set_floor else None
                found = exact_topk(stepper, trie, n, top_k, min_logp=floor)
                return [[(trie.names[i], math.exp(lp)) for i, lp in f] for f in found]
            found = beam_search(stepper, trie, n, beam, src_len=len(self.prompt_ids))
            return [[(trie.names[i], s) for i, s in f[:top_k]] for f in found]

    def probabilities_of(self, pixels: torch.Tensor, answers: Sequence[str], *,
                         labels: Labels = None) -> list[float]:
        """The probability (exact decoding's) of label `answers[i]` for image i of the
        batch: one decoder call, whatever the label's rank. A calibration needs it
        for the true label of every image, ranked first or last."""
        import torch

        from ofacls.decoding import label_logprobs

        trie = self.label_set(labels)
        position = {name: i for i, name in enumerate(trie.names)}
        unknown = [a for a in answers if a not in position]
        if unknown:
            raise UsageError(f"{unknown[0]!r} is not one of the labels chosen from")
        with torch.inference_mode(), _exact_fp32(self.device, self.dtype):
            stepper = self._stepper(pixels, trie, "exact")
            return [math.exp(lp) for lp in label_logprobs(stepper, trie, [position[a] for a in answers])]

    def _stepper(self, pixels: torch.Tensor, trie: LabelTrie, decode: str) -> Stepper:
        """The batch encoded, ready to decode over `trie` (under inference_mode)."""
        import torch

        from ofacls.decoding import Stepper

        beam = self.task.beam
        positions = max(trie.max_tokens, beam.max_len(len(self.prompt_ids)) + 1) + 1
        ids = torch.tensor([self.prompt_ids] * pixels.shape[0], device=self.device)
        if self.device.type == "cuda" and not pixels.is_pinned():
            pixels = pixels.pin_memory()  # lets the copy below run asynchronously
        images = pixels.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalise(images, *self.task.mean_std)
        memory = self.model.encode(ids, images.to(self.dtype), positions)
        return Stepper(self.model, memory, temperature=beam.temperature if decode == "beam" else 1.0)

    def predict_pixels(self, pixels: Sequence[torch.Tensor], names: Sequence[str], *,
                       top_k: int = 5, decode: str = "exact", labels: Labels = None,
                       calibration: Calibration | None = None) -> list[Prediction]:
        """Classify loaded images (`pixels` output) as one batch: a Prediction each,
        named by `names`. When the batch fails (out of memory, say), each image gets
        its own try, so one image that cannot be classified fails alone. With a
        `calibration`, each Prediction holds its prediction set."""
        import torch

        if not pixels:
            return []
        trie = self.label_set(labels)
        floor = calibration.check_decode(decode) if calibration is not None else None

        def predict(batch: torch.Tensor, batch_names: Sequence[str]) -> list[Prediction]:
            ranked = self.classify_pixels(batch, top_k=top_k, decode=decode, labels=trie,
                                          set_floor=floor)
            return [self._prediction(n, r, trie, top_k, floor) for n, r in zip(batch_names, ranked)]

        try:
            return predict(torch.stack(list(pixels)), names)
        except UsageError:
            raise
        except Exception as e:  # whatever the engine raised for this batch
            if debug():
                raise
            if len(pixels) == 1:
                return [Prediction.failed(names[0], _failure(e))]
        out = []
        for name, x in zip(names, pixels):
            try:
                out.extend(predict(x[None], [name]))
            except Exception as e:  # this image alone: its row says why
                if debug():
                    raise
                out.append(Prediction.failed(name, _failure(e)))
        return out

    def _prediction(self, name: str, ranked: list[tuple[str, float]], trie: LabelTrie,
                    top_k: int, set_floor: float | None) -> Prediction:
        """One image's Prediction from its classify_pixels ranking (best first).

        The ranking is empty only where beam search finished no label; a score that
        is not a finite number means the model computed garbage, not an answer."""
        if not ranked:
            return Prediction.failed(name, NO_BEAM_LABEL)
        if not all(math.isfinite(s) for _, s in ranked):
            return Prediction.failed(name, NON_FINITE)
        label, score = ranked[0]
        kept = (None if set_floor is None
                else [lab for lab, p in ranked if p >= set_floor])
        return Prediction(input=name, label=label, score=score, top_k=list(ranked[:top_k]),
                          indices=[trie.class_index[lab] for lab, _ in ranked[:top_k]],
                          prediction_set=kept)

    def classify(self, images: Iterable[ImageInput] | ImageInput, *, top_k: int = 5,
                 decode: str = "exact", batch_size: int | None = None, workers: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                 labels: Labels = None, calibration: Calibration | None = None
                 ) -> list[Prediction]:
        """Classify one input, or any iterable of them (read once): a Prediction each, in order.

        An input is a path (str or os.PathLike), an http(s) URL (str), the bytes of
        an image file (bytes, bytearray or memoryview: one image, never a sequence
        of ints) or a PIL image; anything else raises TypeError before any work. An
        input that cannot be read, fetched, decoded or classified gives a Prediction
        with `error` set; the others are still classified.

        This is `ofacls batch`'s own path: inputs are loaded on `workers` threads
        while the model works through batches of `batch_size` (default: what suits
        the device), so memory stays bounded whatever the number of inputs; only the
        returned list grows. For millions of inputs, use `iter_classify`.

        `labels` chooses the labels for this call (as `from_pretrained` takes them:
        some of the model's, or any strings); `calibration` (`Calibration.load`)
        gives every Prediction its `prediction_set`."""
        inputs = _as_inputs(images)
        return list(self.iter_classify(inputs, top_k=top_k, decode=decode, batch_size=batch_size,
                                       workers=workers, timeout=timeout, max_bytes=max_bytes,
                                       labels=labels, calibration=calibration))

    def iter_classify(self, images: Iterable[ImageInput] | ImageInput, *, top_k: int = 5,
                      decode: str = "exact", batch_size: int | None = None,
                      workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                      max_bytes: int = DEFAULT_MAX_BYTES, labels: Labels = None,
                      calibration: Calibration | None = None) -> Iterator[Prediction]:
        """`classify`, lazily: yields each input's Prediction, in input order, as
        its batch is done; reads `images` only as far as it needs to (a generator of
        millions of paths is fine). An element of the wrong type raises TypeError
        when it is reached. Closing the iterator early stops the loader threads."""
        from ofacls import runner

        _check_settings(top_k, decode)
        if calibration is not None:
            calibration.check_decode(decode)
        default_batch, default_workers = runner.device_defaults(self.device.type)
        options = runner.Options(top_k=top_k, decode=decode, batch_size=batch_size or default_batch,
                                 workers=workers or default_workers, timeout=timeout,
                                 max_bytes=max_bytes, labels=self.label_set(labels),
                                 calibration=calibration)
        items = (_item(im) for im in ([images] if _is_single_input(images)
                                      else _iterable(images)))
        return runner.iter_predictions(items, self, options)


NO_BEAM_LABEL = ("beam search finished no label within the model's beam_search settings "
                 "(max_len, min_len); exact decoding always answers")
NON_FINITE = ("the model gave a score that is not a finite number (NaN or infinity): "
              "its weights are likely broken")


def _int8_linears(net: OFAModel) -> set[str]:
    """The linears `quantize="int8"` swaps: all but the decoder's cross-attention key
    and value projections, whose weights cross-attention reads as matrices (see
    `Attention.attend_encoded`): 5% of OFA-Large's weights and, read that way,
    next to none of its work."""
    import torch

    read_as_matrices = ("cross_attn.k_proj", "cross_attn.v_proj")
    return {name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)
            and not (name.startswith("decoder.") and name.endswith(read_as_matrices))}


def _failure(e: BaseException) -> str:
    return f"classification failed: {e or type(e).__name__}".splitlines()[0]


def _check_settings(top_k: int, decode: str) -> None:
    if decode not in DECODE_MODES:
        raise UsageError(f"unknown decode mode {decode!r} (use exact or beam)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be a whole number of at least 1, not {top_k!r}")


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


def _iterable(images: object) -> Iterable[object]:
    if not isinstance(images, Iterable):
        _check_input(images)  # neither one input nor several: raises
    return cast("Iterable[object]", images)


def _as_inputs(images: object) -> list[ImageInput]:
    """One input or an iterable of them -> a list, every element checked."""
    if _is_single_input(images):
        return [images]
    inputs = list(_iterable(images))
    for i, im in enumerate(inputs):
        _check_input(im, f"images[{i}]")
    return cast("list[ImageInput]", inputs)


def _source(path: str | os.PathLike[str]) -> Source:
    text = os.fsdecode(path)
    return Source(text, text, is_url(text) if isinstance(path, str) else False)


def _item(image: object) -> Item:
    """One library input as the runner's Item: paths and URLs are read on its
    loader threads, images already in memory are decoded there."""
    from ofacls.runner import Item

    _check_input(image)
    if isinstance(image, _PATH_TYPES):
        source = _source(image)
        return Item(source.name, source)
    name = "<bytes>" if isinstance(image, _BYTES_TYPES) else "<image>"
    return Item(name, image=cast("bytes | Image.Image", image))
