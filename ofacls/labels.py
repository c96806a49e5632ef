"""The label set, its tokenisation, and the trie that constrains decoding.

The model answers by generating a label's text: `<s> tokens(" " + label) </s>`.
At every step only tokens that continue some label are allowed; the trie holds
exactly those continuations. The model's labels are the keys of answer2label.json
in file order (ModelScope ignores the values; `read_label_file` says how ofacls
reads them as class indices). Any other strings the tokenizer spells make a trie
just as well: the model then ranks those (`LabelTrie.build`).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ofacls.errors import CheckpointError, OfaclsError, UsageError
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


@dataclass(frozen=True)
class LabelFile:
    """A model's label file: the label names in file order, and each label's class
    index with where the indices came from (`index_source`, said by `ofacls info`)."""

    names: list[str]
    indices: list[int]
    index_source: str


def read_label_file(path: Path) -> LabelFile:
    """The labels of an answer2label-style JSON object (or list), checked as
    `check_label_names` does, and their class indices.

    ModelScope uses only the keys, in file order. The values are the class numbers
    OFA's finetune trained with: where they are a permutation of 0..N-1 (or of
    1..N, as OFA's own `769 rugby ball` counts), they are the class indices, so
    a file written in another order still answers ImageNet's index for each
    label. Otherwise (a list, strings, gaps) a label's index is its position."""
    # Every object read as its (key, value) pairs: a plain dict would keep only the
    # last of a repeated key, and the repeat would go unseen. Objects nested in a
    # list become lists, which are not names, so that stays refused.
    data = load_json(path, "label file", object_pairs_hook=lambda pairs: _Pairs(pairs))
    if isinstance(data, _Pairs):
        names, values = [k for k, _ in data], [v for _, v in data]
    elif isinstance(data, list):
        names, values = data, []
    else:
        names, values = [], []
    if not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: expected a JSON object whose keys are the labels")
    check_label_names(names, str(path))
    indices, source = _indices_from_values(values, len(names))
    return LabelFile(names, indices, source)


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its list of (key, value) pairs, told apart from a JSON list."""


def _indices_from_values(values: list[object], n: int) -> tuple[list[int], str]:
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) == n == len(values):
        if sorted(ints) == list(range(n)):
            return ints, "the label file's values (0..N-1)"
        if sorted(ints) == list(range(1, n + 1)):
            return [v - 1 for v in ints], "the label file's values (1..N, less one)"
    return list(range(n)), "the labels' order in the label file"


def check_label_names(names: Sequence[str], where: str,
                      error: type[OfaclsError] = CheckpointError) -> None:
    """Refuse a label list that cannot be answered with or printed: a label holding a
    control character (newline, ESC, NUL, DEL, C1; labels are printed one per line
    and served as text), an empty one, one of more than MAX_LABEL_CHARS, a repeat,
    more than MAX_LABELS labels. `where` (the file, or `--labels`) starts the message."""
    if len(names) > MAX_LABELS:
        raise error(f"{where}: {len(names):,} labels, more than {MAX_LABELS:,}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise error(f"{where}: label {_show(name)} is listed twice")
        if not name.strip():
            raise error(f"{where}: a label is empty")
        if len(name) > MAX_LABEL_CHARS:
            raise error(f"{where}: label {_show(name)} has {len(name):,} characters, "
                                  f"more than {MAX_LABEL_CHARS:,}")
        bad = _CONTROL.search(name)
        if bad:
            raise error(f"{where}: label {_show(name)} holds the control character "
                                  f"U+{ord(bad.group()):04X}")
        seen.add(name)


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
    """Label names, their class indices, their token ids, and the trie over
    `tokens + [</s>]`. `indices` default to the names' positions."""

    def __init__(self, names: Sequence[str], token_ids: Sequence[Sequence[int]],
                 indices: Sequence[int] | None = None) -> None:
        if not names:
            raise UsageError("no labels to choose from")
        self.names = list(names)
        self.indices = list(indices) if indices is not None else list(range(len(self.names)))
        self._class_index: dict[str, int] | None = None
        self.own = False  # strings of a user's own, not (some of) the model's labels
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

    @property
    def class_index(self) -> dict[str, int]:
        """Label name -> its class index."""
        if self._class_index is None:
            self._class_index = dict(zip(self.names, self.indices))
        return self._class_index

    @classmethod
    def build(cls, names: Sequence[str], tokenizer: Tokenizer,
              vocab_size: int | None = None, indices: Sequence[int] | None = None) -> LabelTrie:
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
        return cls(names, token_ids, indices)

    def subset(self, wanted: Sequence[str]) -> LabelTrie:
        """A trie over only the named labels (in the model's order, with the model's
        class indices), named as LabelNames finds them."""
        names = LabelNames(self.names)
        keep = sorted({names.index(w) for w in wanted})
        return LabelTrie([self.names[i] for i in keep], [self.token_ids[i] for i in keep],
                         [self.indices[i] for i in keep])

    def choose(self, wanted: Sequence[str], tokenizer: Tokenizer,
               vocab_size: int | None = None) -> LabelTrie:
        """The labels a user chose, from the model's (`self`'s): a subset with the
        model's class indices when every name is one of its labels (as LabelNames
        finds them), else a trie of the strings as given, their indices their
        positions in `wanted`. The model ranks any strings its tokenizer spells."""
        wanted = [w.strip() for w in wanted]
        check_label_names(wanted, "the chosen labels", UsageError)
        if LabelNames(self.names).has_all(wanted):
            return self.subset(wanted)
        trie = LabelTrie.build(wanted, tokenizer, vocab_size)
        trie.own = True
        return trie

    def near_misses(self, wanted: Sequence[str]) -> list[tuple[str, str]]:
        """(name, the model's label) for each of `wanted` that is not one of the model's
        labels but all but spells one: likely a typo, which makes a set the user's own."""
        names = LabelNames(self.names)
        out = []
        for w in wanted:
            if names.find(w) is None:
                close = names.nearest(w, 1, cutoff=0.8)
                if close:
                    out.append((w.strip(), close[0]))
        return out


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

    def has_all(self, names: Sequence[str]) -> bool:
        """Whether every one of `names` is one of these labels: a chosen set that is
        the model's own (a subset), not strings of the user's."""
        return all(self.find(n) is not None for n in names)

    def index(self, name: str) -> int:
        """The label's class index; a UsageError naming the nearest labels if none matches."""
        found = self.find(name)
        if found is None:
            raise UsageError(f"{name!r} is not a label of this model; the nearest are "
                             f"{', '.join(map(repr, self.nearest(name)))} (ofacls labels lists them all)")
        return found

    def nearest(self, name: str, n: int = 3, cutoff: float = 0.0) -> list[str]:
        """The `n` labels most like `name` (case and `_` aside), of at least `cutoff`
        similarity (difflib's ratio)."""
        by_loose: dict[str, str] = {}
        for label in self.labels:
            by_loose.setdefault(loose(label), label)
        return [by_loose[m] for m in difflib.get_close_matches(loose(name), list(by_loose), n=n,
                                                               cutoff=cutoff)]


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
