"""Decoding over the label trie: exact best-first top-k, and ModelScope's beam search.

Both advance *hypotheses* (a label prefix and its score) one token at a time
through `Stepper`, which batches any set of hypotheses - across images, at any
depth - into one decoder call, keeping each token's self-attention keys/values
in a pool so a hypothesis never recomputes its prefix.

At every step the next-token distribution is the softmax over the trie
children only (the reference masks other logits to -inf *before* its
log-softmax), so we compute logits for those children alone.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ofacls.labels import BOS, EOS, PAD, UNK, LabelTrie, TrieNode
from ofacls.model.ofa import Memory, OFAModel


@dataclass(frozen=True)
class Hyp:
    node: TrieNode  # trie node reached by `token`
    token: int  # last token, not yet run through the decoder
    path: tuple[int, ...]  # pool slots of the earlier tokens, positions 0..len-1
    image: int  # row of the image batch
    logp: float  # sum of constrained log-probs of the tokens after <s>
    tokens: tuple[int, ...] = ()  # <s> + generated tokens (beam search's n-gram blocking)


class KVPool:
    """Per-layer self-attention keys/values of every token run so far, one slot per token."""

    def __init__(self, layers: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        self.size = 0
        self.k = [like.new_empty(64, heads, head_dim) for _ in range(layers)]
        self.v = [like.new_empty(64, heads, head_dim) for _ in range(layers)]

    def add(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        rows = new_kv[0][0].shape[0]
        while self.size + rows > self.k[0].shape[0]:  # grow by doubling
            self.k = [torch.cat([t, torch.empty_like(t)]) for t in self.k]
            self.v = [torch.cat([t, torch.empty_like(t)]) for t in self.v]
        for pool_k, pool_v, (k, v) in zip(self.k, self.v, new_kv):
            pool_k[self.size:self.size + rows] = k[:, :, 0]  # (R,H,1,dh) -> (R,H,dh)
            pool_v[self.size:self.size + rows] = v[:, :, 0]
        self.size += rows
        return list(range(self.size - rows, self.size))

    def gather(self, paths: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """paths (R,P) slot ids -> per layer (k, v) of shape (R,H,P,dh)."""
        return [(k[paths].transpose(1, 2), v[paths].transpose(1, 2))
                for k, v in zip(self.k, self.v)]


class Stepper:
    """Runs hypotheses of one encoded image batch one token forward."""

    def __init__(self, model: OFAModel, memory: Memory) -> None:
        self.model, self.memory = model, memory
        cfg = model.config
        self.device = memory.keys[0].device
        self.pool = KVPool(cfg.decoder_layers, cfg.decoder_attention_heads,
                           cfg.d_model // cfg.decoder_attention_heads, memory.keys[0])

    def run(self, hyps: list[Hyp]) -> list[tuple[list[int], torch.Tensor, int]]:
        """For each hypothesis: its trie children's ids, their constrained
        log-probs (float32, on CPU), and the pool slot of the token just run."""
        r = len(hyps)
        p = max(len(h.path) for h in hyps)
        paths = torch.zeros(r, p, dtype=torch.long)
        valid = torch.zeros(r, p, dtype=torch.bool)
        for i, h in enumerate(hyps):
            paths[i, :len(h.path)] = torch.tensor(h.path, dtype=torch.long)
            valid[i, :len(h.path)] = True
        dev = self.device
        tokens = torch.tensor([[h.token] for h in hyps], device=dev)
        positions = torch.tensor([[len(h.path)] for h in hyps], device=dev)
        row_image = torch.tensor([h.image for h in hyps], device=dev)
        past = (self.pool.gather(paths.to(dev)) if p else self.model.empty_past(r, self.memory))
        hidden, new_kv = self.model.decode(tokens, positions, row_image, past, valid.to(dev),
                                           self.memory)
        slots = self.pool.add(new_kv)

        # logits of the union of all rows' children, then each row's own softmax
        union: dict[int, int] = {}
        for h in hyps:
            for tok in h.node.child_ids:
                union.setdefault(tok, len(union))
        ids = torch.tensor(list(union), device=dev)
        logits = self.model.token_logits(hidden[:, 0], ids).float()  # (R, U)
        allowed = torch.zeros(r, len(union), dtype=torch.bool)
        cols = [torch.tensor([union[t] for t in h.node.child_ids], dtype=torch.long) for h in hyps]
        for i, c in enumerate(cols):
            allowed[i, c] = True
        logp = logits.masked_fill(~allowed.to(dev), float("-inf")).log_softmax(-1).cpu()
        return [(h.node.child_ids, logp[i, cols[i]], slot)
                for i, (h, slot) in enumerate(zip(hyps, slots))]


def start(n_images: int, trie: LabelTrie) -> list[Hyp]:
    return [Hyp(trie.root, BOS, (), i, 0.0, (BOS,)) for i in range(n_images)]


def exact_topk(stepper: Stepper, trie: LabelTrie, n_images: int, k: int,
               width: int | None = None) -> list[list[tuple[int, float]]]:
    """The k most probable labels per image, exactly, as (label index, log-prob).

    Best-first search: a prefix's log-prob bounds every completion's (each step
    adds a log-prob <= 0), so a finished label popped while it is the best
    entry of the frontier beats everything not yet finished. Each round expands
    up to `width` best unfinished prefixes per image in one batched call
    (default max(k, 4): about a beam's worth of rows, so a confident model costs
    what a beam search costs; wider rounds only pay off on near-uniform models)."""
    k = min(k, len(trie.names))
    width = width or max(k, 4)
    tie = itertools.count()
    heaps: list[list[tuple[float, int, Hyp]]] = [[(0.0, next(tie), h)] for h in start(n_images, trie)]
    found: list[list[tuple[int, float]]] = [[] for _ in range(n_images)]
    while True:
        batch: list[Hyp] = []
        for i, heap in enumerate(heaps):
            picked: list[Hyp] = []
            deferred = []
            while heap and len(found[i]) < k and len(picked) < width:
                entry = heapq.heappop(heap)
                hyp = entry[2]
                if hyp.node.label is None:
                    picked.append(hyp)
                elif not picked:  # the best of the whole frontier: final
                    found[i].append((hyp.node.label, hyp.logp))
                else:  # an entry picked this round may still beat it
                    deferred.append(entry)
            for entry in deferred:
                heapq.heappush(heap, entry)
            batch.extend(picked)
        if not batch:
            return found
        for hyp, (child_ids, logp, slot) in zip(batch, stepper.run(batch)):
            path = (*hyp.path, slot)
            for tok, lp in zip(child_ids, logp.tolist()):
                child = Hyp(hyp.node.children[tok], tok, path, hyp.image, hyp.logp + lp)
                heapq.heappush(heaps[hyp.image], (-child.logp, next(tie), child))


def beam_search(stepper: Stepper, trie: LabelTrie, n_images: int, settings: dict[str, Any],
                src_len: int) -> list[list[tuple[int, float]]]:
    """ModelScope's constrained beam search (fairseq SequenceGenerator + BeamSearch),
    with its settings; per image the finished hypotheses as (label index,
    length-normalised score), best first."""
    beam = min(int(settings["beam_size"]), len(trie.names))
    max_len = int(settings["max_len_a"] * src_len + settings["max_len_b"])
    min_len = int(settings["min_len"])
    ngram = int(settings["no_repeat_ngram_size"])
    len_penalty = float(settings["len_penalty"])
    normalize = bool(settings["normalize_scores"])
    unk_penalty = float(settings["unk_penalty"])

    beams = {i: [h] for i, h in enumerate(start(n_images, trie))}
    finished: list[list[tuple[int, float]]] = [[] for _ in range(n_images)]
    for step in range(max_len + 1):
        rows = [h for i in sorted(beams) for h in beams[i]]
        results = stepper.run(rows)
        by_image: dict[int, list[tuple[float, int, int, TrieNode, tuple[int, ...], Hyp]]] = {}
        for b_index, (hyp, (child_ids, logp, slot)) in enumerate(zip(rows, results)):
            lp = logp.clone()
            ids = torch.tensor(child_ids)
            if step < min_len:
                lp[ids == EOS] = float("-inf")
            lp[ids == PAD] = float("-inf")
            lp[ids == UNK] -= unk_penalty
            if step >= max_len:
                lp[ids != EOS] = float("-inf")
            banned = _ngram_bans(hyp.tokens, ngram) if ngram > 0 else set()
            cands = by_image.setdefault(hyp.image, [])
            path = (*hyp.path, slot)
            for tok, value in zip(child_ids, lp.tolist()):
                score = hyp.logp + value
                if tok in banned or not math.isfinite(score):
                    continue  # -inf candidates can fill slots but never finish: drop them
                cands.append((score, b_index, tok, hyp.node.children[tok], path, hyp))
        for i, cands in by_image.items():
            # topk over (beam, token) in descending score; ties keep (beam, token) order
            cands.sort(key=lambda c: -c[0])
            top = cands[: 2 * beam]
            for score, _, tok, node, _, _ in top[:beam]:
                if tok == EOS and len(finished[i]) < beam:
                    norm = score / (step + 1) ** len_penalty if normalize else score
                    assert node.label is not None
                    finished[i].append((node.label, norm))
            nxt = [Hyp(node, tok, path, i, score, (*parent.tokens, tok))
                   for score, _, tok, node, path, parent in top if tok != EOS][:beam]
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
