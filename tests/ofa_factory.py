"""Deterministic small OFA checkpoints in ModelScope's exact model-folder layout.

Tests and benchmarks build checkpoints with this module; the goldens in
``tests/goldens/`` were recorded by running ModelScope's own pipeline on folders
built by it (see ``tests/goldens/record.py``). Pure torch + tokenizers + json:
no ModelScope, no torchvision, no numpy.

A folder holds what ``make_tiny_ofa.py`` (and a published ModelScope OFA model)
holds: ``config.json``, ``configuration.json``, ``pytorch_model.bin`` (a pickled
plain state dict with exactly the keys, order, shapes and dtypes of ModelScope's
``OFAModel``; the three copies of the shared token table are one tensor, stored
once), ``vocab.json`` + ``merges.txt`` (a byte-level BPE in BART's id layout) and
``answer2label.json`` (the 1000 ImageNet class names).

Weights are reproducible bit for bit on any IEEE-754 machine: every random
number comes from ``torch.randint`` on a seeded CPU ``torch.Generator`` (a plain
Mersenne twister, serial) and is turned into a float with exact integer
arithmetic and single correctly-rounded float operations. No ``log``/``cos``
(whose last bits differ between CPU kernels) is involved. "Normal" draws are
Irwin-Hall sums of four uniforms scaled to unit variance: bell-shaped, bounded
by +-3.46 std, which is all random test weights need.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CheckpointSpec",
    "CheckpointCache",
    "PROMPT",
    "imagenet_labels",
    "build_state_dict",
    "state_dict_layout",
    "build_checkpoint",
    "write_configuration",
    "state_dict_digest",
    "tensors_digest",
    "tokenizer_digest",
    "expected_key_count",
    "RESNET_BLOCKS",
    "VOCAB_SIZE",
    "GOLDEN_SPECS",
    "GOLDENS_DIR",
    "IMAGES_DIR",
    "load_golden",
    "OWN_LABELS",
]

PROMPT = " what does the image describe?"
TESTS_DIR = Path(__file__).resolve().parent
LABELS_FILE = TESTS_DIR / "data" / "imagenet_labels.json"
GOLDENS_DIR = TESTS_DIR / "goldens"
IMAGES_DIR = TESTS_DIR / "images"

# BART layout: 50264 BPE entries + <mask> = 50265, then 8192 <code_i> and 1000 <bin_i>.
BPE_SIZE = 50265
VOCAB_SIZE = BPE_SIZE + 8192 + 1000  # 59457

# Bottleneck counts of the three stages ModelScope's OFA ResNet keeps (no layer4).
RESNET_BLOCKS = {
    "resnet18": (2, 2, 2),
    "resnet34": (3, 4, 6),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

TOKEN_BUCKET_SIZE = 256
MAX_POSITIONS = 1024
IMAGE_BUCKET_SIZE = 42
IMAGE_NUM_REL_DIS = (2 * IMAGE_BUCKET_SIZE - 1) ** 2 + 3  # 6892
CODE_IMAGE_SIZE = 128


@dataclass(frozen=True)
class CheckpointSpec:
    """What to build. Weights depend only on the architecture fields, ``seed``,
    the std fields and ``perturb``; ``gen_type``, ``beam``, ``no_repeat_ngram``,
    ``max_len_b``, ``min_len`` and ``valid_batch_size`` only go into
    configuration.json, and ``labels`` only into answer2label.json (the tokenizer
    stays the ImageNet-trained one), so two specs differing only there share weights."""

    d_model: int = 64
    heads: int = 4
    ffn: int = 128
    enc_layers: int = 2
    dec_layers: int = 2
    resnet: str = "resnet50"
    gen_type: str = "traverse"
    seed: int = 0
    # init_std of ModelScope's _init_weights: nn.Linear weights and nn.Embedding
    # tables are drawn with this std (unless embed_std / pos_std below say
    # otherwise). Conv weights use kaiming (fan_out, relu) like ModelScope's
    # ResNet. Written to config.json as init_std.
    std: float = 1.0
    # std of the shared token table E (encoder/decoder input, and the output
    # projection, so it sets the logit scale); None means ``std``.
    embed_std: float | None = None
    # std of everything positional: embed_positions / embed_image_positions
    # tables, the pos_q/k linears and the relative-position bias tables;
    # None means ``std``.
    pos_std: float | None = None
    # spread given to gains (around 1) and biases (around 0), like make_tiny_ofa
    perturb: float = 0.2
    beam: int = 5
    no_repeat_ngram: int = 0
    max_len_b: int = 16
    min_len: int = 1
    valid_batch_size: int = 20
    vocab: int = 2000  # BPE merges target size for the trained tokenizer
    # the label file's keys; None: the 1000 ImageNet class names
    labels: tuple[str, ...] | None = None

    def weights_only(self) -> CheckpointSpec:
        """The spec with the configuration-only fields set to defaults: equal
        for specs that build the same pytorch_model.bin."""
        return dataclasses.replace(
            self, gen_type="traverse", beam=5, no_repeat_ngram=0, max_len_b=16,
            min_len=1, valid_batch_size=20, labels=None,
        )

    def to_dict(self) -> dict:
        """The spec's fields; `labels` only where set (goldens recorded before it
        existed hold the same dict)."""
        d = dataclasses.asdict(self)
        if d["labels"] is None:
            del d["labels"]
        else:
            d["labels"] = list(d["labels"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointSpec:
        labels = d.get("labels")
        return cls(**{**d, "labels": None if labels is None else tuple(labels)})


# pos_std=0.1 on r50: smaller absolute position biases let attention follow content,
# which spreads the answers over more labels (5 traverse / 6 generation distinct top-1
# labels over the 12 readable test images, against 4 / 3 with pos_std=1.0); r101
# keeps ModelScope's uniform init_std (pos_std 0.1 did not help for its seed).
_R50 = CheckpointSpec(d_model=64, heads=4, ffn=128, enc_layers=2, dec_layers=2,
                      resnet="resnet50", seed=0, std=1.0, pos_std=0.1)
_R101 = CheckpointSpec(d_model=96, heads=6, ffn=160, enc_layers=3, dec_layers=2,
                       resnet="resnet101", seed=1, std=1.0)

# Label strings that are none of ImageNet's: a user's own classes, some sharing
# a first word (a branch in the trie), one a sentence, one with non-ASCII text.
OWN_LABELS = ("forklift", "pallet jack", "hand truck", "a photo taken indoors",
              "a photo taken outdoors", "crème brûlée", "stacked shipping containers")

# The checkpoints the goldens in tests/goldens/<name>.json were recorded from.
# Twins (r50_*, r101_*) share weights: only configuration.json differs.
GOLDEN_SPECS: dict[str, CheckpointSpec] = {
    "r50_traverse": dataclasses.replace(_R50, gen_type="traverse"),
    "r50_generation": dataclasses.replace(_R50, gen_type="generation", beam=5, no_repeat_ngram=0),
    # no_repeat_ngram 3 is ModelScope's own default when a configuration names none
    "r101_generation": dataclasses.replace(_R101, gen_type="generation", beam=5,
                                           no_repeat_ngram=3),
    "r101_traverse": dataclasses.replace(_R101, gen_type="traverse", beam=5, no_repeat_ngram=3),
    # the r50 weights answering among strings none of its labels are: ModelScope's
    # own pipeline on a folder whose answer2label.json holds them
    "r50_own_traverse": dataclasses.replace(_R50, gen_type="traverse", labels=OWN_LABELS),
    "r50_own_generation": dataclasses.replace(_R50, gen_type="generation", beam=5,
                                              no_repeat_ngram=0, labels=OWN_LABELS),
}


def load_golden(name: str) -> dict:
    """tests/goldens/<name>.json: {"name", "spec", "digest", "tokenizer_digest", "topk",
    "reference", "results": {image basename: reference row}}."""
    path = GOLDENS_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: record it with tests/goldens/record.py")
    return json.loads(path.read_text(encoding="utf-8"))


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names (torchvision's _IMAGENET_CATEGORIES),
    de-duplicated in order like make_tiny_ofa."""
    return list(dict.fromkeys(json.loads(LABELS_FILE.read_text(encoding="utf-8"))))


