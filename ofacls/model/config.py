"""What a ModelScope OFA classification folder says about itself.

`config.json` describes the network (HF-style OFAConfig); `configuration.json`
describes the task (prompt, image size, decoding). Only the settings the
classification path uses are read; settings that would change the computation
in ways this engine does not implement are refused rather than ignored.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ofacls.errors import CheckpointError

# ResNet stage depths as OFA's resnet.py builds them: always Bottleneck blocks
# and only three stages, so resnet18/34 are not the torchvision ones.
RESNET_LAYERS = {
    "resnet18": (2, 2, 2),
    "resnet34": (3, 4, 6),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

DEFAULT_PROMPT = " what does the image describe?"
# The trunk's stem convolution, its max-pool and the first blocks of layer2 and
# layer3 each halve the image (rounding up): S px -> ceil(S / 16) tokens per side.
FEATURE_STRIDE = 16

# config.json settings whose other values select code paths we do not implement.
_REQUIRED_FLAGS = {
    "normformer": True,
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "add_type_embedding": True,
    "entangle_position_embedding": False,
    "share_attn_bias": False,
    "scale_embedding": False,
    "use_gamma_feature": False,
    "exclude_mlp": True,
    "use_ofasys": False,
    "share_decoder_input_output_embed": True,
    "interpolate_position": False,
}


# What a setting must be: a test of its JSON value, and the words for the message.
# bool is an int subclass in Python, but `true` where a size belongs is a slip, not 1.
_Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # json.loads reads NaN and Infinity too
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_POSITIVE_INT: _Check = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_COUNT: _Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
_POSITIVE: _Check = (lambda v: _is_number(v) and v > 0, "a positive number")
_NON_NEGATIVE: _Check = (lambda v: _is_number(v) and v >= 0, "a non-negative number")
_NUMBER: _Check = (_is_number, "a number")
_TEXT: _Check = (lambda v: isinstance(v, str), "a string")
_FLAG: _Check = (lambda v: isinstance(v, bool), "true or false")

# config.json settings the network is built from (absent ones take the defaults below).
_NETWORK_CHECKS: dict[str, _Check] = {
    **dict.fromkeys(("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                     "decoder_ffn_dim", "token_bucket_size", "image_bucket_size",
                     "max_position_embeddings"), _POSITIVE_INT),
    "resnet_type": _TEXT,
    "attn_scale_factor": _POSITIVE,  # raised to the power -0.5
}

# Upper bounds on config.json's sizes, far above OFA-Huge's (d_model 1280, 24 + 12
# layers, 16 heads, ffn 5120, 1024 positions, 42-cell image grid). A size decides
# how much is allocated before the weights can be compared with it: the index
# buffers a file lacks are built from it (1024 positions: 80 MB at the peak,
# 2048: 170 MB, 16000: over 8 GB), and the network is laid out layer by layer.
_SIZE_BOUNDS = {
    "vocab_size": 1_000_000,
    "d_model": 16384,
    "encoder_layers": 256,
    "decoder_layers": 256,
    "encoder_attention_heads": 1024,
    "decoder_attention_heads": 1024,
    "encoder_ffn_dim": 65536,
    "decoder_ffn_dim": 65536,
    "token_bucket_size": 4096,
    "image_bucket_size": 64,  # a 64x64 grid takes 1024-px images; its bucket table peaks at 390 MB
    "max_position_embeddings": 2048,
}

# configuration.json's model.beam_search settings that decoding reads.
_BEAM_CHECKS: dict[str, _Check] = {
    "beam_size": _POSITIVE_INT,
    "max_len_a": _NON_NEGATIVE,
    "max_len_b": _COUNT,
    "min_len": _COUNT,
    "no_repeat_ngram_size": _COUNT,
    "len_penalty": _NUMBER,
    "unk_penalty": _NUMBER,
    "temperature": _POSITIVE,  # divides the logits in beam mode
    "normalize_scores": _FLAG,
}

# configuration.json's model settings besides gen_type and beam_search.
_TASK_CHECKS: dict[str, _Check] = {
    "prompt": _TEXT,
    "patch_image_size": _POSITIVE_INT,
    # null: ModelScope's `if cfg.model.get(...)` reads it as false, and so did we
    "imagenet_default_mean_and_std": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "max_src_length": _POSITIVE_INT,
    # null or "" mean the default name, as they did before these checks
    "answer2label": (lambda v: v is None or isinstance(v, str), "a file name"),
}


def _check_values(section: dict[str, Any], checks: dict[str, _Check], source: str,
                  prefix: str = "") -> None:
    """Refuse the first setting of `section` that `checks` names and its value fails,
    naming the file and the setting (`prefix` + key: where it sits in the file)."""
    for key, (ok, want) in checks.items():
        if key in section and not ok(section[key]):
            raise CheckpointError(f"{source}: {prefix}{key} must be {want}, "
                                  f"not {_show(section[key])}")


def _show(value: Any) -> str:
    """The value as the message quotes it, cut short: the message stays one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class OFAConfig:
    """Network shape. Field names follow config.json; a setting config.json lacks
    takes ModelScope's OFAConfig default (an OFA-Base-like 512-wide network, not
    OFA-Large), as ModelScope's loader does."""

    vocab_size: int = 59457  # BART's 50265 + 8192 <code_i> + 1000 <bin_i> tokens
    d_model: int = 512
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    resnet_type: str = "resnet101"
    # attention logits are scaled by (head_dim * attn_scale_factor) ** -0.5, not head_dim ** -0.5
    attn_scale_factor: float = 2.0
    token_bucket_size: int = 256  # 1-D relative buckets for text: 2 * 256 - 1 = 511 rows
    image_bucket_size: int = 42  # image grid side for 2-D buckets; feature maps must fit in it
    # rows of each position table (plus 2); also the decoder's longest answer
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    temperature_init_value: float | None = None
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    # the shape settings config.json lacks (so took the defaults above): named
    # when the weights then do not fit, since that is the likely reason
    defaulted: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> OFAConfig:
        if raw.get("model_type", "ofa") != "ofa":
            raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, not 'ofa'")
        for key, want in _REQUIRED_FLAGS.items():
            if key in raw and raw[key] != want:
                raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (need {want!r})")
        if raw.get("activation_function", "gelu") != "gelu":
            raise CheckpointError(f"{source}: activation {raw['activation_function']!r} unsupported")
        if raw.get("temperature_init_value") is not None:
            raise CheckpointError(f"{source}: temperature_init_value is not supported")
        _check_values(raw, _NETWORK_CHECKS, source)
        for key, bound in _SIZE_BOUNDS.items():
            if key in raw and raw[key] > bound:
                raise CheckpointError(f"{source}: {key} {raw[key]:,} is beyond what an OFA "
                                      f"model uses (at most {bound:,} here)")
        known = set(cls.__dataclass_fields__) - {"defaulted"}
        defaulted = tuple(k for k in _NETWORK_CHECKS if k not in raw)
        cfg = cls(**{k: v for k, v in raw.items() if k in known}, defaulted=defaulted)
        if cfg.resnet_type not in RESNET_LAYERS:
            raise CheckpointError(f"{source}: unknown resnet_type {cfg.resnet_type!r}")
        for heads in (cfg.encoder_attention_heads, cfg.decoder_attention_heads):
            if cfg.d_model % heads:
                raise CheckpointError(f"{source}: d_model {cfg.d_model} not divisible by {heads} heads")
        return cfg

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        return RESNET_LAYERS[self.resnet_type]


