"""The engine against itself and against hand-written oracles (goldens: test_parity.py)."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ofa_factory import CheckpointSpec, build_checkpoint

from ofacls.classifier import Classifier
from ofacls.decoding import exact_topk
from ofacls.errors import CheckpointError, ImageError, UsageError
from ofacls.labels import BOS, EOS
from ofacls.model.weights import read_state_dict, release_pages, remap_modelscope_state_dict

IMAGES = Path(__file__).parent / "images"


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("small") / "m",
                            CheckpointSpec(d_model=32, heads=2, ffn=64, enc_layers=1,
                                           dec_layers=2, seed=3))


@pytest.fixture(scope="module")
def spread_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of std 0.02: attention spread over many keys (std-1 random models
    attend to one), so a wrong mask, weight or head layout shows."""
    return build_checkpoint(tmp_path_factory.mktemp("spread") / "m",
                            CheckpointSpec(d_model=32, heads=2, ffn=64, enc_layers=1,
                                           dec_layers=2, std=0.02))


@pytest.fixture(scope="module")
def clf(small_ckpt: Path) -> Classifier:
    return Classifier.from_pretrained(small_ckpt)


def traverse_all_labels(clf: Classifier, pixels: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Oracle: every label's summed constrained log-prob, by teacher forcing whole
    label sequences through the uncached decoder path with full-vocabulary logits
    (what ModelScope's traverse mode does), independent of the trie search.
    `temperature` divides the logits, as ModelScope's generation mode does."""
    model, trie = clf.model, clf.trie
    seqs = [[BOS, *ids] for ids in trie.token_ids]
    allowed: dict[tuple[int, ...], set[int]] = {}
    for ids in trie.token_ids:
        full = [*ids, EOS]
        for i in range(len(full)):
            allowed.setdefault(tuple(full[:i]), set()).add(full[i])
    with torch.inference_mode():
        ids = torch.tensor([clf.prompt_ids])
        memory = model.encode(ids, pixels[None], clf.trie.max_tokens + 2)
        scores = []
        for start in range(0, len(seqs), 128):
            chunk = seqs[start:start + 128]
            t = max(map(len, chunk))
            tokens = torch.tensor([s + [EOS] * (t - len(s)) for s in chunk])
            r = len(chunk)
            hidden, _ = model.decode(tokens, torch.arange(t).expand(r, t), torch.zeros(r, dtype=torch.long),
                                     model.empty_past(r, memory), torch.zeros(r, 0, dtype=torch.bool),
                                     memory)
            logits = hidden @ model.embed_tokens.weight.T / temperature  # (r, t, V)
            for row, seq in enumerate(chunk):
                target = [*seq[1:], EOS]
                total = 0.0
                for i, tok in enumerate(target):
                    # the reference masks to -inf before log_softmax: normalise over the
                    # allowed continuations only
                    options = logits[row, i, sorted(allowed[tuple(seq[1:i + 1])])]
                    total += (logits[row, i, tok] - torch.logsumexp(options, 0)).item()
                scores.append(total)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("image", ["chelsea.png", "camera.png"])
def test_exact_topk_equals_scoring_every_label(clf: Classifier, image: str) -> None:
    pixels = clf.preprocess(IMAGES / image)
    scores = traverse_all_labels(clf, pixels)
    probs = torch.softmax(scores, 0)
    assert math.isclose(float(torch.exp(scores).sum()), 1.0, abs_tol=1e-4)
    want = torch.topk(probs, 10)
    got = clf.classify_pixels(pixels[None], top_k=10)[0]
    assert [g[0] for g in got] == [clf.labels[i] for i in want.indices.tolist()]
    for (_, p), q in zip(got, want.values.tolist()):
        assert abs(p - q) < 1e-5


def test_exact_topk_probabilities_sum_to_one_over_all_labels(clf: Classifier) -> None:
    got = clf.classify_pixels(clf.preprocess(IMAGES / "horse.png")[None], top_k=1000)[0]
    assert len(got) == len({g[0] for g in got}) == len(clf.labels)
    assert math.isclose(sum(p for _, p in got), 1.0, abs_tol=1e-4)
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:]))


