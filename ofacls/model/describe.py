"""What a model folder is, as `ofacls info` shows it: where it is, its network, its
preprocessing, its decoding settings, its labels, its tokenizer and its weights.

A user holding the real published folder can see here the facts nobody could
check without it (its gen_type, mean/std, beam settings, label file, where the
class indices come from), each with where it was read from.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from ofacls.model.folder import MERGES, VOCAB, ModelFolder

FIRST_LABELS = 5
_SAFETENSORS_HEADER_MAX = 100 << 20  # a header longer than this is not one


def describe(folder: ModelFolder, model: str) -> dict[str, Any]:
    """The folder's facts as one JSON-ready dict; `model` is what the user named
    (an id or a path). Weights are read for their dtypes and shapes only (mapped, or
    a safetensors header), never loaded into memory."""
    cfg, task = folder.config, folder.checked_task()
    labels = folder.label_file()
    revision = folder.path.name if folder.path.parent.name == "snapshots" else None
    mean, std = task.mean_std
    return {
        "model": model,
        "path": str(folder.path),
        "revision": revision,
        "network": {
            "resnet": cfg.resnet_type, "d_model": cfg.d_model,
            "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
            "attention_heads": cfg.encoder_attention_heads, "ffn": cfg.encoder_ffn_dim,
            "vocab_size": cfg.vocab_size,
            # shape settings config.json leaves out take ModelScope's defaults, not OFA-Large's
            "defaulted": list(cfg.defaulted),
        },
        "image": {
            "patch_image_size": task.patch_image_size, "mean": list(mean), "std": list(std),
            "mean_std_from": ("configuration.json: imagenet_default_mean_and_std is true"
                              if task.imagenet_default_mean_and_std else
                              "ModelScope's default 0.5/0.5 (configuration.json does not ask "
                              "for ImageNet statistics)"),
        },
        "decoding": {
            "gen_type": task.gen_type,
            "modelscope_runs": "traverse (every label scored)" if task.gen_type == "traverse"
                               else "generation (beam search)",
            "ofacls_default": "exact (--decode auto follows gen_type: "
                              f"{'exact' if task.gen_type == 'traverse' else 'beam'})",
            "beam_search": _fields(task.beam),
            "prompt": task.prompt,
        },
        "labels": {
            "file": folder.labels_file.name, "count": len(labels.names),
            "indices_from": labels.index_source,
            "first": [{"index": i, "label": n} for i, n in
                      sorted(zip(labels.indices, labels.names))[:FIRST_LABELS]],
            "differ_only_in_case": _case_pairs(labels.names),
        },
        "tokenizer": {name: {"bytes": _size(folder.file(name))} for name in (VOCAB, MERGES)},
        "weights": [_weights(path) for path in folder.weight_files()],
    }


def _fields(obj: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _case_pairs(names: list[str]) -> list[list[str]]:
    by_case: dict[str, list[str]] = {}
    for n in names:
        by_case.setdefault(n.casefold(), []).append(n)
    return [group for group in by_case.values() if len(group) > 1]


def _size(path: Path) -> int:
    return path.stat().st_size


def _weights(path: Path) -> dict[str, Any]:
    """One weights file: its format, size, tensor count, parameters and dtypes."""
    if path.suffix == ".safetensors":
        shapes = _safetensors_header(path)
        fmt = "safetensors"
    else:
        shapes = _pickle_shapes(path)
        fmt = "pickle (torch.save)"
    dtypes = Counter(dtype for dtype, _ in shapes.values())
    params = sum(_numel(shape) for _, shape in shapes.values())
    return {"file": path.name, "format": fmt, "bytes": _size(path), "tensors": len(shapes),
            "values": params, "dtypes": dict(dtypes.most_common())}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    from ofacls.errors import CheckpointError

    with path.open("rb") as f:
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 < length <= _SAFETENSORS_HEADER_MAX:
            raise CheckpointError(f"{path}: not a safetensors file")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file") from None
    return {k: (_ST_DTYPES.get(str(v["dtype"]), str(v["dtype"]).lower()), list(v["shape"]))
            for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


# safetensors' dtype names, as torch names them (what a pickled file's tensors say)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _pickle_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    from ofacls.model.weights import read_state_dict

    sd, _ = read_state_dict(path.parent)  # mapped: only the pickle's index is read
    return {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in sd.items()}
