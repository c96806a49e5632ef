"""The label set, its tokenisation, and the trie that constrains decoding.

The model answers by generating a label's text: `<s> tokens(" " + label) </s>`.
At every step only tokens that continue some label are allowed; the trie holds
exactly those continuations. Label i is the i-th key of answer2label.json in
file order (ModelScope ignores the values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ofacls.errors import CheckpointError, UsageError
from ofacls.model.config import load_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, PAD, EOS, UNK = 0, 1, 2, 3


def read_label_names(path: Path) -> list[str]:
    """Label names in file order from an answer2label-style JSON object (or list)."""
    data = load_json(path, "label file")
    names = list(data) if isinstance(data, (dict, list)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: expected a JSON object whose keys are the labels")
    return names


def load_tokenizer(folder: Path) -> Tokenizer:
    """The model's byte-level BPE (BART's GPT-2 scheme) from vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
    try:
        # add_prefix_space=False: the reference prepends the space itself
        return ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=False)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{folder}: unreadable vocab.json/merges.txt ({e})") from None


@dataclass(eq=False)
class TrieNode:
    """A prefix of one or more labels' token sequences (after <s>)."""

    children: dict[int, TrieNode] = field(default_factory=dict)
    label: int | None = None  # set on the node reached by a label's closing </s>
    _child_ids: list[int] | None = None

    @property
    def child_ids(self) -> list[int]:
        if self._child_ids is None:
            self._child_ids = list(self.children)
        return self._child_ids


class LabelTrie:
    """Label names, their token ids, and the trie over `tokens + [</s>]`."""

    def __init__(self, names: Sequence[str], token_ids: Sequence[Sequence[int]]) -> None:
        if not names:
            raise UsageError("no labels to choose from")
        self.names = list(names)
        self.token_ids = [list(t) for t in token_ids]
        self.root = TrieNode()  # the node after <s>
        for index, ids in enumerate(self.token_ids):
            node = self.root
            for tok in [*ids, EOS]:
                node = node.children.setdefault(tok, TrieNode())
            node.label = index
        self.max_tokens = max(len(t) for t in self.token_ids) + 1  # with </s>

    @classmethod
    def build(cls, names: Sequence[str], tokenizer: Tokenizer) -> LabelTrie:
        encoded = tokenizer.encode_batch([" " + n for n in names], add_special_tokens=False)
        return cls(names, [e.ids for e in encoded])

    def subset(self, wanted: Sequence[str]) -> LabelTrie:
        """A trie over only the named labels (in the model's order)."""
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [w for w in wanted if w not in index]
        if unknown:
            raise UsageError(f"not a label of this model: {', '.join(map(repr, unknown[:5]))}"
                             " (see `ofacls labels`)")
        keep = sorted({index[w] for w in wanted})
        return LabelTrie([self.names[i] for i in keep], [self.token_ids[i] for i in keep])


def encode_prompt(tokenizer: Tokenizer, prompt: str, max_length: int) -> list[int]:
    """`<s> prompt </s>`, the prompt truncated like the reference's max_src_length."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids[:max_length]
    return [BOS, *ids, EOS]
