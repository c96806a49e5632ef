"""Model folder -> loaded OFAModel: read the checkpoint without executing pickled
code, remap ModelScope's keys onto ours with one pure function, load strictly."""

from __future__ import annotations

import ctypes
import mmap
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ofacls.errors import CheckpointError
from ofacls.libc import libc
from ofacls.model.config import OFAConfig
from ofacls.model.ofa import OFAModel

# ModelScope's OFAModel has one token table saved under three names.
_TOKEN_TABLE = "encoder.embed_tokens.weight"
_TOKEN_TABLE_COPIES = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
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


def remap_modelscope_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ModelScope OFAModel state dict in, ours out (pure: no I/O, no copies).

    The three names of the shared token table become our single
    `embed_tokens.weight` (the copies must be the same values); the decoder's
    unused image/code tables are dropped; everything else keeps its name. A
    whole-dict `model.` prefix (OfaForAllTasks' attribute) is stripped.
    """
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    if _TOKEN_TABLE not in sd:
        raise CheckpointError(f"no {_TOKEN_TABLE}: not an OFA checkpoint")
    table = sd[_TOKEN_TABLE]
    for name in _TOKEN_TABLE_COPIES:
        copy = sd.get(name)
        if copy is None or _same_storage(copy, table):
            continue
        if copy.shape != table.shape or not torch.equal(copy, table):
            raise CheckpointError(f"{name} differs from {_TOKEN_TABLE}: OFA ties them")
    out = {"embed_tokens.weight": table}
    for key, value in sd.items():
        if key == _TOKEN_TABLE or key in _TOKEN_TABLE_COPIES or key.startswith(_UNUSED_PREFIXES):
            continue
        out[key] = value
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and a.storage_offset() == b.storage_offset() and a.shape == b.shape)


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The folder's weights: `*.safetensors` when present, else `pytorch_model.bin`,
    and whether the tensors are pages of the file mapped into memory.

    The pickle is read with weights_only=True (never runs code from the file) and
    mmap=True, so tensors page in from the file instead of being copied."""
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in safetensors_files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
        return sd, False
    path = folder / "pytorch_model.bin"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no pytorch_model.bin or *.safetensors weights")
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
    floating-point ones in `dtype`, all on `device`."""
    loaded, mapped = read_state_dict(folder)
    sd = remap_modelscope_state_dict(loaded)
    del loaded  # else the mapping outlives the conversion below
    device = device or torch.device("cpu")
    # A file saved in another precision (fp16 checkpoints are common) must be
    # converted too: the convolutions refuse to mix input and weight dtypes.
    if device.type != "cpu" or any(v.is_floating_point() and v.dtype != dtype
                                   for v in sd.values()):
        # Every tensor is copied out of the file, the integer ones too: one tensor
        # left mapped keeps the whole fp32 file resident (+1.9 GB RSS at OFA-Large).
        for key, value in sd.items():
            sd[key] = (value.to(device, dtype) if value.is_floating_point()
                       else value.to(device, copy=True))
            if mapped:
                release_pages(value)
    with torch.device("meta"):
        model = OFAModel(cfg)
    expected = model.state_dict()
    # BatchNorm's step counters are bookkeeping; tolerate checkpoints without them
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=value.dtype)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (want {tuple(expected[k].shape)})"
                   for k in set(expected) & set(sd) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{folder}: weights do not match config.json; " + "; ".join(parts))
    # assign=True adopts the (memory-mapped) tensors instead of copying into fresh ones
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