def expected_key_count(spec: CheckpointSpec) -> int:
    """ARCHITECTURE.md §10: 71 + 18*nblocks + 23*Le + 36*Ld."""
    return 71 + 18 * sum(RESNET_BLOCKS[spec.resnet]) + 23 * spec.enc_layers + 36 * spec.dec_layers


# --------------------------------------------------------------------------------------
# deterministic random numbers

_U_BITS = 24
_U_RANGE = 1 << _U_BITS


class _Rng:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator(device="cpu")
        self.g.manual_seed(seed)

    def _ints(self, n: int) -> torch.Tensor:
        return torch.randint(0, _U_RANGE, (n,), generator=self.g, dtype=torch.int64)

    def normal(self, shape: tuple[int, ...], mean: float, std: float) -> torch.Tensor:
        n = math.prod(shape)
        acc = self._ints(n)
        for _ in range(3):
            acc += self._ints(n)
        # sum of 4 U(0,1) has mean 2 and variance 1/3; all steps below are exact
        # except the single multiply and the final casts (each correctly rounded)
        x = (acc - 2 * _U_RANGE).to(torch.float64) * (math.sqrt(3.0) * std / _U_RANGE)
        if mean != 0.0:
            x = x + mean
        return x.to(torch.float32).reshape(shape)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        n = math.prod(shape)
        u = self._ints(n).to(torch.float64) * ((high - low) / _U_RANGE) + low
        return u.to(torch.float32).reshape(shape)


