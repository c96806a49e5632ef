"""Model folder -> loaded OFAModel: read the checkpoint without executing pickled
code, remap ModelScope's keys onto ours with one pure function, load strictly."""

from __future__ import annotations

import ctypes
import math
import mmap
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ofacls.errors import CheckpointError
from ofacls.libc import libc
from ofacls.model.config import OFAConfig
from ofacls.model.folder import ModelFolder
from ofacls.model.ofa import OFAModel

# ModelScope's OFAModel has one token table saved under three names. A model
# saved from a GPU stores them as three separate copies (its saver moves each
# tensor to the CPU on its own); one saved from the CPU, as one.
_TOKEN_TABLE = "encoder.embed_tokens.weight"
_TOKEN_TABLE_COPIES = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Rows of each extra copy compared with the table: evenly spaced, so a copy from
# another model is caught while a 243 MB copy costs a few pages to check.
_SAMPLE_ROWS = 64
# fairseq's per-module format counters; converters drop them, ModelScope ignores them.
_VERSION_KEYS = ("encoder.version", "decoder.version")
# Parts of ModelScope's OFAModel the classification path never runs (image
# infilling inputs of the decoder, code-token embeddings).
_UNUSED_PREFIXES = (
    "decoder.image_position_idx",
    "decoder.image_rp_bucket",
    "decoder.embed_image_positions.",
    "decoder.image_pos_ln.",
    "decoder.image_rel_pos_table_list.",
    "decoder.code_layernorm_embedding.",
)
# ModelScope builds its token buckets for this many positions whatever
# max_position_embeddings says (modeling_ofa's DEFAULT_MAX_SOURCE_POSITIONS).
_BUCKET_POSITIONS = 1024


def remap_modelscope_state_dict(sd: Mapping[str, torch.Tensor],
                                cfg: OFAConfig | None = None) -> dict[str, torch.Tensor]:
    """ModelScope OFAModel state dict in, ours out (pure: no I/O, no copies of weights).

    Takes every layout ModelScope's loader turns into the same model: a whole-dict
    `model.` prefix (OfaForAllTasks' attribute) is stripped; fairseq's version
    entries are dropped; the three names of the shared token table, one tensor
    or separate copies, become our single `embed_tokens.weight` (copies must
    match it in shape, dtype and a sample of rows); the decoder's unused image and
    code tables are dropped; index buffers the file lacks are built from
    ModelScope's formulas for `cfg` (default: OFAConfig()), and a token bucket
    table built for more positions than `cfg` has is cut to size, as ModelScope
    slices it. Everything else keeps its name."""
    cfg = cfg or OFAConfig()
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    if _TOKEN_TABLE not in sd:
        raise CheckpointError(f"no {_TOKEN_TABLE}: not an OFA checkpoint")
    table = sd[_TOKEN_TABLE]
    for name in _TOKEN_TABLE_COPIES:
        copy = sd.get(name)
        if copy is not None and not _same_storage(copy, table):
            _check_same_table(name, copy, table)
    out = {"embed_tokens.weight": table}
    for key, value in sd.items():
        if (key == _TOKEN_TABLE or key in _TOKEN_TABLE_COPIES or key in _VERSION_KEYS
                or key.startswith(_UNUSED_PREFIXES)):
            continue
        out[key] = value
    n = cfg.max_position_embeddings
    for key in ("encoder.token_rp_bucket", "decoder.token_rp_bucket"):
        bucket = out.get(key)
        if bucket is None:
            out[key] = token_buckets(n, cfg.token_bucket_size)
        elif bucket.dim() == 2 and bucket.shape[0] == bucket.shape[1] > n:
            out[key] = bucket[:n, :n]
    if "encoder.image_rp_bucket" not in out:
        out["encoder.image_rp_bucket"] = image_buckets(cfg.image_bucket_size)
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and a.storage_offset() == b.storage_offset() and a.shape == b.shape)


