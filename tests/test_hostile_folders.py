"""Model folders are data from elsewhere: every file a folder names stays inside it
(links included), only regular files are opened (a FIFO never blocks, /dev/zero is
never read), small files have a size cap, config.json's sizes are bounded before
anything is built from them, and labels are short lines of text. Each fault is
exit 3 and one line, through a real `python -m ofacls` subprocess with a timeout,
so a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_errors, cli_env, small_image

from ofacls.errors import CheckpointError
from ofacls.model.folder import ModelFolder

# Every refusal here is known before the weights are read: a hung or swapping run
# is what the limit catches, not a slow machine.
TIMEOUT = 120
# Python, torch and the tiny model's weights mapped in; a run that builds the
# 16000-position tables of a hostile config.json peaks at over 8 GB.
SMALL_RSS_KB = 1_500_000


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_kb: int
    seconds: float


# Runs ofacls as its own child and adds that child's peak RSS as a last stderr line.
# A process's peak counts what its parent held when it forked: measured from this
# small one, not from pytest's (hundreds of MB of torch and test models).
_MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(code)")


def run_ofacls(args: Sequence[str], timeout: float = TIMEOUT) -> Run:
    """`python -m ofacls ARGS` with its peak RSS, killed (with its process group)
    after `timeout` s: a run that hangs fails the test."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _MEASURED, sys.executable, "-m", "ofacls",
                             *args], env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="surrogateescape", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"ofacls {' '.join(args)} still ran after {timeout} s")
    *lines, peak = err.splitlines(keepends=True)
    return Run(proc.returncode, out, "".join(lines), int(peak), time.monotonic() - start)


def assert_refused(run: Run, message: str | Callable[[str], bool]) -> None:
    """Exit 3, nothing on stdout, `ofacls: MESSAGE` as the one stderr line."""
    assert (run.returncode, run.stdout) == (3, ""), run.stderr
    assert_one_line_errors(run.stderr)
    (line,) = run.stderr.splitlines()
    text = line.removeprefix("ofacls: ")
    assert message(text) if callable(message) else text == message, line


def copy_of(model: Path, dest: Path, *, leave_out: Sequence[str] = ()) -> Path:
    """`model`'s files hard-linked into `dest` (a link out of the folder is refused)."""
    dest.mkdir(parents=True)
    for f in model.iterdir():
        if f.name not in leave_out:
            os.link(f, dest / f.name)
    return dest


def with_labels_named(folder: Path, name: str) -> Path:
    """`folder` with configuration.json's model.answer2label set to `name`."""
    conf = folder / "configuration.json"
    data = json.loads(conf.read_text(encoding="utf-8"))
    data["model"]["answer2label"] = name
    conf.unlink()  # hard-linked: a new file, the original untouched
    conf.write_text(json.dumps(data), encoding="utf-8")
    return folder


def replace(folder: Path, name: str, text: str) -> Path:
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("photo") / "cat.png")


# --- FIFOs and devices -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["answer2label.json", "config.json", "configuration.json",
                                  "vocab.json"])
def test_a_fifo_in_place_of_a_small_file_is_refused_without_blocking(
        model: Path, tmp_path: Path, photo: Path, name: str) -> None:
    folder = copy_of(model, tmp_path / "m", leave_out=[name])
    os.mkfifo(folder / name)
    run = run_ofacls(["predict", "--model", str(folder), str(photo)])
    assert_refused(run, f"{folder / name}: not a regular file (a FIFO)")


def test_a_fifo_as_the_label_file_does_not_hang_ofacls_labels(model: Path, tmp_path: Path
                                                               ) -> None:
    folder = copy_of(model, tmp_path / "m", leave_out=["answer2label.json"])
    os.mkfifo(folder / "answer2label.json")
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{folder / 'answer2label.json'}: not a regular file (a FIFO)")


def test_a_fifo_named_model_safetensors_is_refused_not_opened(model: Path, tmp_path: Path,
                                                             photo: Path) -> None:
    folder = copy_of(model, tmp_path / "m")
    os.mkfifo(folder / "model.safetensors")
    run = run_ofacls(["predict", "--model", str(folder), str(photo)])
    assert_refused(run, f"{folder / 'model.safetensors'}: not a regular file (a FIFO)")


def test_a_link_to_dev_zero_is_refused(model: Path, tmp_path: Path) -> None:
    folder = copy_of(model, tmp_path / "m", leave_out=["answer2label.json"])
    (folder / "answer2label.json").symlink_to("/dev/zero")
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, lambda m: m.startswith(f"{folder / 'answer2label.json'} leads to /dev/zero"
                                               ", outside the model folder"))


