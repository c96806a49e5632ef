"""Decoding over the label trie: exact best-first top-k, and ModelScope's beam search.

Both advance *hypotheses* (a label prefix and its score) one token at a time
through `Stepper`, which batches any set of hypotheses - across images, at any
depth - into one decoder call, keeping each token's self-attention keys/values
in a pool so a hypothesis never recomputes its prefix.

At every step the next-token distribution is the softmax over the trie
children only (the reference masks other logits to -inf *before* its
log-softmax), so we compute logits for those children alone. A prefix with a
single continuation therefore takes it with log-prob exactly 0, whatever the
model says: such tokens are not run at once but kept *pending*, and run in one
decoder call with the next token that needs a distribution. Past the first
token or two almost every ImageNet label is such a chain, so a label costs
about 1.6 decoder calls instead of 3.5 (each call reads every decoder weight).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import cast

import torch

from ofacls.labels import BOS, EOS, PAD, UNK, LabelTrie, TrieNode
from ofacls.model.config import BeamSettings
from ofacls.model.ofa import Memory, OFAModel

_ZERO = torch.zeros(1)


@dataclass(frozen=True)
class Hyp:
    node: TrieNode  # trie node reached by the last token
    pending: tuple[int, ...]  # the last tokens, not yet run through the decoder (>= 1)
    path: tuple[int, ...]  # pool slots of the tokens already run, positions 0..len-1
    image: int  # row of the image batch
    logp: float  # sum of constrained log-probs of the tokens after <s>
    tokens: tuple[int, ...] = ()  # <s> + generated tokens (beam search's n-gram blocking)

    @property
    def forced(self) -> bool:
        """Whether the next token is the only continuation (log-prob exactly 0)."""
        return self.node.label is None and len(self.node.children) == 1


@dataclass(frozen=True)
class Step:
    """What one step tells a hypothesis: its continuations and their log-probs,
    and the path/pending tokens its children extend."""

    child_ids: list[int]
    logp: torch.Tensor  # (len(child_ids),) float32 on CPU
    path: tuple[int, ...]
    pending: tuple[int, ...]

    @staticmethod
    def forced(hyp: Hyp) -> Step:
        """A forced hypothesis's step, without the model: its token joins the pending ones."""
        return Step(hyp.node.child_ids, _ZERO, hyp.path, hyp.pending)

    def child(self, hyp: Hyp, tok: int, logp: float, tokens: tuple[int, ...] = ()) -> Hyp:
        return Hyp(hyp.node.children[tok], (*self.pending, tok), self.path, hyp.image, logp, tokens)


