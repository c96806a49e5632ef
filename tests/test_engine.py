"""The engine against itself and against hand-written oracles (goldens: test_parity.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from ofa_factory import CheckpointSpec, build_checkpoint

from ofacls.classifier import Classifier
from ofacls.errors import CheckpointError, ImageError, UsageError
from ofacls.labels import BOS, EOS
from ofacls.model.weights import remap_modelscope_state_dict

IMAGES = Path(__file__).parent / "images"


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("small") / "m",
                            CheckpointSpec(d_model=32, heads=2, ffn=64, enc_layers=1,
                                           dec_layers=2, seed=3))


@pytest.fixture(scope="module")
def clf(small_ckpt: Path) -> Classifier:
    return Classifier.from_pretrained(small_ckpt)


def traverse_all_labels(clf: Classifier, pixels: torch.Tensor) -> torch.Tensor:
    """Oracle: every label's summed constrained log-prob, by teacher forcing whole
    label sequences through the uncached decoder path with full-vocabulary logits
    (what ModelScope's traverse mode does), independent of the trie search."""
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
            logits = hidden @ model.embed_tokens.weight.T  # (r, t, V)
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
    with pytest.raises(UsageError, match="not a label"):
        Classifier.from_pretrained(small_ckpt, labels=["no such thing"])


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


def test_pickled_code_is_never_run(small_ckpt: Path, tmp_path: Path) -> None:
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
    (lambda c, t: c.pop("d_model"), "missing required keys d_model"),
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

def test_bf16_runs_in_bf16_and_agrees_with_fp32(small_ckpt: Path, clf: Classifier) -> None:
    half = Classifier.from_pretrained(small_ckpt, dtype="bf16")
    assert half.model.encoder.layers[0].fc1.weight.dtype == torch.bfloat16
    assert half.model.encoder.token_rp_bucket.dtype == torch.long  # buffers keep their type
    names = [IMAGES / n for n in ("chelsea.png", "camera.png", "grace_hopper.jpg")]
    for decode in ("exact", "beam"):
        a = clf.classify(names, decode=decode)
        b = half.classify(names, decode=decode)
        assert all(p.ok for p in b)
        assert sum(x.label == y.label for x, y in zip(a, b)) >= 2


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
        try:
            slow, _ = enc(ids, pixels, clf.model.embed_tokens)
        finally:
            enc._toeplitz = saved
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5)
