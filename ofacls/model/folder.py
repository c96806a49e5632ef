"""A ModelScope OFA classification folder: the only code that knows its file names.

    config.json          the network (HF-style OFAConfig)
    configuration.json   the task: prompt, image size, decoding, the label file's name
    answer2label.json    the labels, in class-index order (or the name configuration.json gives)
    vocab.json, merges.txt   the byte-level BPE tokenizer
    pytorch_model.bin or *.safetensors   the weights

Everything but the weights is small: `ofacls labels` and the hub's completeness
check read only those. Imports nothing heavy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ofacls.errors import CheckpointError, ModelNotFoundError
from ofacls.model.config import OFAConfig, TaskConfig, check_task_fits, read_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CONFIG = "config.json"
CONFIGURATION = "configuration.json"
VOCAB = "vocab.json"
MERGES = "merges.txt"
PICKLED_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_PATTERN = "*.safetensors"
# What every usable folder holds besides its weights and its label file.
REQUIRED_FILES = (CONFIGURATION, CONFIG, VOCAB, MERGES)
# ModelScope's client writes each file as `name.incomplete` (`name.parallel_tmp`
# when fetched in ranges) and renames it once its size and hash check out:
# leftovers mean an interrupted download.
PARTIAL_PATTERNS = ("*.incomplete", "*.parallel_tmp")


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
        path = self.path / CONFIG
        return OFAConfig.from_dict(read_json(path), str(path))

    @functools.cached_property
    def task(self) -> TaskConfig:
        path = self.path / CONFIGURATION
        return TaskConfig.from_dict(read_json(path), str(path))

    def checked_task(self) -> TaskConfig:
        """The task, checked against the network (the image must fit its position grid)."""
        check_task_fits(self.task, self.config, str(self.path / CONFIGURATION))
        return self.task

    @property
    def labels_file(self) -> Path:
        return self.path / self.task.answer2label

    def label_names(self) -> list[str]:
        """The labels in class-index order (reads configuration.json and the label file only)."""
        from ofacls.labels import read_label_names

        return read_label_names(self.labels_file)

    def tokenizer(self) -> Tokenizer:
        from ofacls.labels import load_tokenizer

        return load_tokenizer(self.path / VOCAB, self.path / MERGES)

    def weight_files(self) -> list[Path]:
        """`*.safetensors` when there are any (all of them: sharded files), else `pytorch_model.bin`."""
        shards = sorted(p for p in self.path.glob(SAFETENSORS_PATTERN) if p.is_file())
        if shards:
            return shards
        pickled = self.path / PICKLED_WEIGHTS
        return [pickled] if pickled.is_file() else []

    # --- completeness ----------------------------------------------------------------
    def lacks(self) -> str:
        """What keeps this from being a whole model, in a few words ("" for nothing).

        Used on cached downloads, where a cut-short one must not be taken for a model."""
        missing = [name for name in REQUIRED_FILES if not (self.path / name).is_file()]
        if not self.weight_files():
            missing.append(PICKLED_WEIGHTS)
        if missing:
            return "no " + ", ".join(missing)
        if any(True for pattern in PARTIAL_PATTERNS for _ in self.path.rglob(pattern)):
            return "a download was cut short"
        return ""

    def is_complete(self) -> bool:
        return self.path.is_dir() and not self.lacks()
