"""`ofacls serve`: the classifier over HTTP (ofacls.serve)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ofacls.cli.app import app
from ofacls.cli.feedback import err, one_line_errors, quiet_decoders
from ofacls.cli.options import RunSettings, classifying, load_calibration, load_classifier, size_option
from ofacls.errors import UsageError

if TYPE_CHECKING:
    from ofacls.classifier import Classifier


@app.command()
@classifying
def serve(
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="TCP port.")] = 8000,
    max_batch: Annotated[Optional[int], typer.Option(
        "--max-batch", min=1, max=4096, metavar="N", show_default=False,
        help="Most images per model call.  [default: --batch-size, else 4 on CPU, 32 on a GPU]")] = None,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0, max=10000, metavar="MS",
        help="How long a request waits for others to share its model call.")] = 10.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, metavar="N",
        help="Images waiting for the model, or being fetched and decoded for it, beyond which "
             "503 is answered.")] = 64,
    max_body: Annotated[int, size_option(
        "--max-body", default=20 * 2**20, most=2**34,
        help="Refuse request bodies larger than this; all bodies being read or decoded hold at most "
             "--max-queue times this (503 beyond)")] = 20 * 2**20,
    max_images: Annotated[Optional[int], typer.Option(
        "--max-images", min=1, max=4096, metavar="N", show_default=False,
        help="Most images in one request (repeated multipart 'file' parts or a JSON 'images' list).  "
             "[default: 32, or --max-queue if lower]")] = None,
    allow_urls: Annotated[bool, typer.Option(
        "--allow-urls", help='Let clients name an http(s) image to fetch ({"url": ...} or ?url=).')] = False,
    allow_private_urls: Annotated[bool, typer.Option(
        "--allow-private-urls",
        help="With --allow-urls: let URLs reach loopback, private and link-local addresses too.")] = False,
    allowed_hosts: Annotated[str, typer.Option(
        "--allowed-hosts", metavar="NAMES", show_default=False,
        help="Comma-separated Host names to accept besides the listening address (*.example.com: "
             "its subdomains; *: any).  [default: the address's own; with 0.0.0.0 or ::, any]")] = "",
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", min=0.1, max=3600, metavar="S",
        help="Seconds a client has to send a request's headers, and then its body (408 after).")] = 60.0,
    graceful_timeout: Annotated[int, typer.Option(
        "--graceful-timeout", min=0, max=3600, metavar="S",
        help="On SIGTERM or Ctrl-C, seconds to finish requests in flight before dropping them.")] = 30,
    *,
    run: RunSettings,
) -> None:
    """Serve the classifier over HTTP: POST /v1/classify, a page to try it at /, /metrics.

    Stops gracefully on SIGTERM or Ctrl-C (requests in flight are answered; a second
    Ctrl-C answers them 503 at once). Needs pip install 'ofacls[serve]'.

    Examples:

      ofacls serve                                  # http://127.0.0.1:8000

      curl --data-binary @cat.jpg 'http://127.0.0.1:8000/v1/classify?top_k=3'

      curl -F file=@cat.jpg -F file=@dog.jpg http://127.0.0.1:8000/v1/classify

      ofacls serve --host 0.0.0.0 --port 8080 --max-body 50MiB --allow-urls
    """
    with one_line_errors():
        from ofacls.serve import require_serve

        require_serve()
        from ofacls.serve.app import ServeSettings
        from ofacls.serve.app import serve as run_server

        quiet_decoders()
        if max_images is None:
            max_images = min(32, max_queue)
        elif max_images > max_queue:
            raise UsageError(f"--max-images {max_images} is more than --max-queue {max_queue}: "
                             "such a request could never be queued")
        # before the port is bound: a typo in --model fails here, not after "serving on"
        folder, name = _model_folder(run)
        calibration = None
        if run.calibration is not None:  # read before the port is bound; checked once loaded
            from ofacls.calibration import Calibration

            calibration = Calibration.load(run.calibration)
            calibration.check_decode(run.decode.value)
        if host in ("0.0.0.0", "::"):
            err(f"warning: listening on {host} makes the service reachable from other machines")
        if allow_private_urls and not allow_urls:
            err("warning: --allow-private-urls does nothing without --allow-urls")
        settings = ServeSettings(host=host, port=port, max_batch=max_batch or run.batch_size,
                                 max_wait=max_wait_ms / 1000, max_queue=max_queue, max_body=max_body,
                                 max_images=max_images, model=name,
                                 top_k=run.top_k, decode=run.decode.value,
                                 workers=run.workers, allow_urls=allow_urls,
                                 allow_private_urls=allow_private_urls, timeout=run.timeout,
                                 max_download=run.max_download, read_timeout=read_timeout,
                                 graceful_timeout=graceful_timeout,
                                 allowed_hosts=tuple(filter(None, map(str.strip, allowed_hosts.split(",")))),
                                 quiet=run.quiet, calibration=calibration)

        def load() -> Classifier:
            clf = load_classifier(dataclasses.replace(run, model=str(folder)))
            load_calibration(run, clf)  # its settings against the model as the user named it
            return clf

        run_server(load, settings)


def _model_folder(run: RunSettings) -> tuple[Path, str]:
    """The model's local folder (downloaded first if it must be) and the name the service
    shows for it: the id, or a folder's own name (its path stays on the server)."""
    from ofacls.hub import env_offline, resolve_model
    from ofacls.model.folder import ModelFolder

    path = resolve_model(run.model, offline=run.offline or env_offline(), cache_dir=run.cache_dir,
                         progress=not run.quiet and sys.stderr.isatty())
    folder = ModelFolder.open(path)
    folder.config  # noqa: B018 -- parsed now: a folder with a broken config.json fails before binding
    name = Path(run.model).expanduser().name if Path(run.model).expanduser().is_dir() else run.model
    return folder.path, name
