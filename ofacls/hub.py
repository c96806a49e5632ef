"""Model ids -> local folders: ModelScope's hub client, its cache, offline use.

`resolve_model` turns what a user passes as `--model` into a folder: a local
folder as it is, a ModelScope id (`owner/name`) from the local cache when a
complete copy is there (no network at all), else through `download`.

The client is ModelScope's own `snapshot_download`, asked for the files a model
folder needs by name (not the whole repository), after every name the hub lists
has been checked: the client joins a listed name to the cache folder as it is,
so `/home/u/.bashrc` or `../../x` would be written there. Since modelscope 1.38,
`modelscope.hub.snapshot_download` is a thin shim over the `modelscope_hub`
package; we call that package directly when it is there, because importing
`modelscope` itself pulls in torch (~2 s), which a download has no use for.
The cache layout is the client's: `{cache}/models/{owner}--{name}/snapshots/{revision}/`
with `{cache}` = `cache_dir`, else `$MODELSCOPE_CACHE`, else `~/.cache/modelscope`.
The hub is `$MODELSCOPE_ENDPOINT` when set (with none, the client picks
modelscope.cn or modelscope.ai by asking both).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ofacls.errors import HubError, ModelNotFoundError
from ofacls.model.folder import CONFIGURATION, ModelFolder, files_to_fetch, is_plain_name, labels_named

DEFAULT_MODEL_ID = "damo/ofa_image-classification_imagenet_large_en"
DEFAULT_MODEL_SIZE = "about 1.9 GB"
DEFAULT_ENDPOINT = "https://modelscope.cn"  # the client's default; only named in messages

# ModelScope ids are `owner/name`, each made of letters, digits, `-`, `_` and `.`.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# ModelScope moved DAMO's models into the `iic` namespace; references name both.
_OLD_OWNER, _NEW_OWNER = "damo", "iic"

log = logging.getLogger("ofacls")


def env_offline() -> bool:
    """OFACLS_OFFLINE set to anything but empty, 0, false, no or off."""
    return os.environ.get("OFACLS_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def resolve_model(model: str, *, offline: bool = False, cache_dir: str | os.PathLike[str] | None = None,
                  revision: str | None = None, progress: bool = True) -> Path:
    """The local folder for `model`: a folder path, or a ModelScope id.

    An id is taken from the local cache when a complete copy is there, without
    touching the network; otherwise it is downloaded, unless `offline`."""
    if not model.strip():
        raise ModelNotFoundError("no model given (an empty name)")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(model, path):
        raise ModelNotFoundError(f"no model folder at {model}")
    with _tidy_on_failure():
        return _resolve_id(_check_id(model), offline=offline, cache_dir=cache_dir,
                           revision=revision, progress=progress)


def _resolve_id(model_id: str, *, offline: bool, cache_dir: str | os.PathLike[str] | None,
                revision: str | None, progress: bool) -> Path:
    candidates = [c for other in _aliases(model_id)
                  for c in _cached_folders(other, revision, cache_dir)]
    cached = next((c for c in candidates if is_complete(c)), None)
    if cached is not None:
        return cached
    if offline:
        partial = next((c for c in candidates if c.is_dir()), None)
        where = _cache_root(cache_dir) or "ModelScope's cache"
        if partial is not None:
            raise ModelNotFoundError(
                f"model {model_id} in the local cache ({partial}) is incomplete "
                f"({ModelFolder(partial).lacks()}) and offline mode is on; finish it with "
                f"`ofacls download {model_id}`")
        raise ModelNotFoundError(
            f"model {model_id} is not in the local cache ({where}) and offline mode is on; "
            f"fetch it first with `ofacls download {model_id}"
            + (f" --cache-dir {cache_dir}`" if cache_dir else "`"))
    return download(model_id, revision=revision, cache_dir=cache_dir, progress=progress)


def cached_model(model_id: str, *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached folder of a completely downloaded `model_id`, or None. Never uses the network.

    The client's own offline lookup (`local_files_only=True`) finds the folder
    but accepts any non-empty one, including a download cut short, so the
    folder must also hold every file a model needs and no partial file."""
    candidates = [c for other in _aliases(_check_id(model_id))
                  for c in _cached_folders(other, revision, cache_dir)]
    return next((c for c in candidates if is_complete(c)), None)


def _aliases(model_id: str) -> list[str]:
    """`model_id`, then its `iic/` name when it is a `damo/` one (where the hub moved it)."""
    owner, name = model_id.split("/")
    return [model_id, f"{_NEW_OWNER}/{name}"] if owner == _OLD_OWNER else [model_id]


