"""A small fake ModelScope hub on 127.0.0.1, for downloading through the real client.

It answers the legacy `/api/v1` routes that `snapshot_download` of modelscope
1.40 (which delegates to modelscope-hub 0.5) calls when an endpoint is given:

    GET  /api/v1/models/{owner}/{name}/repo/files?Revision=R&Recursive=True  file list
    GET  /api/v1/models/{owner}/{name}/repo?Revision=R&FilePath=P            file bytes
    GET  /api/v1/repos/internalAccelerationInfo      cloud-region probe (404 here)

and, for older clients and completeness, model info
(`GET /api/v1/models/{owner}/{name}`) and revisions
(`GET .../revisions`). Every request is logged, so a test can assert that
a run made none.

Point the client at it with `MODELSCOPE_ENDPOINT=hub.url` (or `endpoint=`).
With no endpoint configured the client probes modelscope.cn and modelscope.ai
first, so always set one in tests.

    with FakeHub({"owner/name": folder}) as hub:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        ...
        assert hub.requests == []
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# modelscope-hub reads its retry counts and timeouts from the environment once,
# when it is first imported. The defaults retry an unreachable hub for ~7 s
# (listing: 4 attempts, 1+2+4 s apart) and each file 5 times; tests want one
# quick attempt. Applied with setdefault at import, so import this module before
# anything imports modelscope_hub (ofacls imports it lazily), and pass
# `fast_client_env()` to subprocesses.
FAST_CLIENT_ENV = {
    "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
    "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
    "MODELSCOPE_API_CONNECT_TIMEOUT": "2",
    "MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS": "5",
    "MODELSCOPE_DOWNLOAD_TIMEOUT": "5",
}
for _key, _value in FAST_CLIENT_ENV.items():
    os.environ.setdefault(_key, _value)


def fast_client_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the quick-failing client settings."""
    env = dict(os.environ if base is None else base)
    env.update(FAST_CLIENT_ENV)
    return env


def unreachable_endpoint() -> str:
    """An http://127.0.0.1 URL where nothing listens (a port just bound and closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Request:
    """One request the fake hub received."""

    method: str
    path: str  # URL path, percent-decoded
    query: dict[str, str]
    headers: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class _File:
    path: str  # POSIX path inside the repo
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


_API = "/api/v1/"
_COMMIT = "0" * 40


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (free port) serving model folders by id.

    `models` maps ModelScope ids (`owner/name`) to local folders; their files are
    read once, when added. Every id is served at each of `revisions`; another
    revision or id gets the hub's 404. With `token` set, requests without
    `Authorization: Bearer <token>` get 401.
    """

    def __init__(self, models: Mapping[str, str | os.PathLike[str]] | None = None, *,
                 revisions: Iterable[str] = ("master",), token: str | None = None) -> None:
        self.revisions = tuple(revisions)
        self.token = token
        self.requests: list[Request] = []
        self._models: dict[str, list[_File]] = {}
        self._broken: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for model_id, folder in (models or {}).items():
            self.add_model(model_id, folder)

    def add_model(self, model_id: str, folder: str | os.PathLike[str]) -> None:
        """Serve every file below `folder` (recursively) as the repo `model_id`."""
        root = Path(folder)
        files = [_File(p.relative_to(root).as_posix(), p.read_bytes())
                 for p in sorted(root.rglob("*")) if p.is_file()]
        if not files:
            raise ValueError(f"{root}: no files to serve")
        self._models[model_id] = files

    def add_file(self, model_id: str, path: str, data: bytes = b"") -> None:
        """List and serve `data` as the file `path` of `model_id` (already added),
        whatever the name: a hostile hub lists `../../x` or `/home/u/.bashrc`."""
        self._models[model_id].append(_File(path, data))

    def break_file(self, path: str, status: int = 500) -> None:
        """Answer downloads of the repo file `path` (any model) with HTTP `status`."""
        self._broken[path] = status

    # --- lifecycle ---------------------------------------------------------------
    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. `http://127.0.0.1:40123`."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"  # where start() binds

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02},  # quick stop()
                                        name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (later requests are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the request log ------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self) -> list[str]:
        """Repo paths of the files fetched so far, in request order."""
        with self._lock:
            return [r.query.get("FilePath", "") for r in self.requests
                    if r.method == "GET" and r.path.endswith("/repo")]

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's session expects

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the request log replaces the stderr access log

    def do_GET(self) -> None:  # noqa: N802
        self._handle(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(body=False)

    def _handle(self, *, body: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.fake._log(Request(self.command, path, query, dict(self.headers.items())))
        if self.fake.token is not None and \
                self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            return self._json(401, {"Code": 401, "Message": "Unauthorized, please login first",
                                    "Success": False}, body)
        if not path.startswith(_API + "models/"):
            return self._not_found(f"no route {path}", body)
        parts = path[len(_API + "models/"):].split("/")
        model_id = "/".join(parts[:2])
        rest = "/".join(parts[2:])
        files = self.fake._models.get(model_id) if len(parts) >= 2 else None
        if files is None:
            return self._not_found(f"model {model_id} not exists", body)
        revision = query.get("Revision", "master")
        if rest in ("repo/files", "repo") and revision not in self.fake.revisions:
            return self._not_found(f"revision {revision} not exists", body)
        if rest == "":
            owner, name = model_id.split("/")
            return self._ok({"Name": name, "Path": owner, "Id": 1, "ModelType": ["ofa"]}, body)
        if rest == "revisions":
            branches = [{"Revision": r, "CommitId": _COMMIT, "CreatedAt": 0}
                        for r in self.fake.revisions]
            return self._ok({"RevisionMap": {"Branches": branches, "Tags": []}}, body)
        if rest == "repo/files":
            return self._ok({"Files": [self._entry(f, revision) for f in files]}, body)
        if rest == "repo":
            wanted = query.get("FilePath", "")
            if wanted in self.fake._broken:
                status = self.fake._broken[wanted]
                return self._json(status, {"Code": status, "Message": f"HTTP {status}",
                                           "Success": False}, body)
            for f in files:
                if f.path == wanted:
                    return self._file(f, body)
            return self._not_found(f"file {wanted} not exists", body)
        return self._not_found(f"no route {path}", body)

    @staticmethod
    def _entry(f: _File, revision: str) -> dict[str, object]:
        # The fields of a real `repo/files` entry; the client uses Path, Type, Size, Sha256.
        return {"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob",
                "Size": len(f.data), "Sha256": f.sha256, "Revision": revision,
                "CommitId": _COMMIT, "CommitMessage": "upload", "CommittedDate": 0,
                "IsLFS": False, "Mode": "33188", "InCheck": False}

    def _file(self, f: _File, body: bool) -> None:
        data = f.data
        start = _range_start(self.headers.get("Range"))
        if start is not None and start < len(data):
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _ok(self, data: object, body: bool) -> None:
        self._json(200, {"Code": 200, "Data": data, "Message": "success",
                         "RequestId": "fakehub", "Success": True}, body)

    def _not_found(self, message: str, body: bool) -> None:
        self._json(404, {"Code": 404, "Message": message, "RequestId": "fakehub",
                         "Success": False}, body)

    def _json(self, status: int, payload: object, body: bool) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)


def _range_start(header: str | None) -> int | None:
    """The first byte of a `bytes=N-` range (the only form the client sends)."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    try:
        return int(header[len("bytes="):-1])
    except ValueError:
        return None