@dataclass(frozen=True)
class BeamSettings:
    """configuration.json's model.beam_search over ModelScope's defaults (those of
    OfaForAllTasks, then of its fairseq-style SequenceGenerator)."""

    beam_size: int = 5  # hypotheses kept per image and step
    # an answer has at most max_len_a * (prompt tokens) + max_len_b tokens before </s>
    max_len_a: float = 0.0
    max_len_b: int = 16
    min_len: int = 1  # </s> is banned at steps before this one
    no_repeat_ngram_size: int = 3  # no n-gram of the answer (with <s>) may repeat; 0: no ban
    len_penalty: float = 1.0  # a finished score is divided by length ** len_penalty
    temperature: float = 1.0  # divides the logits before the softmax
    unk_penalty: float = 0.0  # subtracted from <unk>'s log-prob
    normalize_scores: bool = True  # whether finished scores are divided by the length at all

    def max_len(self, src_len: int) -> int:
        """The longest answer for a prompt of `src_len` tokens (<s> and </s> included)."""
        return int(self.max_len_a * src_len + self.max_len_b)

    @classmethod
    def from_dict(cls, given: dict[str, Any], source: str,
                  prefix: str = "model.beam_search.") -> BeamSettings:
        """`given`'s settings over the defaults; settings this engine does not read
        are ignored, unless they would change the answers (those are refused)."""
        _check_values(given, _BEAM_CHECKS, source, prefix)
        for key, default in _BEAM_UNSUPPORTED.items():
            if given.get(key, default) != default:
                raise CheckpointError(f"{source}: {prefix}{key}={_show(given[key])} is not supported")
        fields = cls.__dataclass_fields__
        # JSON has one number type: 0 where a float belongs is a float here
        values: dict[str, Any] = {k: (float(v) if fields[k].type == "float" else v)
                                  for k, v in given.items() if k in fields}
        beam = cls(**values)
        if beam.max_len_a == 0 and beam.min_len > beam.max_len_b:
            # every hypothesis would have to end before it may: fairseq asserts this too
            raise CheckpointError(f"{source}: {prefix}min_len {beam.min_len} is "
                                  f"more than max_len_b {beam.max_len_b}: no answer could end")
        return beam