def _check_same_table(name: str, copy: torch.Tensor, table: torch.Tensor) -> None:
    """Refuse a copy of the token table that is not the table. Compares shape,
    dtype and the bits of a fixed sample of rows: reading all of a file-mapped
    copy would make its pages resident for nothing."""
    if copy.shape != table.shape or copy.dtype != table.dtype:
        raise CheckpointError(f"{name} {tuple(copy.shape)} {copy.dtype} differs from {_TOKEN_TABLE} "
                              f"{tuple(table.shape)} {table.dtype}: OFA ties them")
    if table.dim() == 0 or table.shape[0] <= _SAMPLE_ROWS:
        a, b = copy, table
    else:
        rows = torch.linspace(0, table.shape[0] - 1, _SAMPLE_ROWS).long()
        a, b = copy[rows], table[rows]
    # as bytes: equal bits are equal, NaN rows included
    if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
        raise CheckpointError(f"{name} differs from {_TOKEN_TABLE}: OFA ties them")


def token_buckets(n: int, bucket_size: int) -> torch.Tensor:
    """ModelScope's make_token_bucket_position for 1024 positions, (n, n) int64:
    [i, j] is the bucket of i - j, exact up to 128 apart, log-spaced beyond.

    Computed in float64 with a 1e-9 nudge: ModelScope's float32 ceil argument is
    exactly 127 at distance 1023 (bucket 510) and far from an integer elsewhere,
    so the result does not depend on the last bit of any log."""
    mid = bucket_size // 2
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    dist = rel.abs().clamp(1, _BUCKET_POSITIONS - 1).double()
    log_bucket = torch.ceil(torch.log(dist / mid) / math.log((_BUCKET_POSITIONS - 1) / mid)
                            * (mid - 1) - 1e-9).long() + mid
    return torch.where(rel.abs() <= mid, rel, log_bucket * rel.sign()) + bucket_size - 1


def image_buckets(bucket_size: int) -> torch.Tensor:
    """ModelScope's make_image_bucket_position, (b*b + 1, b*b + 1) int64 over image
    position ids: (dr + b - 1) * (2b - 1) + (dc + b - 1) between grid cells, and
    three extra buckets for the row and column of id 0 (never an image token here)."""
    side = 2 * bucket_size - 1
    ids = torch.arange(bucket_size * bucket_size)
    r, c = ids // bucket_size, ids % bucket_size
    out = torch.empty(len(ids) + 1, len(ids) + 1, dtype=torch.long)
    out[1:, 1:] = (r[:, None] - r[None, :] + bucket_size - 1) * side + (c[:, None] - c[None, :]
                                                                       + bucket_size - 1)
    n_rel = side * side + 3
    out[0, :], out[:, 0], out[0, 0] = n_rel - 3, n_rel - 2, n_rel - 1
    return out


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The folder's weights: `*.safetensors` when present, else `pytorch_model.bin`,
    and whether the tensors are pages of the file mapped into memory.

    The pickle is read with weights_only=True (never runs code from the file) and
    mmap=True, so tensors page in from the file instead of being copied."""
    files = ModelFolder(folder).weight_files()  # inside the folder, regular files
    if not files:
        raise CheckpointError(f"{folder}: no pytorch_model.bin or *.safetensors weights")
    if files[0].suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
        return sd, False
    (path,) = files
    # Old non-zip pickles cannot be memory-mapped; they still load, with a copy.
    mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # torch >= 2.14 warns on any pickle newer than protocol 2 before deciding;
            # a bad file gets our one-line error below, a good one needs no warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for corrupt files; all mean the same
        # torch's first sentence says what failed; the rest is boilerplate advice
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return loaded, mmap


def release_pages(t: torch.Tensor) -> None:
    """Unmap the whole pages of a file-mapped CPU tensor from this process (Linux).

    Only for tensors `read_state_dict` mapped from the file: their pages are clean
    and private, so touching them again would read them back from the file and
    nothing is lost; they merely stop counting as resident. Converting OFA-Large
    to bf16 then peaks at 1.5 GB RSS instead of 3.3 GB (fp32 file + bf16 copy)."""
    c = libc()
    storage = t.untyped_storage()
    start, page = storage.data_ptr(), mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + storage.nbytes()) // page * page
    if c is not None and hi > lo:
        c.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


_MADV_DONTNEED = 4  # the same number on every Linux architecture


def load_model(folder: Path, cfg: OFAConfig, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> OFAModel:
    """Build the network from `cfg` and fill it strictly from the folder's weights,
    floating-point ones in `dtype`, all on `device`, ready for inference (the
    trunk's BatchNorms folded into its convolutions)."""
    loaded, mapped = read_state_dict(folder)
    with torch.device("meta"):
        model = OFAModel(cfg)
    expected = model.state_dict()
    # Checked on the tensors' shapes alone (meta tensors: nothing allocated), since
    # the remap builds the index buffers a file lacks from config.json's sizes: a
    # size the weights do not have (max_position_embeddings 16000: 8 GB) is refused
    # before that. The remap's real output has these same shapes and dtypes.
    _check_against(folder, cfg, _with_counters(_shapes_only(loaded, cfg), expected), expected)
    sd = remap_modelscope_state_dict(loaded, cfg)
    if mapped:
        # the parts left behind (extra token-table copies, unused tables): the pages
        # the remap read of them (a sample of rows) stop counting as resident
        kept = {v.untyped_storage().data_ptr() for v in sd.values()}
        for value in loaded.values():
            if value.untyped_storage().data_ptr() not in kept:
                release_pages(value)
    del loaded  # else the mapping outlives the conversion below
    device = device or torch.device("cpu")
    sd = _with_counters(sd, expected)
    # A file saved in another precision (fp16 checkpoints are common) must be
    # converted too: the convolutions refuse to mix input and weight dtypes.
    copy_all = device.type != "cpu" or any(v.is_floating_point() and v.dtype != dtype
                                           for v in sd.values())
    for key, value in sd.items():
        want = dtype if value.is_floating_point() else expected[key].dtype
        # Once converting, every tensor is copied out of the file, the integer ones
        # too: one tensor left mapped keeps the whole fp32 file resident (+1.9 GB RSS
        # at OFA-Large). Integer buffers of another width (int32) are widened.
        if copy_all or value.dtype != want:
            sd[key] = value.to(device, want, copy=True)
            if mapped:
                release_pages(value)
    # assign=True adopts the (memory-mapped) tensors instead of copying into fresh ones
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)
    for weight in model.encoder.embed_images.fold_batchnorm():
        if mapped and not copy_all:  # the file's weights, read once to fold them
            release_pages(weight)
    return model