def _cached_folders(model_id: str, revision: str | None,
                    cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where the cache may hold `model_id`, complete or not, best first."""
    client = _client()
    root = _cache_root(cache_dir)
    candidates = []
    try:
        found = client.snapshot_download(model_id, revision=revision, cache_dir=root,
                                         local_files_only=True)
        candidates.append(Path(found))
    except client.errors:
        pass  # not in the client's layouts: the older layouts below may hold it
    if revision is None:
        candidates += _older_layouts(model_id, root)
    return candidates


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole model: the files it needs, no partial download."""
    return ModelFolder(folder).is_complete()


def download(model_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             progress: bool = True, endpoint: str | None = None) -> Path:
    """Fetch `model_id` into the local cache with ModelScope's client; return its folder.

    Files already in the cache are kept, so this also completes a download that
    was cut short. Progress bars go to stderr (never stdout); `progress=False`
    silences them. `endpoint` overrides `$MODELSCOPE_ENDPOINT`. Every failure
    becomes a `HubError` with a one-line message. A `damo/` id the hub does not
    know is tried under `iic/`, where ModelScope moved DAMO's models."""
    with _tidy_on_failure():
        return _download(_check_id(model_id), revision=revision, cache_dir=cache_dir,
                         progress=progress, endpoint=endpoint)


def _download(model_id: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None,
              progress: bool, endpoint: str | None) -> Path:
    client = _client()
    # Read at call time: the client reads its environment only once per process.
    endpoint = endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or None
    domain = os.environ.get("MODELSCOPE_DOMAIN")
    shown = (endpoint or domain or DEFAULT_ENDPOINT).rstrip("/")
    why = _unreachable([endpoint] if endpoint else [domain] if domain else list(_DEFAULT_HOSTS))
    if why is not None:
        raise HubError(f"cannot reach the ModelScope hub at {shown}: {why}", hint=_hint(model_id),
                       needs=model_id)
    for attempt in _aliases(model_id):
        if attempt != model_id:
            log.warning("model %s is not on the hub; trying %s, where ModelScope moved "
                        "DAMO's models", model_id, attempt)
        try:
            with _quiet_client(progress):
                return _fetch(client, attempt, revision=revision, cache_root=_cache_root(cache_dir),
                              endpoint=endpoint, shown=shown)
        except client.errors as e:
            if _status_code(e) == 404 and attempt != _aliases(model_id)[-1]:
                continue
            network = _status_code(e) is None and _network_reason(e) is not None
            raise HubError(_describe(e, model_id, revision, shown),
                           hint=_hint(model_id) if network else None,
                           needs=model_id if network else None) from e
    raise AssertionError("unreachable: the last alias returns or raises")


def _fetch(client: _Client, model_id: str, *, revision: str | None, cache_root: str | None,
           endpoint: str | None, shown: str) -> Path:
    """Fetch the files of `model_id` a model folder needs, once every name the hub
    lists is known to stay inside the folder; return the folder.

    configuration.json comes first, since it names the label file. The client
    lists the repository again on each call; it is given literal names only, so
    a listing that changed in between cannot add a file to what it fetches."""
    listed = client.list_files(model_id, revision, endpoint)
    bad = next((name for name in listed if not is_plain_name(name)), None)
    if bad is not None:
        shown_name = repr(bad) if len(repr(bad)) <= 80 else repr(bad)[:77] + "..."
        raise HubError(f"the ModelScope hub at {shown} lists a file {shown_name} in {model_id}, "
                       "a name that leads outside the model's folder; nothing was downloaded")

    def fetch(names: list[str]) -> Path:
        # never an empty list: to the client, no patterns means every file
        patterns = [_literal(name) for name in names] or [CONFIGURATION]
        return Path(client.snapshot_download(model_id, revision=revision, cache_dir=cache_root,
                                             endpoint=endpoint, allow_patterns=patterns))

    folder = fetch([CONFIGURATION])
    return fetch(files_to_fetch(listed, labels_named(folder / CONFIGURATION)))


def _literal(name: str) -> str:
    """`name` as a glob pattern that matches only itself (the client matches with fnmatch)."""
    return re.sub(r"[*?[]", lambda m: f"[{m.group()}]", name)


def needs_once(model_id: str) -> str:
    """How every hint for a missing model starts: "this needs the model ID (size) once"."""
    size = f" ({DEFAULT_MODEL_SIZE})" if model_id == DEFAULT_MODEL_ID else ""
    return f"this needs the model {model_id}{size} once"


# how the hub client is pointed elsewhere: the same in a library and on the command line
ELSEWHERE = "MODELSCOPE_ENDPOINT (a mirror) or HTTPS_PROXY (a proxy) point the hub client elsewhere"


def _hint(model_id: str) -> str:
    """What to do when the hub cannot be reached, in a library's terms (the CLI says it
    in its options' terms)."""
    return (f"{needs_once(model_id)}: load a local copy of its model folder, or download it "
            f"where the hub is reachable (ofacls.hub.download(..., cache_dir=DIR)) and load it "
            f"from that cache with offline=True; {ELSEWHERE}")


@contextlib.contextmanager
def _tidy_on_failure() -> Iterator[None]:
    """A failed first download leaves no trace: the client writes a telemetry session
    id under ~/.modelscope (MODELSCOPE_HOME) before it knows whether the hub answers;
    a folder that did not exist before a failed call is removed again."""
    home = Path(os.environ.get("MODELSCOPE_HOME") or Path.home() / ".modelscope").expanduser()
    existed = home.exists()
    try:
        yield
    except BaseException:
        if not existed and home.is_dir():
            shutil.rmtree(home, ignore_errors=True)
        raise


# --- the client ----------------------------------------------------------------
_DEFAULT_HOSTS = ("https://modelscope.cn", "https://modelscope.ai")  # the client asks both


def _unreachable(urls: list[str], timeout: float = 10.0) -> str | None:
    """Why none of the hub's hosts takes a TCP connection; None when one does, or
    when a proxy is configured (then only the client can tell).

    Without this, an offline machine waits ~20 s for the client's retries
    before the same answer; a failed name lookup or a refused connect is known
    at once."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    if urllib.request.getproxies():
        return None
    why = None
    for url in urls:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            return None  # a malformed endpoint: the client reports it its own way
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            return None
        except OSError as e:  # the same words as for the client's own network errors
            why = _network_reason(e) or (e.strerror or str(e)).lower()
    return why


class _Client(NamedTuple):
    """ModelScope's hub client, as much of it as ofacls uses."""

    snapshot_download: Callable[..., str]
    # (model_id, revision, endpoint) -> the paths of the repository's files
    list_files: Callable[[str, str | None, str | None], list[str]]
    errors: tuple[type[BaseException], ...]  # what it raises for a failed download


def _client() -> _Client:
    """ModelScope's client: `modelscope_hub` when installed, else modelscope's built-in one."""
    import requests

    errors: tuple[type[BaseException], ...] = (requests.RequestException, OSError, ValueError)
    try:
        from modelscope_hub.compat.snapshot_download import snapshot_download
        from modelscope_hub.errors import HubError as ClientError
    except ImportError:  # modelscope < 1.38 has the client built in
        from modelscope.hub.snapshot_download import snapshot_download as builtin

        return _Client(builtin, _list_files_builtin, errors)
    return _Client(snapshot_download, _list_files, (ClientError, *errors))


def _list_files(model_id: str, revision: str | None, endpoint: str | None) -> list[str]:
    """The repository's file paths, from the listing `snapshot_download` reads too
    (with no endpoint, found as it finds one: modelscope.cn, else modelscope.ai)."""
    from modelscope_hub.api import HubApi

    api = HubApi(endpoint=endpoint)
    if endpoint is None:
        with contextlib.suppress(Exception):  # as snapshot_download: the default then
            api = HubApi(endpoint=api.resolve_endpoint_for_read(model_id))
    return [f.path for f in api.list_repo_files(model_id, "model", revision=revision)]


def _list_files_builtin(model_id: str, revision: str | None, endpoint: str | None) -> list[str]:
    from modelscope.hub.api import HubApi

    files = HubApi(endpoint=endpoint).get_model_files(model_id, revision=revision or "master",
                                                      recursive=True)
    return [str(f.get("Path") or f.get("Name") or "") for f in files]


@contextlib.contextmanager
def _quiet_client(progress: bool) -> Iterator[None]:
    """Keep the client's log lines out of our output, and its tqdm bars too unless `progress`.

    The client logs every retry and failure at INFO..ERROR on stderr; we report
    one line instead (MODELSCOPE_LOG_LEVEL, when set, is left alone). tqdm
    picks `sys.stderr` when a bar is created, so pointing it at /dev/null for
    the call silences the bars of the client's worker threads too."""
    log = logging.getLogger("modelscope_hub")
    level = log.level
    if not os.environ.get("MODELSCOPE_LOG_LEVEL"):
        log.setLevel(logging.CRITICAL)
    try:
        if progress:
            yield
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                yield
    finally:
        log.setLevel(level)


def _describe(e: BaseException, model_id: str, revision: str | None, endpoint: str) -> str:
    """One line saying why a download failed, without the client's error codes and dumps."""
    what = model_id if revision is None else f"{model_id} (revision {revision})"
    hub = f"the ModelScope hub at {endpoint}"
    failed = getattr(e, "failed_files", None)  # the listing worked, some files did not
    if failed:
        name, cause = next(iter(failed.items()))
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return f"could not download {name}{more} of {what} from {hub}: {_reason(cause)}"
    status = _status_code(e)
    if status == 404:
        return f"model {what} not found on {hub}"
    if status in (401, 403):
        return (f"{hub} refused access to {what} (HTTP {status}); "
                "set MODELSCOPE_API_TOKEN or log in with `modelscope login`")
    if status is not None:
        return f"{hub} answered HTTP {status} for {what}"
    network = _network_reason(e)
    if network is not None:
        return f"cannot reach {hub}: {network}"
    if isinstance(e, OSError) and e.filename:
        return f"cannot write the model cache: {e.strerror or e} ({e.filename})"
    return f"download of {what} from {hub} failed: {_reason(e)}"


def _reason(e: BaseException) -> str:
    """The short cause of one failure: an HTTP status, a network reason, or its first line."""
    status = _status_code(e)
    if status is not None:
        return f"HTTP {status}"
    network = _network_reason(e)
    if network is not None:
        return network
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return re.sub(r"^\[E\d+\]\s*", "", line)  # the client's error-code prefix


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [cur.__cause__, cur.__context__]
        for arg in cur.args:  # requests wraps urllib3's MaxRetryError as an argument
            if isinstance(arg, BaseException):
                todo.append(arg)
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)


