"""The label set, its tokenisation, and the trie that constrains decoding.

The model answers by generating a label's text: `<s> tokens(" " + label) </s>`.
At every step only tokens that continue some label are allowed; the trie holds
exactly those continuations. Label i is the i-th key of answer2label.json in
file order (ModelScope ignores the values).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ofacls.errors import CheckpointError, UsageError
from ofacls.model.config import MAX_SMALL_FILE_BYTES, check_regular_file, load_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, PAD, EOS, UNK = 0, 1, 2, 3

# ImageNet-21k has 21,841 classes. The label file's size cap already bounds the
# text; this bounds the per-label cost (token lists, trie nodes) on top of it.
MAX_LABELS = 100_000
# A class name, even with all its synonyms, is a line of text: this bounds what
# one label costs to tokenise.
MAX_LABEL_CHARS = 1000
# C0 (NUL, newline, ESC ...), DEL and C1 (NEL, CSI ...), and the two Unicode
# line breaks (str.splitlines splits on them): none belongs in a one-line label.
# The trie costs ~100 bytes a token: this caps it at ~400 MB whatever the text
# (ImageNet's 1000 labels take ~5,000 tokens, 100,000 short ones ~1,000,000).
MAX_LABEL_TOKENS = 4_000_000
_ENCODE_SLICE = 1024  # labels tokenised at a time
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def read_label_names(path: Path) -> list[str]:
    """Label names in file order from an answer2label-style JSON object (or list).

    Labels are printed one per line and served as text, so a label holding a
    control character (a newline, ESC, NUL, DEL, C1) is refused, as are labels of
    more than MAX_LABEL_CHARS and more than MAX_LABELS of them."""
    # Every object read as its list of keys: a plain dict would keep only the last
    # of a repeated key, and the repeat would go unseen. Objects nested in a list
    # become lists, which are not names, so that stays refused.
    data = load_json(path, "label file", object_pairs_hook=lambda pairs: [k for k, _ in pairs])
    names = data if isinstance(data, list) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: expected a JSON object whose keys are the labels")
    if len(names) > MAX_LABELS:
        raise CheckpointError(f"{path}: {len(names):,} labels, more than {MAX_LABELS:,}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CheckpointError(f"{path}: label {_show(name)} is listed twice")
        if len(name) > MAX_LABEL_CHARS:
            raise CheckpointError(f"{path}: label {_show(name)} has {len(name):,} characters, "
                                  f"more than {MAX_LABEL_CHARS:,}")
        bad = _CONTROL.search(name)
        if bad:
            raise CheckpointError(f"{path}: label {_show(name)} holds the control character "
                                  f"U+{ord(bad.group()):04X}")
        seen.add(name)
    return names


def _show(name: str) -> str:
    """A label as a message quotes it: escaped (repr) and cut short, so it stays one line."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def load_tokenizer(vocab: Path, merges: Path) -> Tokenizer:
    """The model's byte-level BPE (BART's GPT-2 scheme) from vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    for f in (vocab, merges):  # the tokenizer library opens them itself: checked first
        check_regular_file(f, "", MAX_SMALL_FILE_BYTES)
    try:
        # add_prefix_space=False: the reference prepends the space itself
        return ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=False)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{vocab.parent}: unreadable {vocab.name}/{merges.name} ({e})") from None


@dataclass(eq=False, slots=True)
class TrieNode:
    """A prefix of one or more labels' token sequences (after <s>). Slotted: a
    label set has one node per token, and a per-node __dict__ tripled their size."""

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
            if node.label is not None:
                # one of them could never be answered; a byte-level BPE tells
                # different texts apart, unless its files lack the labels' tokens
                raise CheckpointError(
                    f"labels {self.names[node.label]!r} and {self.names[index]!r} have the same "
                    f"tokens {ids}: vocab.json/merges.txt do not match the labels")
            node.label = index
        self.max_tokens = max(len(t) for t in self.token_ids) + 1  # with </s>

    @classmethod
    def build(cls, names: Sequence[str], tokenizer: Tokenizer,
              vocab_size: int | None = None) -> LabelTrie:
        """The trie of `names` as `tokenizer` spells them. With config.json's
        `vocab_size`, token ids the model has no row for are refused here rather
        than failing as an index error inside the model at the first image."""
        token_ids: list[list[int]] = []
        total = 0
        # In slices: an Encoding object holds offsets, masks and token strings
        # besides the ids (~1.8 kB a label), so all of them at once cost more
        # than the labels and their trie together.
        for start in range(0, len(names), _ENCODE_SLICE):
            encoded = tokenizer.encode_batch([" " + n for n in names[start:start + _ENCODE_SLICE]],
                                             add_special_tokens=False)
            token_ids += [e.ids for e in encoded]
            total = sum(map(len, token_ids[start:]), total)
            if total > MAX_LABEL_TOKENS:
                raise CheckpointError(f"the labels take more than {MAX_LABEL_TOKENS:,} tokens "
                                      "in all: too many, or too long, to answer with")
        if vocab_size is not None:
            for name, ids in zip(names, token_ids):
                check_token_ids(f"label {name!r}", ids, vocab_size)
        return cls(names, token_ids)

    def subset(self, wanted: Sequence[str]) -> LabelTrie:
        """A trie over only the named labels (in the model's order), named as
        LabelNames finds them."""
        names = LabelNames(self.names)
        keep = sorted({names.index(w) for w in wanted})
        return LabelTrie([self.names[i] for i in keep], [self.token_ids[i] for i in keep])


def loose(name: str) -> str:
    """A label as people may type it: case, `_` for a space and outer spaces aside."""
    return name.strip().replace("_", " ").casefold()


class LabelNames:
    """Finds a label by the name a person gives, by one rule everywhere a label is
    named (`--labels`, `eval`'s classes): the exact label, else the one label that
    matches with case and `_` for a space aside. Two labels that differ only so
    (ImageNet's `Cardigan` the dog and `cardigan` the sweater) need their exact name."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self._exact = {n: i for i, n in enumerate(self.labels)}
        counts = Counter(loose(n) for n in self.labels)
        self._loose = {loose(n): i for i, n in enumerate(self.labels) if counts[loose(n)] == 1}

    def find(self, name: str) -> int | None:
        """The label's class index, or None."""
        found = self._exact.get(name, self._exact.get(name.strip()))
        return found if found is not None else self._loose.get(loose(name))

    def index(self, name: str) -> int:
        """The label's class index; a UsageError naming the nearest labels if none matches."""
        found = self.find(name)
        if found is None:
            raise UsageError(f"{name!r} is not a label of this model; the nearest are "
                             f"{', '.join(map(repr, self.nearest(name)))} (ofacls labels lists them all)")
        return found

    def nearest(self, name: str, n: int = 3) -> list[str]:
        """The `n` labels most like `name` (case and `_` aside)."""
        by_loose: dict[str, str] = {}
        for label in self.labels:
            by_loose.setdefault(loose(label), label)
        return [by_loose[m] for m in difflib.get_close_matches(loose(name), list(by_loose), n=n, cutoff=0.0)]


def encode_prompt(tokenizer: Tokenizer, prompt: str, max_length: int,
                  vocab_size: int | None = None) -> list[int]:
    """`<s> prompt </s>`, the prompt truncated like the reference's max_src_length;
    ids of `vocab_size` (config.json's) or more are refused, as in `LabelTrie.build`."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids[:max_length]
    if vocab_size is not None:
        check_token_ids("the prompt", ids, vocab_size)
    return [BOS, *ids, EOS]


def check_token_ids(what: str, ids: Sequence[int], vocab_size: int) -> None:
    """Refuse ids the model's token table has no row for (vocab.json from another model)."""
    beyond = [i for i in ids if i >= vocab_size]
    if beyond:
        raise CheckpointError(f"{what} has token id {beyond[0]}, but config.json's vocab_size is "
                              f"{vocab_size}: vocab.json/merges.txt do not match the model")