def test_devices_and_fifos_are_refused_by_the_readers_themselves(tmp_path: Path) -> None:
    """Without a folder around them (the library's own readers): refused by status."""
    from ofacls.labels import load_tokenizer, read_label_file
    from ofacls.model.config import load_json

    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(CheckpointError, match="/dev/zero: not a regular file"):
        read_label_file(Path("/dev/zero"))
    with pytest.raises(CheckpointError, match=r"fifo.json: not a regular file \(a FIFO\)$"):
        load_json(tmp_path / "fifo.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_tokenizer(tmp_path / "fifo.json", Path("/dev/null"))
    with pytest.raises(CheckpointError, match=r"not a regular file \(a folder\)$"):
        load_json(tmp_path)


# --- names and links leading outside the folder --------------------------------------------
@pytest.mark.parametrize("name", ["../outside.json", "ABSOLUTE", "sub/../../outside.json",
                                  "..\\outside.json"])
def test_a_label_file_named_outside_the_folder_is_refused(model: Path, tmp_path: Path,
                                                          name: str) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"secret": 0}), encoding="utf-8")
    name = str(outside) if name == "ABSOLUTE" else name
    folder = with_labels_named(copy_of(model, tmp_path / "m"), name)
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{folder / 'configuration.json'}: model.answer2label {name!r} is not a "
                        "file name inside the model folder")
    assert "secret" not in run.stdout + run.stderr


def test_a_link_out_of_the_folder_is_refused(model: Path, tmp_path: Path) -> None:
    secret = tmp_path / "home" / "config.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"auths": {}, "credsStore": "x"}), encoding="utf-8")
    folder = copy_of(model, tmp_path / "m", leave_out=["answer2label.json"])
    (folder / "answer2label.json").symlink_to(secret)
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{folder / 'answer2label.json'} leads to {secret}, outside the model "
                        f"folder {folder}; copy or hard-link the file into the folder")
    assert "auths" not in run.stdout + run.stderr


def test_a_folder_below_a_linked_folder_is_checked_after_the_link(model: Path, tmp_path: Path
                                                                  ) -> None:
    """A plain name whose folder part is a link out: refused once resolved."""
    (tmp_path / "elsewhere").mkdir()
    os.link(model / "answer2label.json", tmp_path / "elsewhere" / "labels.json")
    folder = with_labels_named(copy_of(model, tmp_path / "m"), "sub/labels.json")
    (folder / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        ModelFolder.open(folder).label_names()


def test_links_inside_the_folder_and_a_linked_folder_itself_are_fine(model: Path,
                                                                      tmp_path: Path) -> None:
    folder = with_labels_named(copy_of(model, tmp_path / "m", leave_out=["answer2label.json"]),
                               "labels/classes.json")
    (folder / "labels").mkdir()
    os.link(model / "answer2label.json", folder / "labels" / "real.json")
    (folder / "labels" / "classes.json").symlink_to("real.json")
    (tmp_path / "alias").symlink_to(folder)
    expected = ModelFolder.open(model).label_names()
    assert ModelFolder.open(folder).label_names() == expected
    assert ModelFolder.open(tmp_path / "alias").label_names() == expected


def test_a_link_loop_is_one_line(model: Path, tmp_path: Path) -> None:
    folder = copy_of(model, tmp_path / "m", leave_out=["answer2label.json"])
    (folder / "answer2label.json").symlink_to("answer2label.json")
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, lambda m: m.startswith(f"{folder / 'answer2label.json'}: "))


# --- sizes -------------------------------------------------------------------------------
def test_a_json_file_over_the_cap_is_refused_unread(model: Path, tmp_path: Path) -> None:
    from ofacls.model.config import MAX_SMALL_FILE_BYTES

    folder = copy_of(model, tmp_path / "m", leave_out=["answer2label.json"])
    with open(folder / "answer2label.json", "wb") as f:
        f.truncate(MAX_SMALL_FILE_BYTES + 1)  # sparse: no disk, and never read
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{folder / 'answer2label.json'}: {MAX_SMALL_FILE_BYTES + 1:,} bytes, "
                        "more than a model folder's file of this kind may hold "
                        f"({MAX_SMALL_FILE_BYTES:,} bytes)")


