"""OFA's encoder-decoder, inference only, in the pre-norm NormFormer form
ModelScope's OFA-Large checkpoints use.

Reading guide (d = d_model, H = heads, dh = d / H, N = image tokens, L = prompt
tokens, T = N + L encoder tokens):

* The encoder sees [image tokens; text tokens]. Image tokens are ResNet layer3
  features projected to d; text tokens are shared-embedding rows. Neither gets
  a position *embedding*: positions act only through attention biases, an
  absolute one (from layer-normed position tables, shared by all layers) plus a
  per-layer relative one (1-D buckets for text x text, 2-D buckets for
  image x image; cross-modal blocks get the absolute bias only).
* The decoder has its own position tables and biases; cross-attention keys get
  an absolute bias built from the encoder's layer-normed positions.
* Every attention scales logits by (2 * dh) ** -0.5 and multiplies each head's
  output by a learned gain `c_attn` before `out_proj` (NormFormer head scaling).
* Every block is pre-norm with NormFormer's extra LayerNorms: one after each
  attention, one over the FFN's hidden (F-dim) activations.

Decoding is incremental: `decode` advances any set of hypotheses by one token
each, given their cached self-attention keys/values. Rows of different lengths
and images may share one call; that is what lets the exact trie search and the
beam search batch freely. Cross-attention reads the encoder output itself until
enough queries have run to make projecting it into keys/values pay (`Memory`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ofacls.model.config import OFAConfig
from ofacls.model.resnet import ResNetTrunk


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: the checkpoint fills it. (Its default
    normal_ init on the meta device would import torch's Python decompositions,
    about 1.5 s of start-up.)"""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


T = TypeVar("T")


class _KeptLast:
    """The value computed for the last key: the position biases, which depend on
    the weights and the grid but not on the image, are computed once.
    Kept in inference mode only (inference tensors cannot enter autograd)."""

    def __init__(self) -> None:
        self.entry: tuple[Hashable, Any] | None = None

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        if not torch.is_inference_mode_enabled():
            return compute()
        if self.entry is None or self.entry[0] != key:
            self.entry = (key, compute())
        return cast(T, self.entry[1])


def _layer_norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, scale_factor: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        # OFA scales by (dh * 2) ** -0.5, applied to q after its bias
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.c_attn = nn.Parameter(torch.ones(heads))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, t, d) -> (B, H, t, dh)"""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """q (B,H,t,dh) unscaled, k/v (B,H,S,dh), additive bias broadcastable to (B,H,t,S).
        Returns the per-head outputs times c_attn, (B,H,t,dh); `merge` projects them."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        return o * self.c_attn.view(1, -1, 1, 1).to(o.dtype)

    def attend_encoded(self, q: torch.Tensor, enc: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`attend(q, split(k_proj(enc)), split(v_proj(enc)), bias)` without projecting
        the encoder output enc (B,T,d, in fp32 when q is fp16 or bf16: `Memory.wide`),
        for q (B,H,n,dh) and bias (B,H,n,T).

        Per head h, q . (W_h e + b_h) = (W_h^T q) . e + q . b_h, and the last term is
        the same for every key, so the softmax drops it; and sum_j p_j (V_h e_j + c_h)
        = V_h (sum_j p_j e_j) + c_h, as the p_j sum to 1. Each query thus costs
        ~4*H*d*T FLOPs instead of the 4*d*d*T per image of projecting every
        encoder token. Scores and softmax run in fp32 at least (as SDPA's kernels
        keep them): from fp16, a dot product over d terms would round far more
        than one over dh."""
        b, h, n, dh = q.shape
        d = enc.shape[-1]
        # (H, B*n, dh) @ (H, dh, d): each head's query carried into the encoder's space
        qh = (q * self.scaling).transpose(0, 1).reshape(h, b * n, dh)
        qe = torch.bmm(qh, self.k_proj.weight.view(h, dh, d)).view(h, b, n, d)
        qe = qe.transpose(0, 1).reshape(b, h * n, d).to(enc.dtype)
        scores = torch.baddbmm(bias.reshape(b, h * n, -1).to(enc.dtype), qe, enc.transpose(1, 2))
        ctx = torch.bmm(scores.softmax(-1), enc).to(q.dtype)  # (B, H*n, d)
        ctx = ctx.view(b, h, n, d).transpose(0, 1).reshape(h, b * n, d)
        o = torch.baddbmm(self.v_proj.bias.view(h, 1, dh), ctx,
                          self.v_proj.weight.view(h, dh, d).transpose(1, 2))  # (H, B*n, dh)
        o = o.view(h, b, n, dh).transpose(0, 1)
        return o * self.c_attn.view(1, -1, 1, 1).to(o.dtype)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B,H,t,dh) -> out_proj over the concatenated heads, (B,t,d)"""
        b, h, t, dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, t, h * dh))