def _status_code(e: BaseException) -> int | None:
    for cur in _chain(e):
        status: Any = getattr(cur, "status_code", None)
        response = getattr(cur, "response", None)
        if status is None and response is not None:
            status = getattr(response, "status_code", None)
        if isinstance(status, int) and status >= 400:
            return status
    return None


# Substrings of socket and urllib3 error texts, most specific first.
_NETWORK_REASONS = (
    ("connection refused", "connection refused"),
    ("failed to resolve", "cannot resolve its host name"),
    ("name or service not known", "cannot resolve its host name"),
    ("nodename nor servname", "cannot resolve its host name"),
    ("temporary failure in name resolution", "cannot resolve its host name"),
    ("network is unreachable", "network is unreachable"),
    ("no route to host", "no route to host"),
    ("connection reset", "connection reset"),
    ("remote end closed", "connection closed by the server"),
)


def _network_reason(e: BaseException) -> str | None:
    """Why the hub could not be reached, or None when `e` is no network failure."""
    import socket
    import ssl

    import requests

    chain = list(_chain(e))
    text = " ".join(str(c) for c in chain).lower()
    for needle, reason in _NETWORK_REASONS:
        if needle in text:
            return reason
    if any(isinstance(c, socket.gaierror) for c in chain):  # whatever the resolver's wording
        return "cannot resolve its host name"
    if any(isinstance(c, (ssl.SSLError, requests.exceptions.SSLError)) for c in chain):
        return "TLS certificate not trusted" if "certificate" in text else "TLS handshake failed"
    if any(isinstance(c, (TimeoutError, requests.Timeout)) for c in chain):
        return "timed out"
    if any(isinstance(c, (ConnectionError, requests.ConnectionError)) for c in chain):
        return "connection failed"
    return None