def _shapes_only(loaded: Mapping[str, torch.Tensor], cfg: OFAConfig) -> dict[str, torch.Tensor]:
    """What the remap makes of `loaded`, as meta tensors: the shapes and dtypes
    without a byte of data (the buffers it builds included)."""
    with torch.device("meta"):
        return remap_modelscope_state_dict(
            {k: torch.empty(v.shape, dtype=v.dtype) for k, v in loaded.items()}, cfg)


def _with_counters(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """`sd` with the BatchNorm step counters it lacks: bookkeeping, tolerated when absent."""
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=value.dtype)
    return sd


def _check_against(folder: Path, cfg: OFAConfig, sd: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that are not the network's, naming the keys: missing,
    unexpected, of the wrong shape, or integers where floats belong (and back)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    both = set(expected) & set(sd)
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (want {tuple(expected[k].shape)})"
                   for k in both if sd[k].shape != expected[k].shape)
    kind = sorted(f"{k} {str(sd[k].dtype).removeprefix('torch.')} (want "
                  f"{'floating point' if expected[k].is_floating_point() else 'integer'})"
                  for k in both if sd[k].is_floating_point() != expected[k].is_floating_point()
                  or sd[k].is_complex())
    if missing or unexpected or wrong or kind:
        parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong), ("wrong dtype", kind)) if keys]
        if cfg.defaulted and (missing or wrong):
            # a config.json without the sizes built ModelScope's default network
            parts.append(f"config.json lacks {', '.join(cfg.defaulted[:8])}"
                         f"{' ...' if len(cfg.defaulted) > 8 else ''}, so ModelScope's defaults "
                         "were used")
        raise CheckpointError(f"{folder}: weights do not match config.json; " + "; ".join(parts))