def test_batch_gives_same_answers_as_single_images(clf: Classifier) -> None:
    names = ["chelsea.png", "camera.png", "grace_hopper.jpg"]
    pixels = torch.stack([clf.preprocess(IMAGES / n) for n in names])
    for decode in ("exact", "beam"):
        together = clf.classify_pixels(pixels, top_k=5, decode=decode)
        for i in range(len(names)):
            alone = clf.classify_pixels(pixels[i:i + 1], top_k=5, decode=decode)[0]
            assert [a[0] for a in alone] == [t[0] for t in together[i]]
            assert all(abs(a[1] - t[1]) < 1e-5 for a, t in zip(alone, together[i]))


def test_8_bit_pixels_give_what_their_normalised_floats_give(clf: Classifier) -> None:
    """classify and the batch runner hand the model uint8 pixels, normalised on its
    device; preprocess's float32 tensors (normalised on the CPU) must answer alike."""
    names = ["chelsea.png", "camera.png", "grace_hopper.jpg"]
    raw = torch.stack([clf.pixels(IMAGES / n) for n in names])
    floats = torch.stack([clf.preprocess(IMAGES / n) for n in names])
    assert raw.dtype == torch.uint8 and floats.dtype == torch.float32
    for decode in ("exact", "beam"):
        assert (clf.classify_pixels(raw, top_k=5, decode=decode)
                == clf.classify_pixels(floats, top_k=5, decode=decode))


