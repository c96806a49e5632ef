"""A ModelScope OFA classification folder: the only code that knows its file names.

    config.json          the network (HF-style OFAConfig)
    configuration.json   the task: prompt, image size, decoding, the label file's name
    answer2label.json    the labels, in class-index order (or the name configuration.json gives)
    vocab.json, merges.txt   the byte-level BPE tokenizer
    pytorch_model.bin or *.safetensors   the weights

Everything but the weights is small: `ofacls labels` and the hub's completeness
check read only those. Imports nothing heavy.

A folder is data from elsewhere (a hub, an archive, a clone), so every file it
names is checked before use: the name stays inside the folder, links included,
and only a regular file is read (a FIFO would block, /dev/zero never ends), the
small ones up to a size cap.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ofacls.errors import CheckpointError, ModelNotFoundError
from ofacls.model.config import (
    OFAConfig,
    TaskConfig,
    check_regular_file,
    check_task_fits,
    read_json,
    read_small_file,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ofacls.labels import LabelFile

CONFIG = "config.json"
CONFIGURATION = "configuration.json"
VOCAB = "vocab.json"
MERGES = "merges.txt"
DEFAULT_LABELS = "answer2label.json"
PICKLED_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_PATTERN = "*.safetensors"
# Which tensor is in which shard; read by other tools, fetched so the folder stays whole.
SAFETENSORS_INDEX_PATTERN = "*.safetensors.index.json"
# What every usable folder holds besides its weights and its label file.
REQUIRED_FILES = (CONFIGURATION, CONFIG, VOCAB, MERGES)
# ModelScope's client writes each file as `name.incomplete` (`name.parallel_tmp`
# when fetched in ranges) and renames it once its size and hash check out:
# leftovers mean an interrupted download.
PARTIAL_PATTERNS = ("*.incomplete", "*.parallel_tmp")

# A drive letter (`C:`): a Windows path, absolute or relative to that drive.
_DRIVE = re.compile(r"[A-Za-z]:")


def is_plain_name(name: str) -> bool:
    """Whether `name` is a relative POSIX path that stays below the folder it is
    joined to: no leading `/`, no `..` (nor `.` or empty) part, no backslash, no
    drive letter, no control character (NUL included)."""
    if not name or name.startswith("/") or "\\" in name or _DRIVE.match(name):
        return False
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def files_to_fetch(listed: Collection[str], labels: str = DEFAULT_LABELS) -> list[str]:
    """The names among a repository's `listed` files that a model folder needs,
    `labels` being the label file configuration.json names: the weights in one
    format only (safetensors when there are any, as `weight_files` reads them),
    no README, images or other formats' weights. Only plain names are returned."""
    wanted = {*REQUIRED_FILES, labels}
    shards = [n for n in listed if "/" not in n and fnmatch.fnmatchcase(n, SAFETENSORS_PATTERN)]
    if shards:
        wanted.update(shards)
        wanted.update(n for n in listed if "/" not in n
                      and fnmatch.fnmatchcase(n, SAFETENSORS_INDEX_PATTERN))
    else:
        wanted.add(PICKLED_WEIGHTS)
    return sorted(n for n in listed if n in wanted and is_plain_name(n))


def labels_named(configuration: Path) -> str:
    """The label file's name as `configuration` (a configuration.json) gives it, read
    leniently: whatever is wrong with the file is reported when the model loads."""
    try:
        model = json.loads(read_small_file(configuration)).get("model")
        name = model.get("answer2label") if isinstance(model, dict) else None
    except (CheckpointError, ValueError, RecursionError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else DEFAULT_LABELS


@dataclass(frozen=True)
class ModelFolder:
    """A local model folder. Reading a part parses (and checks) only that part."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """The folder at `path`, refused unless it at least has a config.json."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"no model folder at {path}")
        if not (folder / CONFIG).exists():
            raise CheckpointError(f"{path} is not an OFA model folder: it has no {CONFIG}")
        return cls(folder)

    # --- the parts ---------------------------------------------------------------
    @functools.cached_property
    def config(self) -> OFAConfig:
        path = self.file(CONFIG)
        return OFAConfig.from_dict(read_json(path), str(path))

    @functools.cached_property
    def task(self) -> TaskConfig:
        path = self.file(CONFIGURATION)
        return TaskConfig.from_dict(read_json(path), str(path))

    def checked_task(self) -> TaskConfig:
        """The task, checked against the network (the image must fit its position grid)."""
        check_task_fits(self.task, self.config, str(self.path / CONFIGURATION))
        return self.task

    @property
    def labels_file(self) -> Path:
        name = self.task.answer2label
        if name is None:
            raise CheckpointError(f"{self.path / CONFIGURATION} names no label file "
                                  "(model.answer2label): without one the model generates free "
                                  "text, not a class")
        if not is_plain_name(name):
            raise CheckpointError(f"{self.path / CONFIGURATION}: model.answer2label {name!r} "
                                  "is not a file name inside the model folder")
        return self.file(name)

    def label_file(self) -> LabelFile:
        """The labels in file order with their class indices (reads configuration.json
        and the label file only)."""
        from ofacls.labels import read_label_file

        return read_label_file(self.labels_file)

    def label_names(self) -> list[str]:
        """The labels in class-index order."""
        labels = self.label_file()
        by_index = sorted(zip(labels.indices, labels.names))
        return [name for _, name in by_index]

    def tokenizer(self) -> Tokenizer:
        from ofacls.labels import load_tokenizer

        return load_tokenizer(self.file(VOCAB), self.file(MERGES))

    def weight_files(self) -> list[Path]:
        """`*.safetensors` when there are any (all of them: sharded files), else
        `pytorch_model.bin`; each checked as `file` does and a regular file (a FIFO
        named model.safetensors is refused, not skipped)."""
        paths = self._weight_paths()
        for path in paths:
            check_regular_file(self.file(path.name), "weights")
        return paths

    def _weight_paths(self) -> list[Path]:
        shards = sorted(self.path.glob(SAFETENSORS_PATTERN))
        pickled = self.path / PICKLED_WEIGHTS
        return shards or ([pickled] if pickled.exists() else [])

    def file(self, name: str) -> Path:
        """`name` in this folder, refused when it resolves outside it.

        A link is followed, and must end inside the folder too: a label file
        linked to ~/.docker/config.json would otherwise be read, and its keys
        printed and served as labels. ModelScope's client writes plain files into its cache (unlike
        the Hugging Face cache, no blob store behind links), so a download never
        holds a link; a folder that shares another's files should hard-link them."""
        path = self.path / name
        root = self.path.resolve()
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as e:  # a link loop
            raise CheckpointError(f"{path}: cannot follow its links ({e})") from None
        if not target.is_relative_to(root):
            raise CheckpointError(f"{path} leads to {target}, outside the model folder "
                                  f"{root}; copy or hard-link the file into the folder")
        return path

    # --- completeness ----------------------------------------------------------------
    def lacks(self) -> str:
        """What keeps this from being a whole model, in a few words ("" for nothing).

        Used on cached downloads, where a cut-short one must not be taken for a model."""
        missing = [name for name in REQUIRED_FILES if not (self.path / name).is_file()]
        if not self._weight_paths():
            missing.append(PICKLED_WEIGHTS)
        if missing:
            return "no " + ", ".join(missing)
        if any(True for pattern in PARTIAL_PATTERNS for _ in self.path.rglob(pattern)):
            return "a download was cut short"
        return ""

    def is_complete(self) -> bool:
        return self.path.is_dir() and not self.lacks()
