"""Layouts of a published checkpoint that ModelScope's loader turns into the same
model (fairseq version entries, separate copies of the token table, no index
buffers, with or without the `model.` prefix, fp16) load here and answer as the
plain file does; malformed files are still refused, naming the keys."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_SPEC, tiny_model
from ofa_factory import IMAGES_DIR, image_rp_bucket, token_rp_bucket

from ofacls import Classifier
from ofacls.errors import CheckpointError
from ofacls.model.weights import image_buckets, remap_modelscope_state_dict, token_buckets

PHOTOS = [IMAGES_DIR / n for n in ("chelsea.png", "coffee.png", "grace_hopper.jpg")]
BUFFERS = ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
           "decoder.image_rp_bucket", "decoder.image_position_idx")
TABLE_NAMES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.output_projection.weight")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("plain") / "tiny")


def variant(plain: Path, where: Path, edit: Callable[[dict[str, torch.Tensor]], dict]) -> Path:
    """A copy of the plain folder whose pytorch_model.bin is edit(its state dict)."""
    folder = where / "variant"
    shutil.copytree(plain, folder)
    sd = torch.load(plain / "pytorch_model.bin", weights_only=True)
    torch.save(edit(sd), folder / "pytorch_model.bin")
    return folder


def answers(folder: Path, decode: str) -> list[list[tuple[str, float]]]:
    clf = Classifier.from_pretrained(folder, device="cpu")
    return [[(label, score) for label, score in p.top_k]
            for p in clf.classify(PHOTOS, top_k=5, decode=decode)]


def with_versions(sd: dict) -> dict:
    return {**sd, "encoder.version": torch.tensor([3.0]), "decoder.version": torch.tensor([3.0])}


def separate_copies(sd: dict) -> dict:
    """As a file saved from a GPU holds it: the three table names, three tensors."""
    return {k: (v.clone() if k in TABLE_NAMES else v) for k, v in sd.items()}


def without_buffers(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k not in BUFFERS}


def with_prefix(sd: dict) -> dict:
    return {f"model.{k}": v for k, v in sd.items()}


def fp16(sd: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}


def everything(sd: dict) -> dict:
    return fp16(with_prefix(without_buffers(separate_copies(with_versions(sd)))))


@pytest.mark.parametrize("edit", [with_versions, separate_copies, without_buffers, with_prefix],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("decode", ["exact", "beam"])
def test_every_layout_modelscope_loads_gives_the_plain_answers(
        plain: Path, tmp_path: Path, edit: Callable, decode: str) -> None:
    assert answers(variant(plain, tmp_path, edit), decode) == answers(plain, decode)


@pytest.mark.parametrize("edit", [fp16, everything], ids=lambda f: f.__name__)
@pytest.mark.parametrize("decode", ["exact", "beam"])
def test_fp16_weights_give_the_same_labels(plain: Path, tmp_path: Path, edit: Callable,
                                           decode: str) -> None:
    expected, got = answers(plain, decode), answers(variant(plain, tmp_path, edit), decode)
    assert [p[0][0] for p in got] == [p[0][0] for p in expected]
    for g, e in zip(got, expected):
        assert g[0][1] == pytest.approx(e[0][1], abs=2e-2)


def test_rebuilt_index_buffers_equal_modelscope_s() -> None:
    # the tiny model's tables are these sizes; OFA-Large's too (1024 positions, 256, 42)
    assert torch.equal(token_buckets(1024, 256), token_rp_bucket(256, 1024))
    assert torch.equal(token_buckets(64, 16), token_rp_bucket(16, 1024)[:64, :64])
    assert torch.equal(image_buckets(42), image_rp_bucket(42))
    assert torch.equal(image_buckets(5), image_rp_bucket(5, (2 * 5 - 1) ** 2 + 3))


def test_a_token_table_copy_that_differs_is_refused_by_name(plain: Path, tmp_path: Path) -> None:
    def tamper(sd: dict) -> dict:
        sd = separate_copies(sd)
        sd["decoder.output_projection.weight"][-1, 0] += 1  # one value, in a sampled row
        return sd

    with pytest.raises(CheckpointError, match="decoder.output_projection.weight differs"):
        Classifier.from_pretrained(variant(plain, tmp_path, tamper), device="cpu")


def test_a_copy_of_another_shape_or_dtype_is_refused() -> None:
    table = torch.randn(100, 8)
    for copy in (torch.randn(99, 8), table.double()):
        with pytest.raises(CheckpointError, match="decoder.embed_tokens.weight .* OFA ties them"):
            remap_modelscope_state_dict({TABLE_NAMES[0]: table, TABLE_NAMES[1]: copy})


def test_unexpected_and_missing_keys_are_still_refused_by_name(plain: Path,
                                                               tmp_path: Path) -> None:
    def odd(sd: dict) -> dict:
        sd = {k: v for k, v in sd.items() if k != "encoder.layernorm_embedding.weight"}
        sd["encoder.adapter.weight"] = torch.zeros(3)
        return sd

    with pytest.raises(CheckpointError) as e:
        Classifier.from_pretrained(variant(plain, tmp_path, odd), device="cpu")
    message = str(e.value)
    assert "missing: encoder.layernorm_embedding.weight (1)" in message
    assert "unexpected: encoder.adapter.weight (1)" in message


def test_integers_where_floats_belong_are_refused(plain: Path, tmp_path: Path) -> None:
    def ints(sd: dict) -> dict:
        sd["encoder.layernorm_embedding.weight"] = sd["encoder.layernorm_embedding.weight"].long()
        return sd

    with pytest.raises(CheckpointError, match=r"wrong dtype: encoder.layernorm_embedding.weight "
                                              r"int64 \(want floating point\)"):
        Classifier.from_pretrained(variant(plain, tmp_path, ints), device="cpu")


def test_config_keys_left_out_take_modelscope_s_defaults(plain: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sparse"
    shutil.copytree(plain, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    # ModelScope's default FFN is 2048 wide: this file's is not, and the error says why
    with pytest.raises(CheckpointError) as e:
        Classifier.from_pretrained(folder, device="cpu")
    assert f"(want (2048, {TINY_SPEC.d_model}))" in str(e.value)
    assert "config.json lacks encoder_ffn_dim, decoder_ffn_dim, so ModelScope's defaults" \
        in str(e.value)


_PARAMETERS: dict[Path, int] = {}


def plain_parameters(plain: Path) -> int:
    """The plain model's parameter count, counted once."""
    if plain not in _PARAMETERS:
        model = Classifier.from_pretrained(plain, device="cpu").model
        _PARAMETERS[plain] = sum(t.numel() for t in model.parameters())
    return _PARAMETERS[plain]