class _Block(nn.Module):
    """The NormFormer feed-forward shared by encoder and decoder layers."""

    def _init_ffn(self, d: int, ffn: int) -> None:
        self.final_layer_norm = _layer_norm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.ffn_layer_norm = _layer_norm(ffn)  # over the F-dim hidden (NormFormer)
        self.fc2 = nn.Linear(ffn, d)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        # exact erf GELU, as ModelScope's ACT2FN['gelu']
        return self.fc2(self.ffn_layer_norm(F.gelu(self.fc1(self.final_layer_norm(x)))))


class EncoderLayer(_Block):
    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads, cfg.attn_scale_factor)
        self.self_attn_layer_norm = _layer_norm(d)
        self.self_attn_mid_layer_norm = _layer_norm(d)
        self._init_ffn(d, cfg.encoder_ffn_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                key_order: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,d); bias (1,H,T,T) laid out for keys taken in `key_order` (None: as is)."""
        a = self.self_attn
        y = self.self_attn_layer_norm(x)
        y_keys = y if key_order is None else y[:, key_order]
        o = a.attend(a.split(a.q_proj(y)), a.split(a.k_proj(y_keys)), a.split(a.v_proj(y_keys)),
                     bias)
        x = x + self.self_attn_mid_layer_norm(a.merge(o))
        x = x + self.ffn(x)
        if x.dtype == torch.float16:
            # as the reference's encoder layer: an fp16 overflow to inf is clamped
            # (a no-op on finite values, so no data-dependent branch is needed)
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp_(-limit, limit)
        return x


def _abs_pos_bias(q_lin: nn.Linear, k_lin: nn.Linear, pos_q: torch.Tensor, pos_k: torch.Tensor,
                  heads: int, scaling: float) -> torch.Tensor:
    """Absolute position bias (H, tq, tk): per-head dot products of projected positions."""
    q = (q_lin(pos_q) * scaling).view(pos_q.shape[0], heads, -1).transpose(0, 1)
    k = k_lin(pos_k).view(pos_k.shape[0], heads, -1).transpose(0, 1)
    return q @ k.transpose(1, 2)


class Encoder(nn.Module):
    token_rp_bucket: torch.Tensor  # (1024, 1024) 1-D relative buckets, query minus key
    image_rp_bucket: torch.Tensor  # (1765, 1765) 2-D relative buckets between image position ids

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.encoder_attention_heads
        self.heads = heads
        self.bucket = cfg.image_bucket_size
        self.pos_scaling = (d / heads * cfg.attn_scale_factor) ** -0.5
        self.embed_images = ResNetTrunk(cfg.resnet_layers)
        self.image_proj = nn.Linear(ResNetTrunk.out_channels, d)
        self.type_embedding = _embedding(2, d)  # row 0: text, row 1: image
        self.layernorm_embedding = _layer_norm(d)
        self.patch_layernorm_embedding = _layer_norm(d)
        self.embed_positions = _embedding(cfg.max_position_embeddings + 2, d)
        self.embed_image_positions = _embedding(cfg.image_bucket_size**2 + 1, d)
        self.pos_ln = _layer_norm(d)
        self.image_pos_ln = _layer_norm(d)
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        n_img_rel = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            _embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(cfg.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            _embedding(n_img_rel, heads) for _ in range(cfg.encoder_layers))
        n_img_pos = cfg.image_bucket_size**2 + 1
        self.register_buffer("token_rp_bucket", torch.zeros(
            cfg.max_position_embeddings, cfg.max_position_embeddings, dtype=torch.long))
        self.register_buffer("image_rp_bucket", torch.zeros(n_img_pos, n_img_pos, dtype=torch.long))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = _layer_norm(d)
        self._toeplitz: dict[int, bool] = {}
        self._positions = _KeptLast()

    def image_position_ids(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Row-major ids r * bucket + c + 1 of an h x w feature map (0 is never used)."""
        if h > self.bucket or w > self.bucket:
            raise ValueError(f"feature map {h}x{w} exceeds the {self.bucket}x{self.bucket} "
                             "position grid: image too large for this model")
        r = torch.arange(h, device=device)[:, None]
        c = torch.arange(w, device=device)[None, :]
        return (r * self.bucket + c + 1).flatten()

    def _buckets_are_toeplitz(self, img_ids: torch.Tensor) -> bool:
        """Whether the checkpoint's image buckets are ModelScope's formula
        (dr + 41) * 83 + (dc + 41) on this grid; checked once per grid size."""
        key = int(img_ids[-1])
        if key not in self._toeplitz:
            side = 2 * self.bucket - 1
            r, c = (img_ids - 1) // self.bucket, (img_ids - 1) % self.bucket
            formula = ((r[:, None] - r[None, :] + self.bucket - 1) * side
                       + (c[:, None] - c[None, :] + self.bucket - 1))
            self._toeplitz[key] = torch.equal(self.image_rp_bucket[img_ids][:, img_ids], formula)
        return self._toeplitz[key]

    def _image_bias_view(self, table: nn.Embedding, h: int, w: int) -> torch.Tensor:
        """(H, h, w, h, w) view: [ra, ca, rb', cb'] = table[(ra - rb) + 41, (ca - cb) + 41]
        for the key (rb, cb) = (h-1-rb', w-1-cb'), i.e. keys in reverse order.

        In two stages, so that reading the view walks contiguous runs (a single
        unfold of the table over both axes reads ~2x slower): a small materialised
        rows[r, ca, cb'] = grid[r, ca + cb' + 42 - w], then the view
        [ra, ca, rb', cb'] = rows[ra + rb' + 42 - h, ca, cb']."""
        side, k = 2 * self.bucket - 1, self.bucket
        grid = table.weight.T[:, :side * side].reshape(-1, side, side)  # (H, 83, 83)
        rows = grid.unfold(2, w, 1)[:, :, k - w:k].contiguous()  # (H, 83, w, w)
        return rows.unfold(1, h, 1)[:, k - h:k].permute(0, 1, 2, 4, 3)

    def positions(self, h: int, w: int, length: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For an h x w feature map and `length` text tokens: the layer-normed
        positions (T, d), the absolute position bias (H, T, T) laid out for keys
        in `key_order`, and that order (None: as is).

        They depend on the grid and the weights only, not on the image, so in
        inference mode the last grid's are kept (52 MB at OFA-Large's 30x30:
        saves ~40 ms of every forward on CPU)."""
        return self._positions.get((h, w, length, device, dtype),
                                   lambda: self._compute_positions(h, w, length, device))

    def _compute_positions(self, h: int, w: int, length: int, device: torch.device
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        img_ids = self.image_position_ids(h, w, device)
        n = img_ids.numel()
        pos = torch.cat([self.image_pos_ln(self.embed_image_positions(img_ids)),
                         self.pos_ln(self.embed_positions(torch.arange(length, device=device)))])
        # Attention does not care in which order it sees the keys. Taking the image
        # keys in reverse order makes every layer's 2-D relative bias a strided view
        # of its small (2*42-1)^2 table, instead of a gather of N*N entries per head.
        key_order = (torch.cat([torch.arange(n - 1, -1, -1, device=device),
                                torch.arange(n, n + length, device=device)])
                     if self._buckets_are_toeplitz(img_ids) else None)
        abs_bias = _abs_pos_bias(self.pos_q_linear, self.pos_k_linear, pos,
                                 pos if key_order is None else pos[key_order],
                                 self.heads, self.pos_scaling)
        return pos, abs_bias, key_order

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor,
                embed_tokens: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B,L), images (B,3,S,S) -> hidden (B,T,d) and positions (T,d).

        Every row shares one prompt and image size, so nothing is padded and the
        position biases are computed once for the whole batch."""
        feats = self.embed_images(images)  # (B, 1024, h, w)
        b, _, h, w = feats.shape
        length = input_ids.shape[1]
        type_txt, type_img = self.type_embedding.weight
        # One projection per image on its (1, N, 1024) transposed view, as the reference
        # computes it: with several images that non-contiguous view takes another GEMM
        # path whose rounding depends on the batch size (torch 2.14), and batch answers
        # must equal single-image ones.
        patches = feats.flatten(2).transpose(1, 2)
        x_img = self.patch_layernorm_embedding(  # (B, N, d)
            torch.cat([self.image_proj(patches[i:i + 1]) for i in range(b)]) + type_img)
        x_txt = self.layernorm_embedding(embed_tokens(input_ids) + type_txt)  # (B, L, d)
        x = torch.cat([x_img, x_txt], dim=1)  # (B, T, d): image first
        n = x_img.shape[1]

        pos, abs_bias, key_order = self.positions(h, w, length, x.device, x.dtype)
        img_bucket = None
        if key_order is None:
            img_ids = self.image_position_ids(h, w, x.device)
            img_bucket = self.image_rp_bucket[img_ids][:, img_ids].flatten()
        txt_bucket = self.token_rp_bucket[:length, :length].flatten()  # (L*L,), query minus key
        bias = torch.empty_like(abs_bias)
        # cross-modal blocks get the absolute bias only, in every layer
        bias[:, :n, n:] = abs_bias[:, :n, n:]
        bias[:, n:, :n] = abs_bias[:, n:, :n]
        for layer, tok_table, img_table in zip(
                self.layers, cast("list[nn.Embedding]", self.token_rel_pos_table_list),
                cast("list[nn.Embedding]", self.image_rel_pos_table_list)):
            # abs + relative, written in one pass per block: these (H, T, T) tensors are
            # the encoder's largest memory traffic after the weights
            if img_bucket is None:
                grid = (-1, h, w, h, w)
                rel = self._image_bias_view(img_table, h, w)
                if rel.dtype != torch.float32:
                    # bf16/fp16 adds from a strided view take a slow scalar path on CPU
                    # (3x slower than copying the view out first); fp32's is vectorised
                    rel = rel.contiguous()
                torch.add(abs_bias[:, :n, :n].view(grid), rel, out=bias[:, :n, :n].view(grid))
            else:
                torch.add(abs_bias[:, :n, :n], _gather_heads(img_table, img_bucket).view(-1, n, n),
                          out=bias[:, :n, :n])
            torch.add(abs_bias[:, n:, n:],
                      _gather_heads(tok_table, txt_bucket).view(-1, length, length),
                      out=bias[:, n:, n:])
            x = layer(x, bias.unsqueeze(0), key_order)
        return self.layer_norm(x), pos


