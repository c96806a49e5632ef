"""The one place that wires images -> model -> decoding -> Prediction."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union, cast

from ofacls.errors import DeviceError, InputError, UsageError
from ofacls.images import DEFAULT_MAX_PIXELS, load_pixels, to_pixels
from ofacls.labels import LabelTrie, encode_prompt, load_tokenizer, read_label_names
from ofacls.model.config import OFAConfig, TaskConfig, read_json
from ofacls.prediction import Prediction

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ofacls.model.ofa import OFAModel

ImageInput = Union[str, Path, bytes, "Image.Image"]
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
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        cfg = OFAConfig.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        task = TaskConfig.from_dict(read_json(folder / "configuration.json"),
                                    str(folder / "configuration.json"))
        tokenizer = load_tokenizer(folder)
        trie = LabelTrie.build(read_label_names(folder / task.answer2label), tokenizer)
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
        _keep_freed_memory()
        prompt = encode_prompt(tokenizer, task.prompt, task.max_src_length)
        return cls(model, trie, prompt, task, dev, torch_dtype, max_pixels)

    @property
    def labels(self) -> list[str]:
        return self.trie.names

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input -> normalised (3, S, S) float32 CPU tensor. Thread-safe.

        Paths and bytes get the EXIF orientation applied; PIL images are used
        as they are (as ModelScope does)."""
        from PIL import Image as PILImage

        mean, std = self.task.mean_std
        size = self.task.patch_image_size
        if isinstance(image, PILImage.Image):
            return to_pixels(image, size, mean, std)
        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise InputError(f"cannot read {image}: {e.strerror or e}") from None
        else:
            data = bytes(image)
        return load_pixels(data, size, mean, std, max_pixels=self.max_pixels)

    def classify_pixels(self, pixels: torch.Tensor, *, top_k: int = 5, decode: str = "exact"
                        ) -> list[list[tuple[str, float]]]:
        """(B,3,S,S) preprocessed batch -> per image [(label, score)], best first.

        exact: the top_k labels with their probabilities under the model (what
        ModelScope's traverse mode computes). beam: ModelScope's beam search;
        scores are the finished beams' length-normalised log-probs."""
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
            images = pixels.to(self.device, non_blocking=True).to(self.dtype)
            memory = self.model.encode(ids, images, positions)
            stepper = Stepper(self.model, memory)
            if decode == "exact":
                found = exact_topk(stepper, self.trie, n, top_k)
                return [[(self.trie.names[i], math.exp(lp)) for i, lp in f] for f in found]
            found = beam_search(stepper, self.trie, n, beam, src_len=len(self.prompt_ids))
            return [[(self.trie.names[i], s) for i, s in f[:top_k]] for f in found]

    def classify(self, images: Sequence[ImageInput] | ImageInput, *, top_k: int = 5,
                 decode: str = "exact") -> list[Prediction]:
        """Classify images (paths, bytes or PIL images) in one batch.

        An input that cannot be read gives a Prediction with `error` set; the
        others are still classified."""
        import torch

        if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        images = cast("list[ImageInput]", list(images))
        names = [_name(im) for im in images]
        tensors: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        for i, im in enumerate(images):
            try:
                tensors[i] = self.preprocess(im)
            except InputError as e:
                errors[i] = str(e)
        results: dict[int, list[tuple[str, float]]] = {}
        if tensors:
            order = sorted(tensors)
            batch = torch.stack([tensors[i] for i in order])
            for i, res in zip(order, self.classify_pixels(batch, top_k=top_k, decode=decode)):
                results[i] = res
        return [make_prediction(names[i], results[i]) if i in results
                else Prediction.failed(names[i], errors[i]) for i in range(len(images))]


def make_prediction(name: str, ranked: list[tuple[str, float]]) -> Prediction:
    label, score = ranked[0]
    return Prediction(input=name, label=label, score=score, top_k=list(ranked))


def _name(image: object) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return "<bytes>" if isinstance(image, (bytes, bytearray)) else "<image>"


def _set_threads() -> None:
    """Use every core for one forward at a time, without oversubscribing (once)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") is None:
        # the cores this process may run on (a container or taskset can give fewer
        # than the machine has); more threads than that only contend
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))


def _keep_freed_memory() -> None:
    """Let glibc reuse freed activations instead of handing them back to the kernel.

    glibc serves every block over its mmap threshold (adaptive, at most 32 MB) with
    a fresh mmap and unmaps it on free, so each encoder activation (15 MB per
    image at OFA-Large size) is page-faulted in anew: ~160k faults, 0.1-0.2 s per
    image on CPU. Fixed high thresholds keep freed blocks in the heap.

    Kept blocks stay in the arena of the thread that freed them, and glibc gives
    each thread its own: four loader threads that each once decoded a 100 MP
    scan would keep ~1 GB apiece. One arena lets every thread reuse what any
    freed (decoding four 81 MP PNGs: 1.5 GB peak instead of 3.6 GB); allocations
    are few and large here, so its lock costs nothing measurable.

    Skipped where libc is not glibc or the user tuned the allocator: another one
    preloaded, or glibc's own thresholds set (MALLOC_*_ variables other than
    MALLOC_ARENA_MAX, which platforms often set; GLIBC_TUNABLES glibc.malloc.*).
    A MALLOC_ARENA_MAX that is set is left to rule the arenas."""
    import platform

    from ofacls.model.weights import libc

    env = os.environ
    if (platform.libc_ver()[0] != "glibc" or "malloc" in env.get("LD_PRELOAD", "")
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") and k != "MALLOC_ARENA_MAX" for k in env)):
        return
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    # older glibc refuses thresholds above 32 MB: fall back to that
    if not mallopt(m_mmap_threshold, 1 << 30):
        mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    if "MALLOC_ARENA_MAX" not in env:
        mallopt(m_arena_max, 1)