# --------------------------------------------------------------------------------------
# fixed buffers (exactly what ModelScope's modeling_ofa computes)


def token_rp_bucket(bucket_size: int = TOKEN_BUCKET_SIZE, max_position: int = MAX_POSITIONS):
    """make_token_bucket_position: tb[i, j] = g(i - j), int64 (max_position, max_position).

    g(r) = r + 255 for |r| <= 128, else sign(r)*(128 + ceil(127*ln(|r|/128)/ln(1023/128))) + 255.
    The ceil argument is exactly 127 at |r| = 1023 (ModelScope gets 510 there) and at least
    7e-4 away from an integer elsewhere, so a 1e-9 guard makes the table independent of
    the last bit of any libm's log."""
    mid = bucket_size // 2
    denom = math.log((max_position - 1) / mid)

    def g(r: int) -> int:
        if abs(r) <= mid:
            return r + bucket_size - 1
        x = math.log(abs(r) / mid) / denom * (mid - 1)
        v = math.ceil(x - 1e-9) + mid
        return (v if r > 0 else -v) + bucket_size - 1

    lut = torch.tensor([g(r) for r in range(-(max_position - 1), max_position)], dtype=torch.int64)
    rel = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    return lut[rel + max_position - 1]


def image_rp_bucket(bucket_size: int = IMAGE_BUCKET_SIZE, num_rel: int = IMAGE_NUM_REL_DIS):
    """make_image_bucket_position: (bs*bs+1, bs*bs+1) int64 over image position ids."""
    ids = torch.arange(bucket_size * bucket_size)
    r, c = ids // bucket_size, ids % bucket_size
    dr = r[:, None] - r[None, :] + bucket_size - 1
    dc = c[:, None] - c[None, :] + bucket_size - 1
    n = bucket_size * bucket_size + 1
    out = torch.zeros((n, n), dtype=torch.int64)
    out[1:, 1:] = dr * (2 * bucket_size - 1) + dc
    out[0, :] = num_rel - 3
    out[:, 0] = num_rel - 2
    out[0, 0] = num_rel - 1
    return out