def _gather_heads(table: nn.Embedding, buckets: torch.Tensor) -> torch.Tensor:
    """Relative-bias lookup straight into head-major layout: (H, len(buckets))."""
    return table.weight.T.contiguous().index_select(1, buckets)


@dataclass
class Memory:
    """What the decoder needs from one encoded batch of images.

    Cross-attention starts from the encoder output itself (`attend_encoded`):
    decoding a label runs a handful of queries per image, far fewer than the
    T encoder tokens that projecting keys/values would cost (at OFA-Large, every
    layer's keys and values are ~10% of an image's FLOPs). Once an image has run
    as many queries as that projection costs, `Decoder.forward` projects them
    after all and keeps them: about twice the cheaper choice's work at worst,
    whatever the search does."""

    enc: torch.Tensor  # (B, T, d): the encoder output
    cross_bias: torch.Tensor  # (H, M, T): decoder position x encoder token
    batch_size: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (B, H, T, dh), once projected
    queries: int = 0  # decoder queries run so far per image: each call's most loaded image, summed
    _wide: torch.Tensor | None = None

    def wide(self) -> torch.Tensor:
        """`enc` in fp32 when it is fp16 or bf16 (made once), else itself."""
        if self._wide is None:
            low = self.enc.dtype in (torch.float16, torch.bfloat16)
            self._wide = self.enc.float() if low else self.enc
        return self._wide