# --- ids, paths, cache ------------------------------------------------------------
def _check_id(model_id: str) -> str:
    if not _MODEL_ID.fullmatch(model_id):
        raise ModelNotFoundError(
            f"{model_id!r} is neither a model folder nor a ModelScope model id (owner/name)")
    return model_id


def _looks_like_path(model: str, path: Path) -> bool:
    """Whether `model` was meant as a path, not an `owner/name` id."""
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        return True
    if path.exists():  # a file
        return True
    first = Path(model).parts[0] if Path(model).parts else ""
    return "/" in model and Path(first).is_dir()  # `models/ofa` where ./models exists


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """`cache_dir`, else $OFACLS_CACHE_DIR, else $MODELSCOPE_CACHE, else None (the client's default).

    Read on every call: the client reads MODELSCOPE_CACHE only once per process."""
    root = cache_dir or os.environ.get("OFACLS_CACHE_DIR") or os.environ.get("MODELSCOPE_CACHE")
    return str(Path(root).expanduser()) if root else None


def _older_layouts(model_id: str, root: str | None) -> list[Path]:
    """Where modelscope < 1.38 kept models, which the new client no longer looks at.

    (modelscope's own shim checks these too; we skip it to avoid importing torch.)"""
    base = Path(root) if root else Path.home() / ".cache" / "modelscope"
    owner, name = model_id.split("/")
    safe = name.replace(".", "___")  # how the old client spelled dots in folder names
    return [base / owner / name, base / owner / safe, base / "hub" / owner / name,
            base / "hub" / owner / safe, base / "models" / owner / name]