def safetensors_shards(plain: Path, where: Path) -> Path:
    """The plain folder with its weights as two safetensors shards instead of the pickle."""
    from safetensors.torch import save_file

    folder = where / "shards"
    shutil.copytree(plain, folder)
    sd = remap_modelscope_state_dict(torch.load(plain / "pytorch_model.bin", weights_only=True))
    keys = sorted(sd)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = folder / f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(shard))
    (folder / "pytorch_model.bin").unlink()
    return folder


@pytest.mark.parametrize("edit", [None, with_versions, separate_copies, without_buffers, with_prefix,
                                  fp16, everything, safetensors_shards],
                         ids=lambda f: "plain" if f is None else f.__name__)
def test_info_describes_every_layout(plain: Path, tmp_path: Path, edit: Callable | None) -> None:
    from cli_helpers import cli_env, run_cli

    if edit is None:
        folder = plain
    elif edit is safetensors_shards:
        folder = safetensors_shards(plain, tmp_path)
    else:
        folder = variant(plain, tmp_path, edit)
    proc = run_cli(["info", "--model", str(folder), "--json"], env=cli_env())
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["path"] == str(folder) and facts["network"]["resnet"] == TINY_SPEC.resnet
    assert facts["network"]["d_model"] == TINY_SPEC.d_model
    assert facts["decoding"]["gen_type"] == TINY_SPEC.gen_type
    assert facts["labels"]["count"] == 1000
    assert facts["labels"]["first"][0] == {"index": 0, "label": "tench"}
    assert ["Cardigan", "cardigan"] in facts["labels"]["differ_only_in_case"]
    weights = facts["weights"]
    half = edit in (fp16, everything)
    stored = sum(w["values"] for w in weights)
    want_dtype = "float16" if half else "float32"
    assert all(want_dtype in w["dtypes"] for w in weights)
    if edit is safetensors_shards:
        assert [w["format"] for w in weights] == ["safetensors"] * 2
    else:
        assert [w["format"] for w in weights] == ["pickle (torch.save)"]
    # every layout holds at least the model's parameters (copies of the table add more)
    assert stored >= plain_parameters(plain)
    if edit is None:  # the text view reads the same facts
        text = run_cli(["info", "--model", str(folder)], env=cli_env())
        assert text.returncode == 0 and "indices_from: the label file's values (0..N-1)" in text.stdout