def image_position_idx(window: int = CODE_IMAGE_SIZE // 8, bucket_size: int = IMAGE_BUCKET_SIZE):
    """decoder.image_position_idx: [0] + {r*42 + c + 1 : r, c < 16} + [1024]*768, int64."""
    grid = torch.arange(window)[None, :] + torch.arange(window)[:, None] * bucket_size + 1
    return torch.cat([
        torch.tensor([0], dtype=torch.int64),
        grid.reshape(-1).to(torch.int64),
        torch.full((768,), 1024, dtype=torch.int64),
    ])


# --------------------------------------------------------------------------------------
# state dict

# tensor kinds, for initialisation
_LIN_W = "linear_weight"  # normal(0, std)
_EMB = "embedding"  # normal(0, std)
_POS = "positional"  # normal(0, pos_std): position tables, pos_q/k linears, rel-pos tables
_TOK = "token_table"  # normal(0, embed_std)
_CONV = "conv"  # kaiming normal, fan_out, relu: std = sqrt(2 / (out * kh * kw))
_BIAS = "bias"  # 0 at init -> 0.5*perturb*N(0,1)
_GAIN = "gain"  # 1 at init -> 1 + perturb*N(0,1)  (LayerNorm/BatchNorm weight, c_attn)
_RMEAN = "running_mean"  # N(0, 0.1)
_RVAR = "running_var"  # U(0.5, 1.5)
_NBT = "num_batches_tracked"  # int64 scalar 0
_BUF = "buffer"  # fixed int64 buffer


def state_dict_layout(spec: CheckpointSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) in the order of ModelScope's OFAModel.state_dict()."""
    d, H, F = spec.d_model, spec.heads, spec.ffn
    V = VOCAB_SIZE
    out: list[tuple[str, tuple[int, ...], str]] = []

    def add(key, shape, kind):
        out.append((key, tuple(shape), kind))

    def linear(prefix, n_out, n_in, kind=_LIN_W):
        add(f"{prefix}.weight", (n_out, n_in), kind)
        add(f"{prefix}.bias", (n_out,), _BIAS)

    def ln(prefix, n):
        add(f"{prefix}.weight", (n,), _GAIN)
        add(f"{prefix}.bias", (n,), _BIAS)

    def bn(prefix, n):
        add(f"{prefix}.weight", (n,), _GAIN)
        add(f"{prefix}.bias", (n,), _BIAS)
        add(f"{prefix}.running_mean", (n,), _RMEAN)
        add(f"{prefix}.running_var", (n,), _RVAR)
        add(f"{prefix}.num_batches_tracked", (), _NBT)

    def attn(prefix):
        add(f"{prefix}.c_attn", (H,), _GAIN)
        for p in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(f"{prefix}.{p}", d, d)

    def ffn(prefix):
        linear(f"{prefix}.fc1", F, d)
        linear(f"{prefix}.fc2", d, F)
        ln(f"{prefix}.ffn_layer_norm", F)
        ln(f"{prefix}.final_layer_norm", d)

    n_pos = MAX_POSITIONS + 2
    n_img_pos = IMAGE_BUCKET_SIZE * IMAGE_BUCKET_SIZE + 1
    n_tok_rel = 2 * TOKEN_BUCKET_SIZE - 1

    # ---- encoder
    e = "encoder"
    add(f"{e}.image_rp_bucket", (n_img_pos, n_img_pos), _BUF)
    add(f"{e}.token_rp_bucket", (MAX_POSITIONS, MAX_POSITIONS), _BUF)
    ln(f"{e}.layernorm_embedding", d)
    add(f"{e}.embed_tokens.weight", (V, d), _TOK)
    add(f"{e}.type_embedding.weight", (2, d), _EMB)
    r = f"{e}.embed_images"
    add(f"{r}.conv1.weight", (64, 3, 7, 7), _CONV)
    bn(f"{r}.bn1", 64)
    inplanes = 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256), RESNET_BLOCKS[spec.resnet]), 1):
        for i in range(blocks):
            b = f"{r}.layer{s}.{i}"
            add(f"{b}.conv1.weight", (planes, inplanes, 1, 1), _CONV)
            bn(f"{b}.bn1", planes)
            add(f"{b}.conv2.weight", (planes, planes, 3, 3), _CONV)
            bn(f"{b}.bn2", planes)
            add(f"{b}.conv3.weight", (planes * 4, planes, 1, 1), _CONV)
            bn(f"{b}.bn3", planes * 4)
            if i == 0:
                add(f"{b}.downsample.0.weight", (planes * 4, inplanes, 1, 1), _CONV)
                bn(f"{b}.downsample.1", planes * 4)
            inplanes = planes * 4
    linear(f"{e}.image_proj", d, 1024)
    ln(f"{e}.patch_layernorm_embedding", d)
    add(f"{e}.embed_positions.weight", (n_pos, d), _POS)
    add(f"{e}.embed_image_positions.weight", (n_img_pos, d), _POS)
    ln(f"{e}.pos_ln", d)
    ln(f"{e}.image_pos_ln", d)
    linear(f"{e}.pos_q_linear", d, d, _POS)
    linear(f"{e}.pos_k_linear", d, d, _POS)
    for layer in range(spec.enc_layers):
        p = f"{e}.layers.{layer}"
        attn(f"{p}.self_attn")
        ln(f"{p}.self_attn_layer_norm", d)
        ln(f"{p}.self_attn_mid_layer_norm", d)
        ffn(p)
    ln(f"{e}.layer_norm", d)
    for layer in range(spec.enc_layers):
        add(f"{e}.token_rel_pos_table_list.{layer}.weight", (n_tok_rel, H), _POS)
    for layer in range(spec.enc_layers):
        add(f"{e}.image_rel_pos_table_list.{layer}.weight", (IMAGE_NUM_REL_DIS, H), _POS)

    # ---- decoder
    c = "decoder"
    add(f"{c}.image_position_idx", (1 + (CODE_IMAGE_SIZE // 8) ** 2 + 768,), _BUF)
    add(f"{c}.image_rp_bucket", (n_img_pos, n_img_pos), _BUF)
    add(f"{c}.token_rp_bucket", (MAX_POSITIONS, MAX_POSITIONS), _BUF)
    add(f"{c}.embed_tokens.weight", (V, d), _TOK)
    for layer in range(spec.dec_layers):
        p = f"{c}.layers.{layer}"
        attn(f"{p}.self_attn")
        ln(f"{p}.self_attn_layer_norm", d)
        ln(f"{p}.self_attn_mid_layer_norm", d)
        attn(f"{p}.cross_attn")
        ln(f"{p}.cross_attn_layer_norm", d)
        ln(f"{p}.cross_attn_mid_layer_norm", d)
        ffn(p)
    ln(f"{c}.layernorm_embedding", d)
    add(f"{c}.embed_positions.weight", (n_pos, d), _POS)
    add(f"{c}.embed_image_positions.weight", (n_img_pos, d), _POS)
    ln(f"{c}.pos_ln", d)
    ln(f"{c}.image_pos_ln", d)
    for name in ("self_pos_q_linear", "self_pos_k_linear", "cross_pos_q_linear",
                 "cross_pos_k_linear"):
        linear(f"{c}.{name}", d, d, _POS)
    ln(f"{c}.code_layernorm_embedding", d)
    ln(f"{c}.layer_norm", d)
    add(f"{c}.output_projection.weight", (V, d), _TOK)
    for layer in range(spec.dec_layers):
        add(f"{c}.token_rel_pos_table_list.{layer}.weight", (n_tok_rel, H), _POS)
    for layer in range(spec.dec_layers):
        add(f"{c}.image_rel_pos_table_list.{layer}.weight", (IMAGE_NUM_REL_DIS, H), _POS)
    return out


_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
         "decoder.output_projection.weight")


def build_state_dict(spec: CheckpointSpec) -> dict[str, torch.Tensor]:
    """The state dict, in ModelScope's key order. The three token-table keys
    hold the same tensor object."""
    if spec.resnet not in RESNET_BLOCKS:
        raise ValueError(f"unknown resnet {spec.resnet!r}")
    if spec.d_model % spec.heads:
        raise ValueError("d_model must be a multiple of heads")
    rng = _Rng(spec.seed)
    embed_std = spec.std if spec.embed_std is None else spec.embed_std
    pos_std = spec.std if spec.pos_std is None else spec.pos_std
    fixed = {
        "encoder.image_rp_bucket": image_rp_bucket,
        "encoder.token_rp_bucket": token_rp_bucket,
        "decoder.image_position_idx": image_position_idx,
        "decoder.image_rp_bucket": image_rp_bucket,
        "decoder.token_rp_bucket": token_rp_bucket,
    }
    sd: dict[str, torch.Tensor] = {}
    shared: torch.Tensor | None = None
    for key, shape, kind in state_dict_layout(spec):
        if kind == _TOK:
            if shared is None:
                shared = rng.normal(shape, 0.0, embed_std)
            t = shared
        elif kind == _BUF:
            t = fixed[key]()
        elif kind == _NBT:
            t = torch.tensor(0, dtype=torch.int64)
        elif kind in (_LIN_W, _EMB):
            t = rng.normal(shape, 0.0, spec.std)
        elif kind == _POS:
            t = rng.normal(shape, 0.0, pos_std)
        elif kind == _CONV:
            fan_out = shape[0] * shape[2] * shape[3]
            t = rng.normal(shape, 0.0, math.sqrt(2.0 / fan_out))
        elif kind == _GAIN:
            t = rng.normal(shape, 1.0, spec.perturb)
        elif kind == _BIAS:
            t = rng.normal(shape, 0.0, 0.5 * spec.perturb)
        elif kind == _RMEAN:
            t = rng.normal(shape, 0.0, 0.1)
        elif kind == _RVAR:
            t = rng.uniform(shape, 0.5, 1.5)
        else:  # pragma: no cover
            raise AssertionError(kind)
        assert tuple(t.shape) == shape, (key, t.shape, shape)
        sd[key] = t
    return sd


# --------------------------------------------------------------------------------------
# config files


def _config_json(spec: CheckpointSpec) -> dict:
    """What OFAConfig(...).to_dict() gives for make_tiny_ofa's arguments
    (transformers 4.57.6), with this spec's sizes."""
    return {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "add_type_embedding": True,
        "architectures": ["OFAModel"],
        "attention_dropout": 0.0,
        "attn_scale_factor": 2.0,
        "bos_token_id": 0,
        "classifier_dropout": 0.0,
        "code_image_size": CODE_IMAGE_SIZE,
        "code_layernorm_embedding": True,
        "d_model": spec.d_model,
        "decoder_attention_heads": spec.heads,
        "decoder_drop_path_rate": 0.0,
        "decoder_ffn_dim": spec.ffn,
        "decoder_layerdrop": 0.0,
        "decoder_layers": spec.dec_layers,
        "decoder_normalize_before": True,
        "decoder_start_token_id": 0,
        "disable_entangle": False,
        "dropout": 0.1,
        "dtype": "float32",
        "encoder_attention_heads": spec.heads,
        "encoder_drop_path_rate": 0.0,
        "encoder_ffn_dim": spec.ffn,
        "encoder_layerdrop": 0.0,
        "encoder_layers": spec.enc_layers,
        "encoder_normalize_before": True,
        "entangle_position_embedding": False,
        "eos_token_id": 2,
        "exclude_mlp": True,
        "forced_eos_token_id": 2,
        "gamma": 1.0,
        "image_bucket_size": IMAGE_BUCKET_SIZE,
        "init_std": spec.std,
        "interpolate_position": False,
        "is_encoder_decoder": True,
        "layernorm_embedding": True,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_dim": 512,
        "model_type": "ofa",
        "normformer": True,
        "num_hidden_layers": spec.enc_layers,
        "orig_patch_image_size": 224,
        "pad_token_id": 1,
        "patch_layernorm_embedding": True,
        "remove_decoder_type_embedding": False,
        "resnet_drop_path_rate": 0.0,
        "resnet_model_path": None,
        "resnet_type": spec.resnet,
        "scale_embedding": False,
        "share_attn_bias": False,
        "share_decoder_input_output_embed": True,
        "temperature_init_value": None,
        "token_bucket_size": TOKEN_BUCKET_SIZE,
        "transformers_version": "4.57.6",
        "use_cache": False,
        "use_gamma_feature": False,
        "use_image_feature": True,
        "use_ofasys": False,
        "vit_drop_path_rate": 0.0,
        "vit_type": "vit_base",
        "vocab_size": VOCAB_SIZE,
    }


def _configuration_json(spec: CheckpointSpec) -> dict:
    return {
        "framework": "pytorch",
        "task": "image-classification",
        "pipeline": {"type": "image-classification"},
        "model": {
            "type": "ofa",
            "language": "en",
            "gen_type": spec.gen_type,
            "answer2label": "answer2label.json",
            "patch_image_size": 480,
            "max_image_size": 480,
            "prompt": PROMPT,
            "beam_search": {
                "beam_size": spec.beam,
                "max_len_b": spec.max_len_b,
                "min_len": spec.min_len,
                "no_repeat_ngram_size": spec.no_repeat_ngram,
            },
            "valid_batch_size": spec.valid_batch_size,
        },
        "preprocessor": {},
    }


def write_configuration(folder: Path, spec: CheckpointSpec) -> None:
    """(Re)write configuration.json, and answer2label.json where the spec names its
    own labels: switches a folder between gen_type / beam settings / label sets
    without touching its weights or tokenizer."""
    Path(folder, "configuration.json").write_text(
        json.dumps(_configuration_json(spec), indent=2), encoding="utf-8")
    if spec.labels is not None:
        path = Path(folder, "answer2label.json")
        path.unlink(missing_ok=True)  # may be a hard link to another folder's file
        path.write_text(json.dumps({label: i for i, label in enumerate(spec.labels)}),
                        encoding="utf-8")


def _write_tokenizer(folder: Path, labels: list[str], vocab_target: int) -> None:
    from tokenizers import ByteLevelBPETokenizer

    corpus = [" " + label for label in labels] + [PROMPT] * 5
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus, vocab_size=vocab_target, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok.save_model(str(folder))
    vocab_path = folder / "vocab.json"
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    # pad to BART's 50264 entries, then <mask> = 50264
    for i in range(len(vocab), BPE_SIZE - 1):
        vocab[f"<unused_{i}>"] = i
    vocab["<mask>"] = len(vocab)
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")


def build_checkpoint(folder: Path, spec: CheckpointSpec) -> Path:
    """Write a complete ModelScope OFA classification model folder for ``spec``
    into ``folder`` (created if needed) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = imagenet_labels()
    _write_tokenizer(folder, labels, spec.vocab)
    (folder / "answer2label.json").write_text(
        json.dumps({label: i for i, label in enumerate(labels)}), encoding="utf-8")
    (folder / "config.json").write_text(
        json.dumps(_config_json(spec), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_configuration(folder, spec)
    sd = build_state_dict(spec)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


# --------------------------------------------------------------------------------------
# a run's checkpoints

_WEIGHT_FILES = ("pytorch_model.bin", "config.json", "vocab.json", "merges.txt",
                 "answer2label.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _spec_key(spec: CheckpointSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class CheckpointCache:
    """Builds each distinct set of weights once per run, in a folder that every
    process of the run shares: xdist's workers, and a test's own pytest subprocess
    (told the folder through OFACLS_TEST_CHECKPOINTS). A spec that only differs in
    configuration.json (gen_type, beam, ...) gets its own folder whose weight and
    tokenizer files are hard links (or copies) of its weights' build. A folder is
    built under a temporary name and renamed into place under a file lock, so a
    process sees a whole folder or none."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get(self, spec: CheckpointSpec, name: str | None = None) -> Path:
        folder = self.root / f"{name or 'ckpt'}-{_spec_key(spec)}"
        if folder.exists():
            return folder
        with self._locked():
            if folder.exists():
                return folder
            base = spec.weights_only()
            weights = self.root / f"weights-{_spec_key(base)}"
            if not weights.exists():
                build_checkpoint(self.root / f".building-{weights.name}", base).rename(weights)
            building = self.root / f".building-{folder.name}"
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            for f in _WEIGHT_FILES:
                _link_or_copy(weights / f, building / f)
            write_configuration(building, spec)
            building.rename(folder)
        return folder


# --------------------------------------------------------------------------------------
# digests


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def tensors_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, each with dtype, shape and raw (little-endian) bytes."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def state_dict_digest(folder: Path) -> str:
    """Digest of ``folder/pytorch_model.bin`` (see tensors_digest)."""
    sd = torch.load(Path(folder) / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return tensors_digest(sd)


def tokenizer_digest(folder: Path) -> str:
    """sha256 of vocab.json + merges.txt + answer2label.json: everything besides the
    weights that the reference's answers depend on."""
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt", "answer2label.json"):
        h.update(name.encode() + b"\0")
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()