def test_absurd_positions_in_config_json_fail_fast_and_small(model: Path, tmp_path: Path,
                                                             photo: Path) -> None:
    """max_position_embeddings 16000 with weights that lack the index buffers: the
    tables built from it alone took over 8 GB and minutes before the weights were
    compared with it."""
    folder = copy_of(model, tmp_path / "m", leave_out=["pytorch_model.bin", "config.json"])
    sd = torch.load(model / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in sd.items() if "rp_bucket" not in k}, folder / "pytorch_model.bin")
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    replace(folder, "config.json", json.dumps({**config, "max_position_embeddings": 16000}))
    run = run_ofacls(["predict", "--model", str(folder), str(photo)])
    assert_refused(run, f"{folder / 'config.json'}: max_position_embeddings 16,000 is beyond "
                        "what an OFA model uses (at most 2,048 here)")
    assert run.peak_rss_kb < SMALL_RSS_KB
    assert run.seconds < 60  # minutes before; mostly interpreter and torch start-up now
    # within the bound but not the weights' size: refused on the shapes, before the
    # remap builds tables for it
    replace(folder, "config.json", json.dumps({**config, "max_position_embeddings": 2000}))
    run = run_ofacls(["predict", "--model", str(folder), str(photo)])
    assert_refused(run, lambda m: m.startswith(f"{folder}: weights do not match config.json; "
                                               "wrong shape: decoder.embed_positions.weight"))
    assert run.peak_rss_kb < SMALL_RSS_KB


@pytest.mark.parametrize("key, value", [("encoder_layers", 100_000), ("vocab_size", 10**9),
                                        ("image_bucket_size", 4096), ("d_model", 2**20)])
def test_every_size_has_a_bound(model: Path, key: str, value: int) -> None:
    from ofacls.model.config import OFAConfig

    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    with pytest.raises(CheckpointError, match=f"^config.json: {key} {value:,} is beyond"):
        OFAConfig.from_dict({**config, key: value})


def test_a_number_too_long_to_parse_is_one_line(model: Path, tmp_path: Path) -> None:
    folder = copy_of(model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = json.dumps(config).replace('"d_model": 32', '"d_model": ' + "9" * 5000)
    assert text != json.dumps(config)
    replace(folder, "config.json", text)
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        _ = ModelFolder.open(folder).config


# --- labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("label, code", [("tench\nrm -rf ~", "000A"), ("\x1b[2Jgoldfish", "001B"),
                                         ("nul\x00", "0000"), ("del\x7f", "007F"),
                                         ("csi\x9b2J", "009B"), ("line\u2028break", "2028")],
                         ids=["newline", "esc", "nul", "del", "c1", "line-separator"])
def test_a_label_with_a_control_character_is_refused(model: Path, tmp_path: Path, label: str,
                                                     code: str) -> None:
    folder = copy_of(model, tmp_path / "m")
    path = replace(folder, "answer2label.json", json.dumps({"tabby": 0, label: 1}))
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{path}: label {label!r} holds the control character U+{code}")
    assert "\x1b" not in run.stderr


def test_too_many_labels_are_refused(model: Path, tmp_path: Path) -> None:
    from ofacls.labels import MAX_LABELS

    folder = copy_of(model, tmp_path / "m")
    path = replace(folder, "answer2label.json",
                   json.dumps({f"class {i}": i for i in range(MAX_LABELS + 1)}))
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, f"{path}: {MAX_LABELS + 1:,} labels, more than {MAX_LABELS:,}")
    assert run.peak_rss_kb < SMALL_RSS_KB


def test_a_label_too_long_is_refused(model: Path, tmp_path: Path) -> None:
    from ofacls.labels import MAX_LABEL_CHARS

    folder = copy_of(model, tmp_path / "m")
    path = replace(folder, "answer2label.json", json.dumps({"x" * (MAX_LABEL_CHARS + 1): 0}))
    run = run_ofacls(["labels", "--model", str(folder)])
    assert_refused(run, lambda m: m.startswith(f"{path}: label 'xxx")
                   and m.endswith(f"... has {MAX_LABEL_CHARS + 1:,} characters, more than "
                                  f"{MAX_LABEL_CHARS:,}"))


def test_the_labels_tokens_have_a_cap(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ofacls.labels
    from ofacls.labels import LabelTrie

    folder = ModelFolder.open(model)
    names, tokenizer = folder.label_names(), folder.tokenizer()
    assert LabelTrie.build(names, tokenizer).names == names
    monkeypatch.setattr(ofacls.labels, "MAX_LABEL_TOKENS", 100)
    with pytest.raises(CheckpointError, match="^the labels take more than 100 tokens in all"):
        LabelTrie.build(names, tokenizer)


def test_the_trie_is_built_the_same_in_slices(model: Path) -> None:
    """Labels are tokenised in slices: the answers' tokens do not depend on the slicing."""
    from ofacls.labels import LabelTrie

    folder = ModelFolder.open(model)
    names = [f"{n} {i}" for i in range(3) for n in folder.label_names()]  # 3000: three slices
    tokenizer = folder.tokenizer()
    trie = LabelTrie.build(names, tokenizer)
    whole = [e.ids for e in tokenizer.encode_batch([" " + n for n in names],
                                                   add_special_tokens=False)]
    assert trie.token_ids == whole