class RowGroups:
    """Where each decoder row's queries go when rows are stacked per image.

    Cross-attention keys/values are stored once per image; rows of the same
    image are stacked as extra queries of that image instead of copying its
    keys for every row. Built once per decoding step, shared by all layers."""

    def __init__(self, row_image: torch.Tensor, n_images: int) -> None:
        counts = torch.bincount(row_image, minlength=n_images)
        self.width = int(counts.max()) if row_image.numel() else 0
        order = torch.argsort(row_image, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(row_image)
        rank[order] = torch.arange(row_image.numel(), device=row_image.device) - starts[row_image[order]]
        self.flat = row_image * self.width + rank  # (R,) index into the (B * width) grid
        self.n_images = n_images


class DecoderLayer(_Block):
    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.decoder_attention_heads
        self.self_attn = Attention(d, heads, cfg.attn_scale_factor)
        self.self_attn_layer_norm = _layer_norm(d)
        self.self_attn_mid_layer_norm = _layer_norm(d)
        self.cross_attn = Attention(d, heads, cfg.attn_scale_factor)
        self.cross_attn_layer_norm = _layer_norm(d)
        self.cross_attn_mid_layer_norm = _layer_norm(d)
        self._init_ffn(d, cfg.decoder_ffn_dim)

    def forward(self, z: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                self_bias: torch.Tensor, cross: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                cross_bias: torch.Tensor, groups: RowGroups
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (R,t,d) new positions; past_k/v (R,H,P,dh); self_bias (R,H,t,P+t);
        cross: the encoder output (B,T,d) or its projected keys, values (B,H,T,dh);
        cross_bias (R,H,t,T). Returns z and this step's k, v (R,H,t,dh)."""
        a = self.self_attn
        y = self.self_attn_layer_norm(z)
        k, v = a.split(a.k_proj(y)), a.split(a.v_proj(y))
        o = a.attend(a.split(a.q_proj(y)), torch.cat([past_k, k], 2), torch.cat([past_v, v], 2),
                     self_bias)
        z = z + self.self_attn_mid_layer_norm(a.merge(o))

        c = self.cross_attn
        q = c.split(c.q_proj(self.cross_attn_layer_norm(z)))  # (R, H, t, dh)
        if isinstance(cross, tuple):
            def attend(qg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
                return c.attend(qg, cross[0], cross[1], bg)
        else:
            def attend(qg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
                return c.attend_encoded(qg, cross, bg)
        z = z + self.cross_attn_mid_layer_norm(c.merge(_grouped_attend(attend, q, cross_bias, groups)))
        return z + self.ffn(z), k, v


def _grouped_attend(attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], q: torch.Tensor,
                    bias: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """Cross-attention of rows q (R,H,t,dh), bias (R,H,t,T) over their own image:
    `attend(queries (B,H,n,dh), bias (B,H,n,T))` sees each image's rows stacked."""
    r, h, t, dh = q.shape
    b, width = groups.n_images, groups.width
    if b == 1:  # every row reads the same image: stack rows as queries
        qg = q.transpose(0, 1).reshape(1, h, r * t, dh)
        bg = bias.transpose(0, 1).reshape(1, h, r * t, -1)
        return attend(qg, bg).view(h, r, t, dh).transpose(0, 1)
    grid_q = q.new_zeros(b * width, h, t, dh)
    grid_q[groups.flat] = q
    grid_b = bias.new_zeros(b * width, h, t, bias.shape[-1])
    grid_b[groups.flat] = bias
    qg = grid_q.view(b, width, h, t, dh).transpose(1, 2).reshape(b, h, width * t, dh)
    bg = grid_b.view(b, width, h, t, -1).transpose(1, 2).reshape(b, h, width * t, -1)
    o = attend(qg, bg)  # (B, H, width * t, dh)
    o = o.view(b, h, width, t, dh).transpose(1, 2).reshape(b * width, h, t, dh)
    return o[groups.flat]


class Decoder(nn.Module):
    token_rp_bucket: torch.Tensor

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.decoder_attention_heads
        self.heads, self.head_dim = heads, d // heads
        self.pos_scaling = (d / heads * cfg.attn_scale_factor) ** -0.5
        self.layernorm_embedding = _layer_norm(d)
        self.embed_positions = _embedding(cfg.max_position_embeddings + 2, d)
        self.pos_ln = _layer_norm(d)
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        self.token_rel_pos_table_list = nn.ModuleList(
            _embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(cfg.decoder_layers))
        self.register_buffer("token_rp_bucket", torch.zeros(
            cfg.max_position_embeddings, cfg.max_position_embeddings, dtype=torch.long))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = _layer_norm(d)
        self._self_bias = _KeptLast()
        self._cross_bias = _KeptLast()

    def positions(self, m: int, device: torch.device) -> torch.Tensor:
        return self.pos_ln(self.embed_positions(torch.arange(m, device=device)))  # (M, d)

    def self_bias(self, m: int, device: torch.device) -> list[torch.Tensor]:
        """Per layer (H, M, M): absolute + relative self-attention bias of positions < m.
        Image independent, so computed once per length and kept."""
        def compute() -> list[torch.Tensor]:
            pos = self.positions(m, device)
            abs_bias = _abs_pos_bias(self.self_pos_q_linear, self.self_pos_k_linear, pos, pos,
                                     self.heads, self.pos_scaling)
            bucket = self.token_rp_bucket[:m, :m]
            return [abs_bias + table(bucket).permute(2, 0, 1) for table in self.token_rel_pos_table_list]

        return self._self_bias.get((m, device, self.pos_ln.weight.dtype), compute)

    def memory(self, enc: torch.Tensor, enc_pos: torch.Tensor, max_positions: int) -> Memory:
        return Memory(enc, self.cross_bias(max_positions, enc_pos), enc.shape[0])

    def project(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys and values of the encoder output (B,T,d)."""
        return [(c.split(c.k_proj(enc)), c.split(c.v_proj(enc)))
                for c in (layer.cross_attn for layer in cast("list[DecoderLayer]", self.layers))]

    def cross_bias(self, m: int, enc_pos: torch.Tensor) -> torch.Tensor:
        """(H, M, T): absolute bias of decoder positions < m over the encoder tokens.
        Image independent: kept while the encoder hands over the same (kept)
        positions tensor. The kept value holds that tensor, so its id in the key
        cannot be reused by another one meanwhile."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            return enc_pos, _abs_pos_bias(self.cross_pos_q_linear, self.cross_pos_k_linear,
                                          self.positions(m, enc_pos.device), enc_pos,
                                          self.heads, self.pos_scaling)

        return self._cross_bias.get((m, id(enc_pos)), compute)[1]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, row_image: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]], past_valid: torch.Tensor,
                memory: Memory, embed_tokens: nn.Embedding, new_valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run new tokens through the decoder.

        tokens/positions (R,t): the new tokens and their positions (consecutive);
        row_image (R,): which image each row belongs to; past: per layer cached
        (k, v) of shape (R,H,P,dh), of which keys with past_valid (R,P) False are
        padding; new_valid (R,t), default all True: False marks padding after a
        row's last new token (never attended to). Returns the final-normed hidden
        states (R,t,d) and the new tokens' (k, v) per layer, (R,H,t,dh)."""
        r, t = tokens.shape
        device = tokens.device
        m = memory.cross_bias.shape[1]
        self_tables = self.self_bias(m, device)
        # self-attention keys are [past (P); new (t)]: their positions
        p = past_valid.shape[1]
        past_pos = torch.arange(p, device=device).expand(r, p)
        key_pos = torch.cat([past_pos, positions], 1)  # (R, P+t)
        if new_valid is None:
            new_valid = torch.ones(r, t, dtype=torch.bool, device=device)
        key_ok = torch.cat([past_valid, new_valid], 1)
        causal = key_ok[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])  # (R,t,P+t)
        mask = torch.zeros(causal.shape, dtype=memory.cross_bias.dtype, device=device)
        mask.masked_fill_(~causal, float("-inf"))
        qi = positions[:, :, None].expand(r, t, p + t)
        ki = key_pos[:, None, :].expand(r, t, p + t)
        cross_bias = memory.cross_bias[:, positions].permute(1, 0, 2, 3)  # (R, H, t, T)
        groups = RowGroups(row_image, memory.batch_size)
        # ~4*H*d*T FLOPs per query per layer read straight from the encoder output,
        # against ~4*d*d*T per image to project it: equal at d/H queries, but the
        # queries' small matrix products run slower (on CPU at OFA-Large, ~30
        # queries took as long as one projection): switch at half of d/H, for good
        memory.queries += groups.width * t
        if memory.kv is None and memory.queries > self.head_dim // 2:
            memory.kv = self.project(memory.enc)

        z = self.layernorm_embedding(embed_tokens(tokens))  # no type or position embedding
        new_kv = []
        for i, layer in enumerate(self.layers):
            bias = self_tables[i][:, qi, ki].permute(1, 0, 2, 3) + mask[:, None]  # (R,H,t,P+t)
            cross = memory.wide() if memory.kv is None else memory.kv[i]
            z, k, v = layer(z, past[i][0], past[i][1], bias, cross, cross_bias, groups)
            new_kv.append((k, v))
        return self.layer_norm(z), new_kv


class OFAModel(nn.Module):
    """ModelScope's OFAModel for classification: shared token embedding, encoder, decoder."""

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        self.config = cfg
        # one table for encoder input, decoder input and the (bias-free) output projection
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, input_ids: torch.Tensor, images: torch.Tensor, max_positions: int) -> Memory:
        enc, pos = self.encoder(input_ids, images, self.embed_tokens)
        return self.decoder.memory(enc, pos, max_positions)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, row_image: torch.Tensor,
               past: list[tuple[torch.Tensor, torch.Tensor]], past_valid: torch.Tensor,
               memory: Memory, new_valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        return self.decoder(tokens, positions, row_image, past, past_valid, memory,
                            self.embed_tokens, new_valid)

    def empty_past(self, rows: int, memory: Memory) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dec = self.decoder
        e = memory.enc.new_zeros(rows, dec.heads, 0, dec.head_dim)
        return [(e, e)] * len(self.decoder.layers)

    def token_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of only the given vocabulary ids: (R,d) x (U,) -> (R,U).
        Decoding never needs the other ~59k columns: the trie masks them to -inf."""
        return hidden @ self.embed_tokens.weight[token_ids].T
