"""`ofacls serve`: the classifier over HTTP (ofacls.serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ofacls.cli.app import app
from ofacls.cli.feedback import err, one_line_errors, quiet_decoders
from ofacls.cli.options import RunSettings, classifying, load_classifier


@app.command()
@classifying
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[Optional[int], typer.Option(
        "--max-batch", min=1, max=4096, metavar="N", show_default=False,
        help="Most requests per model call.  [default: --batch-size, else 4 on CPU, 32 on a GPU]")] = None,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0, max=10000, metavar="MS",
        help="How long a request waits for others to share its model call.")] = 10.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, metavar="N",
        help="Requests waiting for the model beyond which 503 is answered.")] = 64,
    max_body: Annotated[int, typer.Option(
        "--max-body", min=1, max=2**34, metavar="BYTES",
        help="Refuse request bodies larger than this; all bodies being read or decoded hold at most "
             "--max-queue times this (503 beyond).")
    ] = 20 * 2**20,
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

    Stops gracefully on SIGTERM or Ctrl-C (requests in flight are answered). Needs
    pip install 'ofacls[serve]'.
    """
    with one_line_errors():
        from ofacls.serve import require_serve

        require_serve()
        from ofacls.serve.app import ServeSettings
        from ofacls.serve.app import serve as run_server

        quiet_decoders()
        if host in ("0.0.0.0", "::"):
            err(f"warning: listening on {host} makes the service reachable from other machines")
        if allow_private_urls and not allow_urls:
            err("warning: --allow-private-urls does nothing without --allow-urls")
        settings = ServeSettings(host=host, port=port, max_batch=max_batch or run.batch_size,
                                 max_wait=max_wait_ms / 1000, max_queue=max_queue, max_body=max_body,
                                 top_k=run.top_k, decode=run.decode.value,
                                 workers=run.workers, allow_urls=allow_urls,
                                 allow_private_urls=allow_private_urls, timeout=run.timeout,
                                 max_download=run.max_download, read_timeout=read_timeout,
                                 graceful_timeout=graceful_timeout,
                                 allowed_hosts=tuple(filter(None, map(str.strip, allowed_hosts.split(",")))),
                                 quiet=run.quiet)
        run_server(lambda: load_classifier(run), settings)