def test_folded_batchnorm_computes_what_batchnorm_computes() -> None:
    """The trunk with each BatchNorm folded into its convolution equals the trunk
    as the checkpoint describes it (fp64, so only a wrong formula shows), with
    statistics far from the identity that a freshly built BatchNorm holds."""
    from ofacls.model.resnet import ResNetTrunk

    torch.manual_seed(0)
    trunk = ResNetTrunk((2, 2, 2)).double().eval()
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        want = trunk(x)
        trunk.fold_batchnorm()
        got = trunk(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert len(norms) == 1 + 3 * 6 + 3  # stem, three per block, each stage's downsample
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_answers_depend_on_the_image(clf: Classifier) -> None:
    preds = clf.classify([IMAGES / n for n in ("chelsea.png", "camera.png", "grace_hopper.jpg",
                                               "coffee.png", "horse.png")], top_k=1)
    assert len({p.label for p in preds}) > 1


def test_label_subset_only_answers_from_the_subset(clf: Classifier, small_ckpt: Path) -> None:
    subset = clf.labels[10:13]
    sub = Classifier.from_pretrained(small_ckpt, labels=subset)
    for decode in ("exact", "beam"):
        pred = sub.classify([IMAGES / "chelsea.png"], top_k=5, decode=decode)[0]
        assert pred.label in subset and {lab for lab, _ in pred.top_k} <= set(subset)
    exact = sub.classify([IMAGES / "chelsea.png"], top_k=5)[0]
    assert len(exact.top_k) == 3 and math.isclose(sum(s for _, s in exact.top_k), 1.0, abs_tol=1e-5)
    # a string that is not the model's is ranked as the user's own (index: its place)
    own = Classifier.from_pretrained(small_ckpt, labels=["no such thing", subset[0]])
    pred = own.classify([IMAGES / "chelsea.png"], top_k=5)[0]
    assert sorted(zip(pred.indices, (lab for lab, _ in pred.top_k))) == [(0, "no such thing"), (1, subset[0])]


def test_label_names_follow_one_rule() -> None:
    """--labels and eval find a label alike: exact, else case and `_` aside unless two
    labels differ only so; a miss names the nearest labels."""
    from ofa_factory import imagenet_labels

    from ofacls.evaluate import ClassNames
    from ofacls.labels import LabelNames

    labels = imagenet_labels()
    names, classes = LabelNames(labels), ClassNames(labels)
    for typed, want in (("tiger_cat", "tiger cat"), ("Tabby", "tabby"), (" persian CAT ", "Persian cat"),
                        ("Cardigan", "Cardigan"), ("cardigan", "cardigan")):
        assert labels[names.index(typed)] == want == labels[classes.resolve(typed, numbers=False)], typed
    for ambiguous in ("CARDIGAN", "tiger-cat"):
        assert names.find(ambiguous) is None
        with pytest.raises(UsageError) as e:
            names.index(ambiguous)
        assert "\n" not in str(e.value) and "the nearest are" in str(e.value)
    with pytest.raises(UsageError, match="'tiger_kat' is not a label of this model; the nearest are 'tiger"):
        names.index("tiger_kat")


def test_unreadable_input_is_an_error_row_not_an_exception(clf: Classifier) -> None:
    preds = clf.classify([IMAGES / "multipage_rgb.tif", IMAGES / "chelsea.png", b"", IMAGES / "nope.jpg"])
    assert [p.ok for p in preds] == [False, True, False, False]
    assert preds[0].error and "\n" not in preds[0].error
    assert preds[2].error == "empty file"


def test_pil_and_bytes_inputs_match_paths(clf: Classifier) -> None:
    from PIL import Image

    path = IMAGES / "chelsea.png"
    by_path, by_bytes, by_pil = clf.classify([path, path.read_bytes(), Image.open(path)])
    assert [x[0] for x in by_path.top_k] == [x[0] for x in by_bytes.top_k]
    assert by_path.top_k[0][0] == by_pil.top_k[0][0]


def test_pixel_limit(small_ckpt: Path) -> None:
    tight = Classifier.from_pretrained(small_ckpt, max_pixels=1000)
    with pytest.raises(ImageError, match="MP limit"):
        tight.preprocess(IMAGES / "chelsea.png")


# --- loading: strict, clear errors ---------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    edit(sd)
    torch.save(sd, folder / "pytorch_model.bin")


def test_missing_unexpected_and_misshapen_weights_are_named(small_ckpt: Path, tmp_path: Path) -> None:
    m = _copy(small_ckpt, tmp_path / "m")

    def edit(sd: dict) -> None:
        del sd["encoder.layers.0.self_attn.c_attn"]
        sd["encoder.mlp_head.weight"] = torch.zeros(3)
        sd["decoder.layers.1.fc1.bias"] = torch.zeros(7)

    _edit_weights(m, edit)
    with pytest.raises(CheckpointError) as e:
        Classifier.from_pretrained(m)
    msg = str(e.value)
    assert "missing: encoder.layers.0.self_attn.c_attn" in msg
    assert "unexpected: encoder.mlp_head.weight" in msg
    assert "decoder.layers.1.fc1.bias (7,)" in msg


def test_corrupt_and_truncated_checkpoints(small_ckpt: Path, tmp_path: Path) -> None:
    m = _copy(small_ckpt, tmp_path / "m")
    data = (m / "pytorch_model.bin").read_bytes()
    (m / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: corrupt or truncated"):
        Classifier.from_pretrained(m)
    (m / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Classifier.from_pretrained(m)


def test_pickled_code_is_never_run(small_ckpt: Path, tmp_path: Path,
                                   recwarn: pytest.WarningsRecorder) -> None:
    import pickle

    m = _copy(small_ckpt, tmp_path / "m")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError):
        Classifier.from_pretrained(m)
    assert not marker.exists()
    assert not [str(w.message) for w in recwarn]  # the one-line error is all the user sees


def test_safetensors_preferred_when_present(small_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    m = _copy(small_ckpt, tmp_path / "m")
    sd = torch.load(m / "pytorch_model.bin", weights_only=True)
    ours = {k: v.clone().contiguous() for k, v in sd.items()
            if k not in ("decoder.embed_tokens.weight", "decoder.output_projection.weight")}
    save_file(ours, str(m / "model.safetensors"))
    (m / "pytorch_model.bin").write_bytes(b"garbage: must not be read")
    a = Classifier.from_pretrained(m).classify([IMAGES / "chelsea.png"])[0]
    b = Classifier.from_pretrained(small_ckpt).classify([IMAGES / "chelsea.png"])[0]
    assert [x[0] for x in a.top_k] == [x[0] for x in b.top_k]
    assert all(abs(x[1] - y[1]) < 1e-5 for x, y in zip(a.top_k, b.top_k))


def test_untied_token_tables_are_refused() -> None:
    t = torch.randn(4, 2)
    with pytest.raises(CheckpointError, match="ties them"):
        remap_modelscope_state_dict({"encoder.embed_tokens.weight": t,
                                     "decoder.output_projection.weight": t + 1})


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: t["model"].update(language="zh"), "only English"),
    (lambda c, t: t.update(task="image-captioning"), "not image-classification"),
    (lambda c, t: t["model"].update(gen_type="sample"), "unknown gen_type"),
    (lambda c, t: c.update(use_gamma_feature=True), "use_gamma_feature"),
    (lambda c, t: c.pop("d_model"), "config.json lacks d_model, so ModelScope's defaults were used"),
])
def test_folders_that_are_not_english_ofa_classifiers(small_ckpt: Path, tmp_path: Path,
                                                       edit, message: str) -> None:
    m = _copy(small_ckpt, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    task = json.loads((m / "configuration.json").read_text())
    edit(cfg, task)
    (m / "config.json").write_text(json.dumps(cfg))
    (m / "configuration.json").write_text(json.dumps(task))
    with pytest.raises(CheckpointError, match=message):
        Classifier.from_pretrained(m)


def test_missing_files_are_named(small_ckpt: Path, tmp_path: Path) -> None:
    for name in ("config.json", "vocab.json", "answer2label.json", "pytorch_model.bin"):
        m = _copy(small_ckpt, tmp_path / name)
        (m / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            Classifier.from_pretrained(m)


# --- devices and precisions (the CUDA path itself needs a GPU; its plumbing does not) ---

HALF_IMAGES = [IMAGES / n for n in ("chelsea.png", "camera.png", "grace_hopper.jpg", "horse.png",
                                    "coffee.png")]


def _log_probs(clf: Classifier) -> torch.Tensor:
    """Each of HALF_IMAGES' log-probs over all labels, the labels in name order."""
    preds = clf.classify(HALF_IMAGES, decode="exact", top_k=len(clf.labels))
    return torch.tensor([[math.log(p) for _, p in sorted(pred.top_k)] for pred in preds])


@pytest.fixture(scope="module")
def fp32_log_probs(clf: Classifier) -> torch.Tensor:
    return _log_probs(clf)


def _agrees_with_fp32(half: Classifier, fp32_log_probs: torch.Tensor, dtype: torch.dtype) -> None:
    """`half` runs in `dtype` (a channels-last trunk), finishes every beam, and
    gives each image the fp32 model's distribution over the labels, roughly."""
    assert half.model.encoder.layers[0].fc1.weight.dtype == dtype
    assert half.model.encoder.token_rp_bucket.dtype == torch.long  # buffers keep their type
    assert half.model.encoder.embed_images.channels_last
    # two images make a batch (the trunk, emulated in bf16 on most CPUs, costs
    # seconds an image)
    assert all(p.ok and math.isfinite(p.score) for p in half.classify(HALF_IMAGES[:2], decode="beam"))

    # This random model's top labels are too close for bf16 to keep them (it flips
    # some, depending on torch's kernels), so compare whole distributions: each
    # image's half-precision log-probs over all labels are clearly nearest its own
    # fp32 ones.
    dist = torch.cdist(_log_probs(half), fp32_log_probs, p=1)  # (half image, fp32 image)
    own = dist.diagonal()
    others = dist + torch.diag(torch.full_like(own, math.inf))
    assert (own * 1.2 < others.min(dim=1).values).all(), dist


def test_bf16_runs_in_bf16_and_agrees_with_fp32(small_ckpt: Path, fp32_log_probs: torch.Tensor) -> None:
    _agrees_with_fp32(Classifier.from_pretrained(small_ckpt, precision="bf16"), fp32_log_probs,
                      torch.bfloat16)


def test_fp16_the_cuda_default_runs_its_path_on_cpu_too(small_ckpt: Path, fp32_log_probs: torch.Tensor,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 is what --precision auto picks on CUDA. The CLI refuses it on CPU (slow
    there), but torch runs it, so its path through loading, the channels-last
    trunk, the encoder's fp16 clamp and decoding is checked here, on a GPU-less
    machine: only the refusal is lifted."""
    import ofacls.classifier

    resolve = ofacls.classifier.resolve_dtype
    monkeypatch.setattr(ofacls.classifier, "resolve_dtype",
                        lambda p, d: torch.float16 if p == "fp16" else resolve(p, d))
    _agrees_with_fp32(Classifier.from_pretrained(small_ckpt, precision="fp16"), fp32_log_probs,
                      torch.float16)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_bf16_copies_every_tensor_out_of_the_checkpoint(small_ckpt: Path, tmp_path: Path) -> None:
    # One tensor left memory-mapped (the integer bucket tables are not converted)
    # would keep the whole fp32 file resident beside its bf16 copy.
    folder = tmp_path / "m"
    shutil.copytree(small_ckpt, folder)
    weights = str(folder / "pytorch_model.bin")
    half = Classifier.from_pretrained(folder, precision="bf16")
    gc.collect()
    assert weights not in Path("/proc/self/maps").read_text()
    full = Classifier.from_pretrained(folder)  # fp32 adopts the mapped file (no copy)
    assert weights in Path("/proc/self/maps").read_text()
    assert half.classify(IMAGES / "chelsea.png")[0].ok and full.labels == half.labels


def _resident_file_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_released_checkpoint_pages_stop_counting_and_read_back_intact(tmp_path: Path) -> None:
    weights = torch.arange(16 << 20, dtype=torch.float32)  # 64 MB
    torch.save({"w": weights}, tmp_path / "pytorch_model.bin")
    sd, mapped = read_state_dict(tmp_path)
    assert mapped
    assert torch.equal(sd["w"], weights)  # every page read, so resident
    before = _resident_file_mb()
    release_pages(sd["w"])
    assert before - _resident_file_mb() > 60
    assert torch.equal(sd["w"], weights)  # read back from the file


def test_precision_and_device_resolution() -> None:
    from ofacls.classifier import resolve_device, resolve_dtype
    from ofacls.errors import DeviceError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bf16", cuda) == torch.bfloat16
    with pytest.raises(DeviceError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(UsageError, match="unknown precision"):
        resolve_dtype("fp8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu-ish")


def test_int8_quantization_swaps_linears_and_still_classifies(small_ckpt: Path) -> None:
    q = Classifier.from_pretrained(small_ckpt, quantize="int8")
    assert "quantized" in type(q.model.encoder.layers[0].fc1).__module__
    pred = q.classify([IMAGES / "chelsea.png"], top_k=3)[0]
    assert pred.ok and len(pred.top_k) == 3


def test_reversed_key_bias_equals_the_bucket_gather(clf: Classifier) -> None:
    """The encoder's fast path (image keys reversed, relative bias as a strided view)
    computes what the plain gather through the checkpoint's bucket table computes."""
    enc = clf.model.encoder
    pixels = clf.preprocess(IMAGES / "chelsea.png")[None]
    ids = torch.tensor([clf.prompt_ids])
    with torch.inference_mode():
        fast, _ = enc(ids, pixels, clf.model.embed_tokens)
        assert all(enc._toeplitz.values())
        saved = dict(enc._toeplitz)
        enc._toeplitz = {k: False for k in saved}  # as for a checkpoint with other buckets
        enc._positions.entry = None
        try:
            slow, _ = enc(ids, pixels, clf.model.embed_tokens)
        finally:
            enc._toeplitz, enc._positions.entry = saved, None
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_padded_decoder_rows_equal_unpadded_ones(spread_ckpt: Path) -> None:
    """Rows with fewer new tokens than others are padded (new_valid False). Padding
    may sit at a real token's position (positions are clamped at the model's
    limit), so only the mask keeps it out: real positions must come out as when
    each row runs alone. (std 0.02: attention spread out, so padding that leaks
    in shows; std-1 random models attend to one key.)"""
    clf = Classifier.from_pretrained(spread_ckpt)
    model = clf.model
    seqs = [[BOS, *clf.trie.token_ids[0]], [BOS, clf.trie.token_ids[1][0]]]
    t, n = len(seqs[0]), len(seqs[1])
    assert t > n
    with torch.inference_mode():
        memory = model.encode(torch.tensor([clf.prompt_ids]), clf.preprocess(IMAGES / "chelsea.png")[None],
                              clf.trie.max_tokens + 2)

        def run(rows: list[list[int]], positions: list[list[int]], valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, list]:
            r = len(rows)
            return model.decode(torch.tensor(rows), torch.tensor(positions),
                                torch.zeros(r, dtype=torch.long), model.empty_past(r, memory),
                                torch.zeros(r, 0, dtype=torch.bool), memory, valid)

        padded = [seqs[0], seqs[1] + [seqs[1][-1]] * (t - n)]
        positions = [list(range(t)), list(range(n)) + [n - 1] * (t - n)]
        valid = torch.tensor([[True] * t, [True] * n + [False] * (t - n)])
        hidden, kv = run(padded, positions, valid)
        for i, seq in enumerate(seqs):
            alone, alone_kv = run([seq], [list(range(len(seq)))], None)
            assert torch.allclose(hidden[i, :len(seq)], alone[0], atol=1e-5)
            assert torch.allclose(kv[-1][0][i, :, :len(seq)], alone_kv[-1][0][0], atol=1e-5)
        unmasked, _ = run(padded, positions, None)  # the padding is seen: the check can fail
        assert not torch.allclose(unmasked[1, n - 1], hidden[1, n - 1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cross_attention_from_the_encoder_output_equals_projected_keys(spread_ckpt: Path,
                                                                       dtype: torch.dtype) -> None:
    """Until enough queries have run, cross-attention reads the encoder output through
    the key/value weights instead of projecting every encoder token: the same
    function, rounded differently. Rows of two images, one running three rows and
    the other one (std 0.02: attention spread over many keys, so a wrong weight,
    bias or head layout shows)."""
    clf = Classifier.from_pretrained(spread_ckpt)
    model = clf.model.to(dtype)
    pixels = torch.stack([clf.preprocess(IMAGES / name) for name in ("chelsea.png", "camera.png")])
    rows = torch.tensor([[BOS, *clf.trie.token_ids[i][:1]] for i in (0, 1, 2, 3)])
    row_image = torch.tensor([1, 0, 1, 1])
    with torch.inference_mode():
        ids = torch.tensor([clf.prompt_ids] * 2)
        runs = []
        for projected in (False, True):
            memory = model.encode(ids, pixels.to(dtype), clf.trie.max_tokens + 2)
            if projected:
                memory.kv = model.decoder.project(memory.enc)
            hidden, _ = model.decode(rows, torch.arange(2).expand(4, 2), row_image,
                                     model.empty_past(4, memory), torch.zeros(4, 0, dtype=torch.bool),
                                     memory)
            runs.append(hidden.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    assert (runs[0] - runs[1]).abs().max() < tol
    assert (runs[0][0] - runs[0][1]).abs().max() > 10 * tol  # rows differ: the check can fail


def test_cross_attention_projects_keys_once_queries_would_cost_more(clf: Classifier) -> None:
    """A search that runs many queries (every label ranked) projects the keys/values
    once instead of reading the encoder output for each query, and still ranks
    as the oracle does."""
    pixels = clf.preprocess(IMAGES / "chelsea.png")
    with torch.inference_mode():
        stepper = clf._stepper(pixels[None], clf.trie, "exact")
        found = exact_topk(stepper, clf.trie, 1, len(clf.trie.names))[0]
    assert stepper.memory.kv is not None
    oracle = traverse_all_labels(clf, pixels)
    assert [i for i, _ in found[:10]] == oracle.argsort(descending=True)[:10].tolist()


def _branch_depth(node, depth: int = 0) -> int:  # type: ignore[no-untyped-def]
    """Deepest trie node with more than one continuation."""
    here = depth if len(node.children) > 1 else -1
    return max([here, *(_branch_depth(c, depth + 1) for c in node.children.values())])


class _CountingDecode:
    """Records the (rows, new tokens) shape of every decoder call, then runs it."""

    def __init__(self, clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.real = clf.model.decode
        monkeypatch.setattr(clf.model, "decode", self)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.shapes.append(tuple(args[0].shape))
        return self.real(*args, **kwargs)


def test_forced_tokens_cost_no_decoder_call(clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token that is its prefix's only continuation has log-prob 0: beam search
    runs the decoder only at steps where some beam can branch, however long the
    labels it finishes."""
    calls = _CountingDecode(clf, monkeypatch)
    found = clf.classify_pixels(clf.preprocess(IMAGES / "chelsea.png")[None], top_k=5, decode="beam")[0]
    steps = max(len(clf.trie.token_ids[clf.labels.index(label)]) + 1 for label, _ in found)
    assert len(calls.shapes) <= _branch_depth(clf.trie.root) + 1 < steps


def test_chains_of_forced_tokens_run_later_in_one_padded_call(
        small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels whose trie branches only after several forced tokens ('zebra finch'
    is 4 tokens before green/red branch): those tokens run in one call, padded
    next to rows with a single pending token, and every score still equals
    teacher forcing each whole label."""
    folder = tmp_path / "m"
    shutil.copytree(small_ckpt, folder)
    names = ["zebra finch green", "zebra finch red", "sea anemone", "sea slug", "sea snake",
             "tabby cat", "tiger cat"]
    (folder / "answer2label.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    clf = Classifier.from_pretrained(folder)
    pixels = clf.preprocess(IMAGES / "chelsea.png")
    oracle = traverse_all_labels(clf, pixels)
    calls = _CountingDecode(clf, monkeypatch)
    got = clf.classify_pixels(pixels[None], top_k=len(names))[0]
    assert any(t > 1 and rows > 1 for rows, t in calls.shapes), calls.shapes
    want = torch.softmax(oracle, 0)
    assert {lab: round(p, 5) for lab, p in got} == {
        lab: round(float(want[i]), 5) for i, lab in enumerate(clf.labels)}
    beam = clf.task.beam
    for label, score in clf.classify_pixels(pixels[None], top_k=5, decode="beam")[0]:
        i = clf.labels.index(label)
        length = len(clf.trie.token_ids[i]) + 1  # with </s>
        assert math.isclose(score, float(oracle[i]) / length ** beam.len_penalty, abs_tol=1e-5)


_FAULTS = """
import resource, sys, torch
import ofacls
ofacls.Classifier.from_pretrained(sys.argv[1])
ofacls.tune_process()  # what the CLI does; a library user opts in
def cycle():
    # 4 x 64 MB, like OFA-Large encoder activations at batch 4: over the 32 MB cap on
    # glibc's adaptive mmap threshold, so the untuned baseline cannot adapt its way to
    # reuse (with 16 MB blocks it sometimes did, and the comparison became a coin toss)
    blocks = [torch.ones(16 << 20) for _ in range(4)]
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc allocator tuning")
def test_freed_activations_are_reused_not_faulted_in_again(small_ckpt: Path) -> None:
    """The opt-in tuning keeps glibc from unmapping freed large blocks; a user's own
    glibc malloc tuning turns that off (and shows what it saves)."""
    def faults(env: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(small_ckpt)], capture_output=True,
                             text=True, check=True, env={**os.environ, **env}).stdout
        return int(out)

    tuned = faults({"MALLOC_ARENA_MAX": "8"})  # set by many platforms: not an opt-out
    untouched = faults({"GLIBC_TUNABLES": "glibc.malloc.check=0"})  # glibc's default, stated
    assert tuned * 4 < untouched, (tuned, untouched)


_ARENAS = """
import ctypes, sys, threading
from ofacls.libc import share_one_malloc_arena
share_one_malloc_arena()  # as ofacls.cli.main does, before any thread starts
all_started = threading.Barrier(5)
def allocate():
    block = bytearray(8 << 20)  # a large block, as a decode allocates
    all_started.wait()  # every thread holds its block at once
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
all_started.wait()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
out = ctypes.c_void_p(libc.fopen(sys.argv[1].encode(), b"w"))
libc.malloc_info(0, out)
libc.fclose(out)
for t in threads:
    t.join()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc allocator tuning")
def test_the_cli_makes_threads_share_one_malloc_arena(tmp_path: Path) -> None:
    """Threads allocate from one glibc arena, so memory one loader thread's decode
    frees serves the next decode on another thread instead of staying in the
    first one's arena; a MALLOC_ARENA_MAX the user set rules instead."""
    def arenas(env: dict[str, str]) -> int:
        report = tmp_path / "malloc_info.xml"
        untuned = {k: v for k, v in os.environ.items()
                   if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        subprocess.run([sys.executable, "-c", _ARENAS, str(report)], check=True,
                       env={**untuned, **env})
        return report.read_text().count("<heap nr=")

    assert arenas({}) == 1
    assert arenas({"MALLOC_ARENA_MAX": "8"}) > 1


def test_kept_position_biases_give_the_same_answers(clf: Classifier) -> None:
    """Position biases are image independent and kept between calls in inference
    mode; a forward outside inference mode still works and agrees."""
    pixels = clf.preprocess(IMAGES / "camera.png")[None]
    ids = torch.tensor([clf.prompt_ids])
    enc = clf.model.encoder
    enc._positions.entry = None
    with torch.inference_mode():
        first, _ = enc(ids, pixels, clf.model.embed_tokens)
        assert enc._positions.entry is not None
        again, _ = enc(ids, pixels, clf.model.embed_tokens)
    with torch.no_grad():
        plain, _ = enc(ids, pixels, clf.model.embed_tokens)
    assert torch.equal(first, again) and torch.allclose(first, plain, atol=1e-5)


def test_a_half_precision_checkpoint_loads_in_fp32(small_ckpt: Path, tmp_path: Path) -> None:
    """A file saved in fp16 classifies in fp32 exactly as the same weights saved
    in fp32 do (fp16 -> fp32 is exact); it used to fail on every image."""
    sd = torch.load(small_ckpt / "pytorch_model.bin", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    folders = {}
    for name, weights in (("fp16", half),
                          ("fp32", {k: v.float() if v.is_floating_point() else v
                                    for k, v in half.items()})):
        folder = tmp_path / name
        shutil.copytree(small_ckpt, folder)
        torch.save(weights, folder / "pytorch_model.bin")
        folders[name] = folder
    from_half = Classifier.from_pretrained(folders["fp16"])
    assert all(p.dtype == torch.float32 for p in from_half.model.parameters())
    image = IMAGES / "camera.png"
    (got,) = from_half.classify([image])
    (want,) = Classifier.from_pretrained(folders["fp32"]).classify([image])
    assert got.ok and got.top_k == want.top_k


def test_beam_mode_applies_the_beam_search_temperature(small_ckpt: Path, tmp_path: Path) -> None:
    """configuration.json's beam_search.temperature divides the logits in beam
    mode (ModelScope's generation mode passes it to its sequence generator);
    exact mode, like its traverse mode, does not use it."""
    folder = _copy(small_ckpt, tmp_path / "hot")
    conf = json.loads((folder / "configuration.json").read_text())
    conf["model"].setdefault("beam_search", {})["temperature"] = 2.5
    (folder / "configuration.json").write_text(json.dumps(conf))
    clf = Classifier.from_pretrained(folder)
    pixels = clf.preprocess(IMAGES / "chelsea.png")
    hot, cold = traverse_all_labels(clf, pixels, 2.5), traverse_all_labels(clf, pixels)
    beam = clf.task.beam
    ranked = clf.classify_pixels(pixels[None], top_k=5, decode="beam")[0]
    assert ranked
    for label, score in ranked:
        i = clf.labels.index(label)
        length = len(clf.trie.token_ids[i]) + 1  # with </s>
        assert math.isclose(score, float(hot[i]) / length ** beam.len_penalty, abs_tol=1e-5)
    want = torch.softmax(cold, 0)
    for label, p in clf.classify_pixels(pixels[None], top_k=5)[0]:
        assert math.isclose(p, float(want[clf.labels.index(label)]), abs_tol=1e-5)