class KVPool:
    """Per-layer self-attention keys/values of every token run so far, one slot per token."""

    def __init__(self, layers: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        self.size = 0
        self.k = [like.new_empty(64, heads, head_dim) for _ in range(layers)]
        self.v = [like.new_empty(64, heads, head_dim) for _ in range(layers)]

    def add(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]
            ) -> list[tuple[int, ...]]:
        """Store the first lengths[i] new tokens of each row (R,H,t,dh); their slots per row."""
        r, heads, t, head_dim = new_kv[0][0].shape
        n = sum(lengths)
        while self.size + n > self.k[0].shape[0]:  # grow by doubling
            self.k = [torch.cat([p, torch.empty_like(p)]) for p in self.k]
            self.v = [torch.cat([p, torch.empty_like(p)]) for p in self.v]
        keep = None
        if n != r * t:  # rows padded past their own length: pick the real tokens
            keep = torch.tensor([i * t + j for i, length in enumerate(lengths) for j in range(length)],
                                device=self.k[0].device)
        for pool_k, pool_v, (k, v) in zip(self.k, self.v, new_kv):
            for pool, new in ((pool_k, k), (pool_v, v)):
                flat = new.transpose(1, 2).reshape(r * t, heads, head_dim)
                pool[self.size:self.size + n] = flat if keep is None else flat[keep]
        starts = itertools.accumulate(lengths, initial=self.size)
        self.size += n
        return [tuple(range(s, s + length)) for s, length in zip(starts, lengths)]

    def gather(self, paths: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """paths (R,P) slot ids -> per layer (k, v) of shape (R,H,P,dh)."""
        return [(k[paths].transpose(1, 2), v[paths].transpose(1, 2))
                for k, v in zip(self.k, self.v)]


class Stepper:
    """Runs hypotheses of one encoded image batch one token forward."""

    def __init__(self, model: OFAModel, memory: Memory, temperature: float = 1.0) -> None:
        """`temperature` divides the logits before the softmax, as ModelScope's
        generation mode does with its beam_search setting (traverse mode does not)."""
        self.model, self.memory = model, memory
        self.temperature = temperature
        cfg = model.config
        self.device = memory.enc.device
        self.pool = KVPool(cfg.decoder_layers, cfg.decoder_attention_heads,
                           cfg.d_model // cfg.decoder_attention_heads, memory.enc)

    def run(self, hyps: list[Hyp]) -> list[Step]:
        """One step for each hypothesis. Forced ones need no model; the others
        run their pending tokens through the decoder in one batched call."""
        steps: list[Step | None] = [Step.forced(h) if h.forced else None for h in hyps]
        todo = [h for h in hyps if not h.forced]
        if todo:
            ran = iter(self._decode(todo))
            steps = [s if s is not None else next(ran) for s in steps]
        return cast("list[Step]", steps)

    def _decode(self, hyps: list[Hyp]) -> list[Step]:
        r = len(hyps)
        p = max(len(h.path) for h in hyps)
        lengths = [len(h.pending) for h in hyps]
        t = max(lengths)
        paths = torch.zeros(r, p, dtype=torch.long)
        past_valid = torch.zeros(r, p, dtype=torch.bool)
        for i, h in enumerate(hyps):
            paths[i, :len(h.path)] = torch.tensor(h.path, dtype=torch.long)
            past_valid[i, :len(h.path)] = True
        # rows with fewer pending tokens are padded by repeating their last one; the
        # padding is masked out as a key and its outputs are dropped
        tokens = torch.tensor([[*h.pending, *h.pending[-1:] * (t - len(h.pending))] for h in hyps])
        new_valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
        limit = self.memory.cross_bias.shape[1] - 1  # padding may run past the last position
        positions = (torch.tensor([len(h.path) for h in hyps])[:, None] + torch.arange(t)).clamp(max=limit)
        dev = self.device
        row_image = torch.tensor([h.image for h in hyps], device=dev)
        past = (self.pool.gather(paths.to(dev)) if p else self.model.empty_past(r, self.memory))
        hidden, new_kv = self.model.decode(tokens.to(dev), positions.to(dev), row_image, past,
                                           past_valid.to(dev), self.memory, new_valid.to(dev))
        new_slots = self.pool.add(new_kv, lengths)
        last = hidden[torch.arange(r, device=dev), torch.tensor(lengths, device=dev) - 1]  # (R, d)

        # logits of the union of all rows' children, then each row's own softmax;
        # rows often share a trie node (every image starts at the root), so the
        # union and each node's columns are built once per node
        nodes = {id(h.node): h.node for h in hyps}
        union: dict[int, int] = {}
        for node in nodes.values():
            for tok in node.child_ids:
                union.setdefault(tok, len(union))
        node_cols = {key: torch.tensor([union[tok] for tok in node.child_ids], dtype=torch.long)
                     for key, node in nodes.items()}
        cols = [node_cols[id(h.node)] for h in hyps]
        ids = torch.tensor(list(union), device=dev)
        logits = self.model.token_logits(last, ids).float()  # (R, U)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        allowed = torch.zeros(r, len(union), dtype=torch.bool)
        for i, c in enumerate(cols):
            allowed[i, c] = True
        logp = logits.masked_fill(~allowed.to(dev), float("-inf")).log_softmax(-1).cpu()
        return [Step(h.node.child_ids, logp[i, cols[i]], (*h.path, *slots), ())
                for i, (h, slots) in enumerate(zip(hyps, new_slots))]


def start(n_images: int, trie: LabelTrie) -> list[Hyp]:
    return [Hyp(trie.root, (BOS,), (), i, 0.0, (BOS,)) for i in range(n_images)]


# A heap entry's payload: a hypothesis, or the j-th best child of an expanded one
# (parent, its step, child positions best first, their log-probs, j), made into a
# hypothesis only when it is popped.
_Children = tuple[Hyp, Step, list[int], list[float], int]
_Entry = tuple[float, int, "Hyp | _Children"]


def exact_topk(stepper: Stepper, trie: LabelTrie, n_images: int, k: int,
               width: int | None = None, min_logp: float | None = None
               ) -> list[list[tuple[int, float]]]:
    """The k most probable labels per image, exactly, as (label index, log-prob);
    with `min_logp`, and past the k, every label of at least that log-prob too.

    Best-first search: a prefix's log-prob bounds every completion's (each step
    adds a log-prob <= 0), so a finished label popped while it is the best
    entry of the frontier beats everything not yet finished. Each round expands
    up to `width` best unfinished prefixes per image in one batched call
    (default max(k, 4): about a beam's worth of rows, so a confident model costs
    what a beam search costs; wider rounds only pay off on near-uniform models).

    An expanded prefix enters the frontier as its best child alone; popping a
    child puts its next-best sibling in its place. The root has ~600 children,
    nearly all of which are never popped, and making each one a hypothesis took
    most of the search's time at GPU batch sizes."""
    k = min(k, len(trie.names))
    width = width or max(k, 4)
    floor = math.inf if min_logp is None else min_logp  # inf: nothing past the k
    tie = itertools.count()
    heaps: list[list[_Entry]] = [[(0.0, next(tie), h)] for h in start(n_images, trie)]
    found: list[list[tuple[int, float]]] = [[] for _ in range(n_images)]

    def pop(heap: list[_Entry]) -> tuple[float, Hyp]:
        key, _, item = heapq.heappop(heap)
        if isinstance(item, Hyp):
            return key, item
        parent, step, order, logps, j = item
        if j + 1 < len(order):
            heapq.heappush(heap, (-(parent.logp + logps[order[j + 1]]), next(tie),
                                  (parent, step, order, logps, j + 1)))
        c = order[j]
        return key, step.child(parent, step.child_ids[c], parent.logp + logps[c])

    while True:
        batch: list[Hyp] = []
        for i, heap in enumerate(heaps):
            picked: list[Hyp] = []
            deferred: list[_Entry] = []
            # the frontier's best key bounds every label not yet found
            while heap and (len(found[i]) < k or -heap[0][0] >= floor) and len(picked) < width:
                key, hyp = pop(heap)
                if hyp.forced:  # free: its only child has the same log-prob
                    child = Step.forced(hyp).child(hyp, hyp.node.child_ids[0], hyp.logp)
                    heapq.heappush(heap, (key, next(tie), child))
                elif hyp.node.label is None:
                    picked.append(hyp)
                elif not picked:  # the best of the whole frontier: final
                    found[i].append((hyp.node.label, hyp.logp))
                else:  # an entry picked this round may still beat it
                    deferred.append((key, next(tie), hyp))
            for entry in deferred:
                heapq.heappush(heap, entry)
            batch.extend(picked)
        if not batch:
            return found
        for hyp, step in zip(batch, stepper.run(batch)):
            # best first; ties keep the trie's child order, as separate pushes did
            order = torch.argsort(step.logp, descending=True, stable=True).tolist()
            logps = step.logp.tolist()
            heapq.heappush(heaps[hyp.image], (-(hyp.logp + logps[order[0]]), next(tie),
                                              (hyp, step, order, logps, 0)))


def beam_search(stepper: Stepper, trie: LabelTrie, n_images: int, settings: BeamSettings,
                src_len: int) -> list[list[tuple[int, float]]]:
    """ModelScope's constrained beam search (fairseq SequenceGenerator + BeamSearch),
    with its settings; per image the finished hypotheses as (label index,
    length-normalised score), best first. An image can finish none: when
    max_len / min_len leave no label room to end, every beam dies unfinished.
    `settings.temperature` is the stepper's to apply."""
    beam = min(settings.beam_size, len(trie.names))
    max_len = settings.max_len(src_len)
    min_len = settings.min_len
    ngram = settings.no_repeat_ngram_size
    len_penalty = settings.len_penalty
    normalize = settings.normalize_scores
    unk_penalty = settings.unk_penalty

    node_ids: dict[int, torch.Tensor] = {}  # a trie node's child tokens, as a tensor
    beams = {i: [h] for i, h in enumerate(start(n_images, trie))}
    finished: list[list[tuple[int, float]]] = [[] for _ in range(n_images)]
    for step in range(max_len + 1):
        rows = [h for i in sorted(beams) for h in beams[i]]
        results = stepper.run(rows)
        by_image: dict[int, list[tuple[float, int, int, Step, Hyp]]] = {}
        for b_index, (hyp, step_result) in enumerate(zip(rows, results)):
            child_ids = step_result.child_ids
            lp = step_result.logp.clone()
            ids = node_ids.get(id(hyp.node))
            if ids is None:
                ids = node_ids[id(hyp.node)] = torch.tensor(child_ids)
            if step < min_len:
                lp[ids == EOS] = float("-inf")
            lp[ids == PAD] = float("-inf")
            lp[ids == UNK] -= unk_penalty
            if step >= max_len:
                lp[ids != EOS] = float("-inf")
            for tok in _ngram_bans(hyp.tokens, ngram) if ngram > 0 else ():
                lp[ids == tok] = float("-inf")
            # Only a row's 2 * beam best can be among its image's 2 * beam best, so
            # only those become candidates (the root has ~600 children); the stable
            # sort keeps the trie's order among equal scores, as the full list did.
            best = torch.argsort(lp, descending=True, stable=True)[:2 * beam]
            cands = by_image.setdefault(hyp.image, [])
            for c, value in zip(best.tolist(), lp[best].tolist()):
                score = hyp.logp + value
                if math.isfinite(score):  # -inf candidates can fill slots but never finish
                    cands.append((score, b_index, child_ids[c], step_result, hyp))
        for i, cands in by_image.items():
            # topk over (beam, token) in descending score; ties keep (beam, token) order
            cands.sort(key=lambda c: -c[0])
            top = cands[: 2 * beam]
            for score, _, tok, _, parent in top[:beam]:
                if tok == EOS and len(finished[i]) < beam:
                    norm = score / (step + 1) ** len_penalty if normalize else score
                    label = parent.node.children[tok].label
                    assert label is not None
                    finished[i].append((label, norm))
            nxt = [res.child(parent, tok, score, (*parent.tokens, tok))
                   for score, _, tok, res, parent in top if tok != EOS][:beam]
            if len(finished[i]) >= beam or step >= max_len or not nxt:
                del beams[i]
            else:
                beams[i] = nxt
        if not beams:
            break
    return [sorted(f, key=lambda x: -x[1]) for f in finished]


def _ngram_bans(tokens: tuple[int, ...], n: int) -> set[int]:
    """Tokens that would repeat an n-gram already in `tokens` (<s> included)."""
    if len(tokens) < n - 1 or n < 1:
        return set()
    key = tokens[len(tokens) - (n - 1):] if n > 1 else ()
    return {tokens[j + n - 1] for j in range(len(tokens) - n + 1)
            if tokens[j:j + n - 1] == key}


def label_logprobs(stepper: Stepper, trie: LabelTrie, labels: list[int]) -> list[float]:
    """The log-prob of label `labels[i]` for image i, read off one decoder call that
    feeds each label's own tokens (teacher forcing) instead of searching: what
    exact_topk would find for it, without finding the labels above it first."""
    model, memory, dev = stepper.model, stepper.memory, stepper.device
    seqs = [[BOS, *trie.token_ids[label]] for label in labels]  # inputs; each next one the target
    lengths = [len(s) for s in seqs]
    t = max(lengths)
    tokens = torch.tensor([[*s, *s[-1:] * (t - len(s))] for s in seqs], device=dev)
    new_valid = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(dev)
    limit = memory.cross_bias.shape[1] - 1
    positions = torch.arange(t).clamp(max=limit)[None, :].expand(len(seqs), t).to(dev)
    rows = torch.arange(len(seqs), device=dev)
    hidden, _ = model.decode(tokens, positions, rows, model.empty_past(len(seqs), memory),
                             torch.zeros(len(seqs), 0, dtype=torch.bool, device=dev), memory, new_valid)
    out = []
    for i, label in enumerate(labels):
        node, total = trie.root, 0.0
        for j, tok in enumerate([*trie.token_ids[label], EOS]):
            ids = node.child_ids
            if len(ids) > 1:  # a single continuation has log-prob exactly 0, as in the search
                logits = model.token_logits(hidden[i, j][None], torch.tensor(ids, device=dev)).float()
                if stepper.temperature != 1.0:
                    logits = logits / stepper.temperature
                total += float(logits.log_softmax(-1)[0, ids.index(tok)])
            node = node.children[tok]
        out.append(total)
    return out
