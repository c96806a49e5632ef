"""ofacls.hub: downloads through ModelScope's real client from a fake hub on
127.0.0.1, the cache layout it leaves, and resolving ids without the network."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest
from fakehub import FakeHub, fast_client_env, unreachable_endpoint

from ofacls.errors import HubError, ModelError, ModelNotFoundError
from ofacls.hub import cached_model, download, is_complete, resolve_model

MODEL_ID = "damo/ofa_tiny"
FILES: dict[str, str | bytes] = {
    "config.json": json.dumps({"d_model": 8}),
    "configuration.json": json.dumps({"task": "image-classification"}),
    "pytorch_model.bin": b"\x80\x02weights\x00\xff",
    "vocab.json": json.dumps({"<s>": 0, "<pad>": 1}),
    "merges.txt": "#version: 0.2\na b\n",
    "answer2label.json": json.dumps({"tench": 0}),
}


def _write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in FILES.items():
        data = content if isinstance(content, bytes) else content.encode()
        (folder / name).write_bytes(data)
    return folder


def _snapshot(cache: Path, revision: str = "master") -> Path:
    return cache / "models" / "damo--ofa_tiny" / "snapshots" / revision


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MODELSCOPE_CACHE (and client home), never ~/.cache."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELSCOPE_LOG_LEVEL", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def hub(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHub({MODEL_ID: _write_model(tmp_path / "served")}) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        yield server


# --- downloading ------------------------------------------------------------------
def test_download_fetches_every_file_into_the_client_cache(hub: FakeHub, cache: Path,
                                                           capfd: pytest.CaptureFixture) -> None:
    folder = download(MODEL_ID)
    assert folder == _snapshot(cache)
    for name, content in FILES.items():
        data = content if isinstance(content, bytes) else content.encode()
        assert (folder / name).read_bytes() == data
    assert sorted(hub.downloads()) == sorted(FILES)
    assert not list(folder.rglob("*.incomplete"))
    out, err = capfd.readouterr()
    assert out == ""  # progress goes to stderr only
    assert "Downloading" in err
    assert "modelscope_hub" not in err  # the client's log lines are kept out


def test_download_without_progress_prints_nothing(hub: FakeHub, capfd: pytest.CaptureFixture
                                                  ) -> None:
    download(MODEL_ID, progress=False)
    assert capfd.readouterr() == ("", "")


def test_download_cache_dir_argument(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    folder = download(MODEL_ID, cache_dir=tmp_path / "elsewhere")
    assert folder == _snapshot(tmp_path / "elsewhere")
    assert not cache.exists()


def test_download_endpoint_argument_overrides_env(tmp_path: Path, cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", unreachable_endpoint())
    with FakeHub({MODEL_ID: _write_model(tmp_path / "served")}) as server:
        assert download(MODEL_ID, endpoint=server.url) == _snapshot(cache)


def test_download_revision(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub({MODEL_ID: _write_model(tmp_path / "served")},
                 revisions=("master", "v1.0.0")) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        assert download(MODEL_ID, revision="v1.0.0") == _snapshot(cache, "v1.0.0")
        assert {r.query.get("Revision") for r in server.requests if "Revision" in r.query} \
            == {"v1.0.0"}
        server.clear()
        assert resolve_model(MODEL_ID, revision="v1.0.0") == _snapshot(cache, "v1.0.0")
        assert server.requests == []


def test_download_in_a_subprocess_keeps_stdout_clean_and_torch_out(hub: FakeHub, cache: Path
                                                                   ) -> None:
    script = ("import sys; from ofacls.hub import download; print(download(sys.argv[1])); "
              "sys.exit(sorted({'torch', 'modelscope', 'PIL'} & set(sys.modules)) or 0)")
    proc = subprocess.run([sys.executable, "-c", script, MODEL_ID], env=fast_client_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{_snapshot(cache)}\n"
    assert "Downloading" in proc.stderr


# --- only the files a model folder needs, and only inside it ---------------------------
def _hostile_names(tmp_path: Path) -> dict[str, Path]:
    """Names a hub might list, and where ModelScope's client, which joins a listed
    name to the snapshot folder as it is, would write each (all outside the cache)."""
    up = "../" * 5  # from {cache}/models/damo--ofa_tiny/snapshots/master up to tmp_path
    return {str(tmp_path / "absolute.txt"): tmp_path / "absolute.txt",
            f"{up}dotdot.txt": tmp_path / "dotdot.txt",
            f"a/{up}../nested.txt": tmp_path / "nested.txt"}


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested", "backslash", "drive", "nul"])
def test_a_listed_name_leading_outside_the_folder_is_refused_before_any_write(
        hub: FakeHub, cache: Path, tmp_path: Path, kind: str) -> None:
    hostile = _hostile_names(tmp_path)
    names = {**{Path(name).name.removesuffix(".txt"): name for name in hostile},
             "backslash": "..\\..\\backslash.txt", "drive": "C:/backslash.txt",
             "nul": "config.json\x00.txt"}
    hub.add_file(MODEL_ID, names[kind], b"echo pwned\n")
    with pytest.raises(HubError) as info:
        download(MODEL_ID, progress=False)
    message = str(info.value)
    assert message.startswith(f"the ModelScope hub at {hub.url} lists a file ")
    assert message.endswith(f" in {MODEL_ID}, a name that leads outside the model's folder; "
                            "nothing was downloaded")
    assert "\n" not in message and "\x00" not in message
    assert hub.downloads() == []  # listed only
    for target in hostile.values():
        assert not target.exists()
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_cli_download_from_a_hostile_hub_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    hostile = _hostile_names(tmp_path)
    env = {**fast_client_env(), "MODELSCOPE_CACHE": str(tmp_path / "cache"),
           "MODELSCOPE_HOME": str(tmp_path / "home"), "OFACLS_DEBUG": "0"}
    with FakeHub({MODEL_ID: _write_model(tmp_path / "served")}) as server:
        for name in hostile:
            server.add_file(MODEL_ID, name, b"echo pwned\n")
        env["MODELSCOPE_ENDPOINT"] = url = server.url
        proc = subprocess.run([sys.executable, "-m", "ofacls", "download", MODEL_ID], env=env,
                              capture_output=True, text=True, timeout=120)
        assert server.downloads() == []
    assert (proc.returncode, proc.stdout) == (3, "")
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"ofacls: the ModelScope hub at {url} lists a file ")
    assert line.endswith("a name that leads outside the model's folder; nothing was downloaded")
    for target in hostile.values():
        assert not target.exists()
    cached = tmp_path / "cache"
    assert not cached.exists() or not [p for p in cached.rglob("*") if p.is_file()]


def test_only_the_files_a_model_folder_needs_are_fetched(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    served = _write_model(tmp_path / "served")
    (served / "onnx").mkdir()
    (served / "onnx" / "model.onnx").write_bytes(b"\0" * 3_000_000)
    (served / "README.md").write_text("# a model card\n")
    (served / "flax_model.msgpack").write_bytes(b"\0" * 3_000_000)
    with FakeHub({MODEL_ID: served}) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        folder = download(MODEL_ID, progress=False)
        assert sorted(server.downloads()) == sorted(FILES)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert is_complete(folder)


def test_safetensors_are_fetched_instead_of_the_pickle_and_the_label_file_by_its_name(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = _write_model(tmp_path / "served")
    (served / "configuration.json").write_text(json.dumps(
        {"task": "image-classification", "model": {"answer2label": "labels/classes.json"}}))
    (served / "labels").mkdir()
    (served / "labels" / "classes.json").write_text(json.dumps({"tench": 0}))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (served / name).write_bytes(b"{}")
    with FakeHub({MODEL_ID: served}) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        download(MODEL_ID, progress=False)
        fetched = server.downloads()
    assert fetched[0] == "configuration.json"  # first: it names the label file
    assert sorted(fetched) == ["config.json", "configuration.json", "labels/classes.json",
                               "merges.txt", "model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors",
                               "model.safetensors.index.json", "vocab.json"]


def test_a_label_file_named_outside_the_folder_is_not_fetched(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = _write_model(tmp_path / "served")
    (served / "configuration.json").write_text(json.dumps(
        {"task": "image-classification", "model": {"answer2label": "../../answers.json"}}))
    with FakeHub({MODEL_ID: served}) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        download(MODEL_ID, progress=False)
        assert "answer2label.json" not in server.downloads()
    assert not (cache / "models" / "answers.json").exists()


# --- resolving ids from the cache ----------------------------------------------------
def test_resolve_downloads_on_first_use_then_uses_the_cache(hub: FakeHub, cache: Path) -> None:
    folder = resolve_model(MODEL_ID, progress=False)
    assert folder == _snapshot(cache)
    assert hub.downloads()
    hub.clear()
    assert resolve_model(MODEL_ID) == folder
    assert resolve_model(MODEL_ID, offline=True) == folder
    assert hub.requests == []
    hub.stop()  # no hub at all: still found
    assert resolve_model(MODEL_ID) == folder
    assert resolve_model(MODEL_ID, offline=True) == folder


def test_resolve_with_cache_dir_argument(hub: FakeHub, tmp_path: Path) -> None:
    other = tmp_path / "other"
    folder = resolve_model(MODEL_ID, cache_dir=other, progress=False)
    assert folder == _snapshot(other)
    hub.clear()
    assert resolve_model(MODEL_ID, cache_dir=other, offline=True) == folder
    with pytest.raises(ModelNotFoundError):  # not in $MODELSCOPE_CACHE
        resolve_model(MODEL_ID, offline=True)
    assert hub.requests == []


def test_an_interrupted_download_is_completed_not_used(hub: FakeHub, cache: Path) -> None:
    folder = download(MODEL_ID, progress=False)
    weights = folder / "pytorch_model.bin"
    # As a download cut short leaves it: one file half there, one not begun.
    weights.with_name(weights.name + ".incomplete").write_bytes(weights.read_bytes()[:3])
    weights.unlink()
    (folder / "vocab.json").unlink()
    assert not is_complete(folder)
    assert cached_model(MODEL_ID) is None
    with pytest.raises(ModelNotFoundError, match=(
            rf"model {MODEL_ID} in the local cache \({folder}\) is incomplete \(no "
            rf"vocab.json, pytorch_model.bin\) and offline mode is on; finish it with "
            rf"`ofacls download {MODEL_ID}`")):
        resolve_model(MODEL_ID, offline=True)
    hub.clear()
    assert resolve_model(MODEL_ID, progress=False) == folder
    assert sorted(hub.downloads()) == ["pytorch_model.bin", "vocab.json"]  # only what was missing
    assert [r.headers.get("Range") for r in hub.requests
            if r.query.get("FilePath") == "pytorch_model.bin"] == ["bytes=3-"]  # resumed
    assert weights.read_bytes() == FILES["pytorch_model.bin"]
    assert is_complete(folder)


@pytest.mark.parametrize("layout", ["hub/damo/ofa_tiny", "damo/ofa_tiny", "models/damo/ofa_tiny"])
def test_resolve_finds_older_cache_layouts_offline(cache: Path, layout: str) -> None:
    folder = _write_model(cache / layout)
    assert resolve_model(MODEL_ID, offline=True) == folder


def test_offline_with_nothing_cached(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(MODEL_ID, offline=True)
    message = str(info.value)
    assert MODEL_ID in message and f"ofacls download {MODEL_ID}" in message
    assert "\n" not in message
    assert hub.requests == []


# --- failures ------------------------------------------------------------------------
def test_unreachable_hub(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = unreachable_endpoint()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
    start = time.monotonic()
    with pytest.raises(HubError) as info:
        download(MODEL_ID)
    assert info.value.message == f"cannot reach the ModelScope hub at {url}: connection refused"
    # a library user reads the way out in str(), in the library's terms, not the CLI's flags
    assert str(info.value) == f"{info.value.message}; hint: {info.value.hint}"
    assert f"this needs the model {MODEL_ID} once: load a local copy" in str(info.value)
    assert "offline=True" in str(info.value) and "--" not in str(info.value)
    assert time.monotonic() - start < 5  # fakehub sets the client's retries low
    with pytest.raises(HubError, match="connection refused"):
        resolve_model(MODEL_ID, progress=False)


def test_unreachable_hub_is_told_before_the_clients_retries(cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connect or a name that does not resolve is reported at once: the
    client, which would retry for ~20 s, is not called. Behind a proxy only the
    client can tell, so it is called."""
    import os

    import ofacls.hub

    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    calls: list[str] = []

    def client(model_id: str, *args: object, **kwargs: object) -> NoReturn:
        calls.append(model_id)
        raise OSError("stub client")

    monkeypatch.setattr(ofacls.hub, "_client", lambda: ofacls.hub._Client(client, client, (OSError,)))
    with pytest.raises(HubError, match="connection refused; hint: "):
        download(MODEL_ID, endpoint=unreachable_endpoint())
    with pytest.raises(HubError, match="cannot resolve its host name; hint: "):
        download(MODEL_ID, endpoint="https://no-such-hub.invalid")
    assert calls == []
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(HubError):
        download(MODEL_ID, endpoint="https://no-such-hub.invalid")
    assert calls == [MODEL_ID]