# SequenceGenerator settings that change what it searches for, and the values
# under which they do nothing: other values are refused, not ignored.
_BEAM_UNSUPPORTED: dict[str, Any] = {"match_source_len": False, "ignore_eos": False,
                                     "zero_shot": False, "gen_code": False, "gen_box": False,
                                     "constraint_range": None}


@dataclass(frozen=True)
class TaskConfig:
    """The task half of a model folder (configuration.json's `model` section)."""

    prompt: str = DEFAULT_PROMPT
    patch_image_size: int = 480
    imagenet_default_mean_and_std: bool = False
    gen_type: str = "generation"  # "generation" (beam search) or "traverse" (score every label)
    # the label file's name; None where configuration.json names none (ModelScope
    # then builds no trie and generates free text: not a classifier ofacls can run)
    answer2label: str | None = "answer2label.json"
    max_src_length: int = 256  # prompt tokens kept (the rest is cut)
    beam: BeamSettings = BeamSettings()

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.imagenet_default_mean_and_std:
            return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "configuration.json") -> TaskConfig:
        task = raw.get("task")
        if task not in (None, "image-classification", "image_classification"):
            raise CheckpointError(f"{source}: task is {task!r}, not image-classification")
        model = raw.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{source}: no 'model' section")
        if model.get("type", "ofa") != "ofa":
            raise CheckpointError(f"{source}: model type {model.get('type')!r} is not 'ofa'")
        if model.get("language", "en") != "en":
            raise CheckpointError(f"{source}: language {model['language']!r}: only English OFA "
                                  "classification models are supported")
        gen_type = model.get("gen_type", "generation")
        if gen_type not in ("generation", "traverse"):
            raise CheckpointError(f"{source}: unknown gen_type {gen_type!r}")
        _check_values(model, _TASK_CHECKS, source, "model.")
        given = model.get("beam_search")
        if given is not None and not isinstance(given, dict):
            raise CheckpointError(f"{source}: model.beam_search must be a JSON object, "
                                  f"not {_show(given)}")
        return cls(
            prompt=model.get("prompt", DEFAULT_PROMPT),
            patch_image_size=model.get("patch_image_size", 480),
            imagenet_default_mean_and_std=bool(model.get("imagenet_default_mean_and_std")),
            gen_type=gen_type,
            answer2label=model.get("answer2label") or None,
            max_src_length=model.get("max_src_length", 256),
            beam=BeamSettings.from_dict(given or {}, source),
        )


