"""The checkpoint factory builds what ModelScope would load, deterministically, and
the same checkpoints the goldens were recorded from."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from ofa_factory import (
    GOLDEN_SPECS,
    IMAGES_DIR,
    CheckpointSpec,
    build_state_dict,
    expected_key_count,
    imagenet_labels,
    load_golden,
    state_dict_digest,
    state_dict_layout,
    tensors_digest,
    tokenizer_digest,
)

REGENERATE = "regenerate goldens with tests/goldens/record.py"
TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
        "decoder.output_projection.weight")
# ARCHITECTURE.md §3: bottleneck counts of layer1..3
NBLOCKS = {"resnet18": 6, "resnet34": 13, "resnet50": 13, "resnet101": 30, "resnet152": 47}


def _load(folder):
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def r50_sd(ckpt_r50_traverse):
    return _load(ckpt_r50_traverse)


@pytest.fixture(scope="module")
def r101_sd(ckpt_r101_generation):
    return _load(ckpt_r101_generation)


# ---------------------------------------------------------------- keys and shapes


@pytest.mark.parametrize("resnet", sorted(NBLOCKS))
@pytest.mark.parametrize("le,ld", [(2, 2), (3, 2), (12, 12)])
def test_key_count_formula(resnet, le, ld):
    spec = CheckpointSpec(resnet=resnet, enc_layers=le, dec_layers=ld)
    n = 71 + 18 * NBLOCKS[resnet] + 23 * le + 36 * ld
    assert expected_key_count(spec) == n
    keys = [k for k, _, _ in state_dict_layout(spec)]
    assert len(keys) == len(set(keys)) == n
    if (resnet, le, ld) == ("resnet152", 12, 12):
        assert n == 1625


def _expected_shapes(spec: CheckpointSpec) -> dict[str, tuple]:
    """The §10 table of ARCHITECTURE.md, written out independently of the factory."""
    d, H, F, V = spec.d_model, spec.heads, spec.ffn, 59457
    s: dict[str, tuple] = {}
    for k in TIED:
        s[k] = (V, d)
    s["encoder.type_embedding.weight"] = (2, d)
    s["encoder.embed_images.conv1.weight"] = (64, 3, 7, 7)

    def bn(p, n):
        for x in ("weight", "bias", "running_mean", "running_var"):
            s[f"{p}.{x}"] = (n,)
        s[f"{p}.num_batches_tracked"] = ()

    bn("encoder.embed_images.bn1", 64)
    counts = {"resnet50": (3, 4, 6), "resnet101": (3, 4, 23)}[spec.resnet]
    for st, (w, nb) in enumerate(zip((64, 128, 256), counts), 1):
        for i in range(nb):
            cin = (64, 256, 512)[st - 1] if i == 0 else 4 * w
            p = f"encoder.embed_images.layer{st}.{i}"
            s[f"{p}.conv1.weight"] = (w, cin, 1, 1)
            s[f"{p}.conv2.weight"] = (w, w, 3, 3)
            s[f"{p}.conv3.weight"] = (4 * w, w, 1, 1)
            bn(f"{p}.bn1", w)
            bn(f"{p}.bn2", w)
            bn(f"{p}.bn3", 4 * w)
            if i == 0:
                s[f"{p}.downsample.0.weight"] = (4 * w, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * w)

    def lin(p, o, i):
        s[f"{p}.weight"] = (o, i)
        s[f"{p}.bias"] = (o,)

    def ln(p, n):
        s[f"{p}.weight"] = (n,)
        s[f"{p}.bias"] = (n,)

    lin("encoder.image_proj", d, 1024)
    for n in ("layernorm_embedding", "patch_layernorm_embedding", "pos_ln", "image_pos_ln",
              "layer_norm"):
        ln(f"encoder.{n}", d)
    for part in ("encoder", "decoder"):
        s[f"{part}.embed_positions.weight"] = (1026, d)
        s[f"{part}.embed_image_positions.weight"] = (1765, d)
        s[f"{part}.token_rp_bucket"] = (1024, 1024)
        s[f"{part}.image_rp_bucket"] = (1765, 1765)
        for li in range(spec.enc_layers if part == "encoder" else spec.dec_layers):
            s[f"{part}.token_rel_pos_table_list.{li}.weight"] = (511, H)
            s[f"{part}.image_rel_pos_table_list.{li}.weight"] = (6892, H)
    lin("encoder.pos_q_linear", d, d)
    lin("encoder.pos_k_linear", d, d)

    def attn(p):
        for x in ("q", "k", "v", "out"):
            lin(f"{p}.{x}_proj", d, d)
        s[f"{p}.c_attn"] = (H,)

    def ffn(p):
        lin(f"{p}.fc1", F, d)
        lin(f"{p}.fc2", d, F)
        ln(f"{p}.ffn_layer_norm", F)

    for li in range(spec.enc_layers):
        p = f"encoder.layers.{li}"
        attn(f"{p}.self_attn")
        for n in ("self_attn_layer_norm", "self_attn_mid_layer_norm", "final_layer_norm"):
            ln(f"{p}.{n}", d)
        ffn(p)
    for n in ("layernorm_embedding", "pos_ln", "image_pos_ln", "code_layernorm_embedding",
              "layer_norm"):
        ln(f"decoder.{n}", d)
    for n in ("self_pos_q_linear", "self_pos_k_linear", "cross_pos_q_linear", "cross_pos_k_linear"):
        lin(f"decoder.{n}", d, d)
    s["decoder.image_position_idx"] = (1025,)
    for li in range(spec.dec_layers):
        p = f"decoder.layers.{li}"
        attn(f"{p}.self_attn")
        attn(f"{p}.cross_attn")
        for n in ("self_attn_layer_norm", "self_attn_mid_layer_norm", "cross_attn_layer_norm",
                  "cross_attn_mid_layer_norm", "final_layer_norm"):
            ln(f"{p}.{n}", d)
        ffn(p)
    return s


@pytest.mark.parametrize("which", ["r50", "r101"])
def test_keys_shapes_dtypes(which, r50_sd, r101_sd):
    sd = {"r50": r50_sd, "r101": r101_sd}[which]
    spec = GOLDEN_SPECS[f"{which}_traverse"]
    expected = _expected_shapes(spec)
    assert len(sd) == expected_key_count(spec) == len(expected)
    assert set(sd) == set(expected)
    for k, t in sd.items():
        assert tuple(t.shape) == expected[k], k
        if k.endswith(("rp_bucket", "image_position_idx", "num_batches_tracked")):
            assert t.dtype == torch.int64, k
        else:
            assert t.dtype == torch.float32, k


def test_key_order_matches_modelscope(r50_sd):
    # OFAModel.state_dict() order (as saved by save_pretrained), spot checks
    keys = list(r50_sd)
    assert keys[:5] == ["encoder.image_rp_bucket", "encoder.token_rp_bucket",
                        "encoder.layernorm_embedding.weight", "encoder.layernorm_embedding.bias",
                        "encoder.embed_tokens.weight"]
    assert keys[-1] == "decoder.image_rel_pos_table_list.1.weight"
    assert keys.index("decoder.image_position_idx") < keys.index("decoder.embed_tokens.weight")


@pytest.mark.parametrize("name", ["r50_traverse", "r101_generation"])
def test_shared_token_table_stored_once(name, golden_checkpoint):
    sd = _load(golden_checkpoint(name))
    ptrs = {sd[k].untyped_storage().data_ptr() for k in TIED}
    assert len(ptrs) == 1, "the three token-table keys must be one tensor (ModelScope ties them)"


# ---------------------------------------------------------------- buffers


def test_buffers_exact(r50_sd):
    tb = r50_sd["encoder.token_rp_bucket"]
    rel = torch.arange(1024)[:, None] - torch.arange(1024)[None, :]

    def g(r: int) -> int:
        if abs(r) <= 128:
            return r + 255
        sign = 1 if r > 0 else -1
        x = 127 * math.log(abs(r) / 128) / math.log(1023 / 128)  # exactly 127 at |r| = 1023
        return sign * (128 + math.ceil(x - 1e-9)) + 255

    lut = torch.tensor([g(r) for r in range(-1023, 1024)])
    assert torch.equal(tb, lut[rel + 1023])
    assert tb[129, 0] == tb[130, 0] == 384 and tb[1023, 0] == 510 and tb.min() == 0
    ib = r50_sd["encoder.image_rp_bucket"]
    ids = torch.arange(1, 1765)
    r, c = (ids - 1) // 42, (ids - 1) % 42
    want = (r[:, None] - r[None, :] + 41) * 83 + (c[:, None] - c[None, :] + 41)
    assert torch.equal(ib[1:, 1:], want)
    assert (ib[0, 1:] == 6889).all() and (ib[1:, 0] == 6890).all() and ib[0, 0] == 6891
    idx = r50_sd["decoder.image_position_idx"]
    grid = [rr * 42 + cc + 1 for rr in range(16) for cc in range(16)]
    assert idx.tolist() == [0] + grid + [1024] * 768
    for k in ("token_rp_bucket", "image_rp_bucket"):
        assert torch.equal(r50_sd[f"encoder.{k}"], r50_sd[f"decoder.{k}"])
    for k, t in r50_sd.items():
        if k.endswith("num_batches_tracked"):
            assert t.dim() == 0 and t.dtype == torch.int64


# ---------------------------------------------------------------- nothing left at init


def _init_value(key: str) -> float | None:
    """What a fresh ModelScope OFAModel holds for this key, where it is a constant."""
    if key.endswith("running_var") or key.endswith("c_attn"):
        return 1.0
    if key.endswith("running_mean"):
        return 0.0
    if re.search(r"(layer_norm|layernorm_embedding|_ln|\.bn\d|downsample\.1)\.weight$", key):
        return 1.0
    if key.endswith(".bias"):
        return 0.0
    return None


@pytest.mark.parametrize("which", ["r50", "r101"])
def test_no_float_tensor_left_at_init(which, r50_sd, r101_sd):
    sd = {"r50": r50_sd, "r101": r101_sd}[which]
    checked = 0
    for k, t in sd.items():
        if not t.is_floating_point():
            continue
        assert torch.isfinite(t).all(), k
        assert not torch.all(t == 0), f"{k} is all zeros"
        assert not torch.all(t == 1), f"{k} is all ones"
        v = _init_value(k)
        if v is not None:
            checked += 1
            frac = (t == v).float().mean().item()
            assert frac < 0.05, f"{k}: {frac:.0%} of entries still at their init value {v}"
            assert t.std().item() > 0.01 if t.numel() > 1 else True, k
        if k.endswith("running_var"):
            assert (t > 0).all(), k
    assert checked > 100


def test_weights_depend_on_the_right_fields():
    a = CheckpointSpec(enc_layers=1, dec_layers=1, resnet="resnet18")
    b = CheckpointSpec(enc_layers=1, dec_layers=1, resnet="resnet18", gen_type="generation",
                       beam=3, no_repeat_ngram=3)
    assert a.weights_only() == b.weights_only()
    sa, sb = build_state_dict(a), build_state_dict(b)
    assert sa[TIED[0]] is sa[TIED[1]] is sa[TIED[2]]
    assert tensors_digest(sa) == tensors_digest(sb)
    c = CheckpointSpec(enc_layers=1, dec_layers=1, resnet="resnet18", seed=1)
    assert tensors_digest(build_state_dict(c)) != tensors_digest(sa)


# ---------------------------------------------------------------- other files


def test_model_folder_files(ckpt_r50_traverse, ckpt_r50_generation):
    f = ckpt_r50_traverse
    vocab = json.loads((f / "vocab.json").read_text())
    assert len(vocab) == 50265 and vocab["<mask>"] == 50264
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert sorted(vocab.values()) == list(range(50265))
    assert (f / "merges.txt").read_text().startswith("#version")
    a2l = json.loads((f / "answer2label.json").read_text())
    labels = imagenet_labels()
    assert list(a2l) == labels and len(labels) == 1000
    assert list(a2l.values()) == list(range(1000))
    cfg = json.loads((f / "config.json").read_text())
    spec = GOLDEN_SPECS["r50_traverse"]
    assert cfg["vocab_size"] == 59457 and cfg["d_model"] == spec.d_model
    assert cfg["encoder_layers"] == spec.enc_layers and cfg["decoder_layers"] == spec.dec_layers
    assert cfg["resnet_type"] == spec.resnet and cfg["model_type"] == "ofa"
    conf_t = json.loads((f / "configuration.json").read_text())
    conf_g = json.loads((ckpt_r50_generation / "configuration.json").read_text())
    assert conf_t["model"]["gen_type"] == "traverse"
    assert conf_g["model"]["gen_type"] == "generation"
    assert conf_g["model"]["beam_search"] == {"beam_size": 5, "max_len_b": 16, "min_len": 1,
                                              "no_repeat_ngram_size": 0}
    assert conf_t["model"]["prompt"] == " what does the image describe?"


# ---------------------------------------------------------------- goldens


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_matches_factory(name, golden_checkpoint):
    golden = load_golden(name)
    spec = GOLDEN_SPECS[name]
    assert golden["spec"] == spec.to_dict(), (
        f"GOLDEN_SPECS[{name!r}] changed since {name}.json was recorded: {REGENERATE}")
    folder = golden_checkpoint(name)
    assert state_dict_digest(folder) == golden["digest"], (
        f"the factory now builds different weights for {name} than the goldens were "
        f"recorded from: {REGENERATE}")
    assert tokenizer_digest(folder) == golden["tokenizer_digest"], (
        f"vocab.json/merges.txt/answer2label.json changed for {name} (tokenizers version?): "
        f"{REGENERATE}")
    conf = json.loads((folder / "configuration.json").read_text())
    assert conf["model"]["gen_type"] == spec.gen_type


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_covers_test_images(name):
    golden = load_golden(name)
    images = {p.name for p in IMAGES_DIR.iterdir() if p.suffix != ".py"}
    assert set(golden["results"]) == images, REGENERATE
    assert "error" in golden["results"]["multipage_rgb.tif"]
    rows = [r for r in golden["results"].values() if "error" not in r]
    assert len(rows) == len(images) - 1
    key = "traverse_top" if GOLDEN_SPECS[name].gen_type == "traverse" else "beams"
    assert all(key in r for r in rows)
    top3 = [str([lab for lab, _ in r[key][:3]]) for r in rows]
    assert len(set(top3)) >= 3, "degenerate goldens: every image is ranked alike"