def test_unknown_model(hub: FakeHub) -> None:
    with pytest.raises(HubError) as info:
        download("damo/no_such_model")
    assert str(info.value) == \
        f"model damo/no_such_model not found on the ModelScope hub at {hub.url}"
    with pytest.raises(ModelError, match="not found"):
        resolve_model("damo/no_such_model")


def test_unknown_revision(hub: FakeHub) -> None:
    with pytest.raises(HubError, match=r"ofa_tiny \(revision v9\) not found"):
        download(MODEL_ID, revision="v9")


def test_hub_refusing_access(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub({MODEL_ID: _write_model(tmp_path / "served")}, token="secret") as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        with pytest.raises(HubError) as info:
            download(MODEL_ID)
    message = str(info.value)
    assert "refused access" in message and "HTTP 401" in message
    assert "MODELSCOPE_API_TOKEN" in message and "\n" not in message


def test_a_file_failing_mid_snapshot(hub: FakeHub, cache: Path) -> None:
    hub.break_file("vocab.json", 503)
    with pytest.raises(HubError) as info:
        download(MODEL_ID, progress=False)
    assert str(info.value) == (f"could not download vocab.json of {MODEL_ID} from the "
                               f"ModelScope hub at {hub.url}: HTTP 503")
    assert cached_model(MODEL_ID) is None  # the other files are there, the model is not


# --- what is a path, what is an id ---------------------------------------------------------
def test_a_local_folder_is_returned_as_is(tmp_path: Path, hub: FakeHub) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == folder
    assert hub.requests == []


@pytest.mark.parametrize("arg", ["./nope", "/no/such/folder", "~/no-such-ofacls-model",
                                 "a/b/c", "file.bin"])
def test_a_missing_path_is_not_taken_for_an_id(arg: str, tmp_path: Path, hub: FakeHub,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=f"no model folder at {arg}"):
        resolve_model(arg)
    assert hub.requests == []


def test_a_path_below_an_existing_folder_is_a_path(tmp_path: Path, hub: FakeHub,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model folder at models/ofa"):
        resolve_model("models/ofa")


@pytest.mark.parametrize("arg", ["", " ", "ofa", "damo/", "-x/ofa", "damo/ofa tiny", "damo/ofa?x"])
def test_malformed_ids(arg: str, hub: FakeHub, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model(arg)
    with pytest.raises(ModelNotFoundError):
        download(arg)
    assert hub.requests == []


def test_importing_hub_imports_no_client() -> None:
    heavy = "{'torch', 'PIL', 'modelscope', 'modelscope_hub', 'requests'}"
    code = f"import sys, ofacls.hub; sys.exit(sorted({heavy} & set(sys.modules)) or 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- end to end through the CLI, with a real (small) checkpoint -------------------
def test_cli_download_then_offline_predict_needs_no_server(tmp_path: Path, make_checkpoint,
                                                          images_dir: Path) -> None:
    """`ofacls download ID` through ModelScope's client, then `predict --model ID
    --offline` and a second `download` with the hub gone; an unreachable hub is exit 3."""
    from ofa_factory import CheckpointSpec

    served = make_checkpoint(CheckpointSpec(d_model=32, heads=2, ffn=64, enc_layers=1,
                                            dec_layers=1), name="hub_e2e")
    env = {**fast_client_env(), "MODELSCOPE_CACHE": str(tmp_path / "cache"),
           "MODELSCOPE_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "ofacls"]
    with FakeHub({MODEL_ID: served}) as server:
        env["MODELSCOPE_ENDPOINT"] = server.url
        got = subprocess.run([*cli, "download", MODEL_ID], env=env, capture_output=True,
                             text=True, timeout=120)
        assert got.returncode == 0, got.stderr
        folder = Path(got.stdout.strip())
        assert folder.is_dir() and str(folder).startswith(str(tmp_path / "cache"))
        assert (folder / "pytorch_model.bin").read_bytes() == (served / "pytorch_model.bin").read_bytes()
    # the server is gone now: everything below must come from the cache
    again = subprocess.run([*cli, "download", MODEL_ID], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder, again.stderr
    pred = subprocess.run([*cli, "predict", "--model", MODEL_ID, "--offline", "--json",
                           str(images_dir / "chelsea.png")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr
    row = json.loads(pred.stdout)
    assert row["error"] is None and row["label"]
    # a first run with no route to the hub: the error, then one line on what to do next,
    # and no stray files left behind
    env["MODELSCOPE_ENDPOINT"] = unreachable_endpoint()
    env["MODELSCOPE_CACHE"] = str(tmp_path / "empty-cache")
    env["MODELSCOPE_HOME"] = str(tmp_path / "fresh-home")
    down = subprocess.run([*cli, "predict", "--model", MODEL_ID, str(images_dir / "chelsea.png")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 3
    error, hint = down.stderr.splitlines()
    assert error.startswith("ofacls: cannot reach the ModelScope hub")
    assert hint.startswith(f"ofacls: hint: this needs the model {MODEL_ID} once: pass --model DIR")
    assert "ofacls download" in hint and "MODELSCOPE_ENDPOINT" in hint
    assert not (tmp_path / "fresh-home").exists()
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.json"))