def check_task_fits(task: TaskConfig, cfg: OFAConfig, source: str) -> None:
    """Refuse task settings the network cannot run (`source` is configuration.json's
    path): an image too large for its position grid, answers too long for its
    decoder positions. Otherwise every image would fail, one by one."""
    check_image_fits(task, cfg, source)
    # fairseq's generator caps max_len at the decoder's positions - 1; ModelScope's
    # does not and indexes past the table once a search gets that far. Refused here.
    longest = task.beam.max_len(task.max_src_length + 2)  # <s> prompt </s>
    limit = cfg.max_position_embeddings - 2  # <s> and the step after the last token need rows
    if longest > limit:
        raise CheckpointError(
            f"{source}: model.beam_search allows answers of {longest} tokens, more than this "
            f"model's decoder positions allow ({limit}: config.json's max_position_embeddings - 2)")


def check_image_fits(task: TaskConfig, cfg: OFAConfig, source: str) -> None:
    """Refuse a patch_image_size whose feature map exceeds the network's image
    position grid: otherwise every image would fail in the encoder, one by one.
    `source` is configuration.json's path."""
    side = math.ceil(task.patch_image_size / FEATURE_STRIDE)
    grid = cfg.image_bucket_size
    if side > grid:
        raise CheckpointError(
            f"{source}: model.patch_image_size {task.patch_image_size} is too large for this "
            f"model: its {side}x{side} feature map exceeds the {grid}x{grid} position grid "
            f"(config.json's image_bucket_size); at most {grid * FEATURE_STRIDE}")


# A model folder's JSON and tokenizer files are kilobytes to a few MB (OFA's
# vocab.json: 1.2 MB); a bigger one is refused before it is read, so a file of
# absurd size cannot take the memory its parse would need.
MAX_SMALL_FILE_BYTES = 32 * 2**20


def check_regular_file(path: Path, what: str = "", max_bytes: int | None = None) -> os.stat_result:
    """Refuse `path` unless it is a regular file (after links) of at most `max_bytes`.

    A FIFO would block whoever opens it, and a device (/dev/zero) never ends:
    both are refused by their status, before anything opens them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what + ' ' if what else ''}missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    _check_status(path, st, max_bytes)
    return st


def _check_status(path: Path, st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_big(path, f"{st.st_size:,} bytes", max_bytes)


def _too_big(path: Path, size: str, max_bytes: int) -> CheckpointError:
    return CheckpointError(f"{path}: {size}, more than a model folder's file of this kind "
                           f"may hold ({max_bytes:,} bytes)")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def read_small_file(path: Path, what: str = "", max_bytes: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; anything else is a CheckpointError.

    Checked by status before opening, and again on the open descriptor (the file
    may have been replaced in between). O_NONBLOCK makes opening a FIFO return at
    once rather than wait for a writer; on a regular file it changes nothing.
    At most `max_bytes` + 1 bytes are read, whatever the size said."""
    check_regular_file(path, what, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        _check_status(path, os.fstat(fd), max_bytes)
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > max_bytes:  # it grew after its size was checked
        raise _too_big(path, f"over {max_bytes:,} bytes", max_bytes)
    return data


def load_json(path: Path, what: str = "",
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse a model folder's JSON file, naming the file (and `what` it is) in every failure.
    `object_pairs_hook` is json.loads' (to see keys that appear twice, for one). Only a
    regular file of at most MAX_SMALL_FILE_BYTES is read."""
    data = read_small_file(path, what)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    # ValueError: besides malformed JSON, an integer of more than 4300 digits
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path}: not valid JSON ({reason})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON object (config.json, configuration.json)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
