"""`ofacls serve` against hostile and careless clients: the real server in a
subprocess, raw sockets for what no HTTP library sends, local HTTP servers for URLs."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import small_image
from httpserver import HTTPTestServer, refused_url
from test_serve import Server, free_port, metric, multipart, request, wait_for

from ofacls.serve.guards import allowed_hosts
from ofacls.sources.fetch import REFUSED, UNREACHABLE

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return small_image(tmp_path_factory.mktemp("hostile") / "cat.png").read_bytes()


@pytest.fixture(scope="module")
def guarded(model: Path) -> Iterator[Server]:
    """A loopback server that also takes the name myname.test, with a short read deadline."""
    srv = Server(model, "--max-body", "200000", "--read-timeout", "2", "--allowed-hosts", "myname.test")
    yield srv
    code, err = srv.stop()
    assert code == 0, err
    assert "Traceback" not in err and " 500 " not in err, err


def connect(port: int, data: bytes = b"", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket times out)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def head(port: int, path: str = "/v1/classify", length: int | None = None, *, method: str = "POST",
         host: str | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {f'127.0.0.1:{port}' if host is None else host}",
             "Content-Type: application/octet-stream"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# --- memory ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_stalled_uploads_hold_at_most_the_body_budget(model: Path) -> None:
    max_body, max_queue, clients = 1_000_000, 4, 200
    srv = Server(model, "--max-body", str(max_body), "--max-queue", str(max_queue), "--quiet")
    socks: list[socket.socket] = []
    try:
        pid = srv.proc.pid
        idle = rss_kib(pid, "VmRSS")
        try:  # the peak from here on: model loading peaked higher than any of this should
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            peak_field = "VmHWM"
        except OSError:
            peak_field = "VmRSS"
        peak = idle
        part = b"\0" * (max_body * 9 // 10)
        for _ in range(clients):  # each announces a full body, sends most of it, then stalls
            sock = connect(srv.port, head(srv.port, length=max_body))
            sock.setblocking(False)
            try:
                sock.send(part)
            except OSError:  # refused already and closed, or the buffers are full
                pass
            socks.append(sock)
            peak = max(peak, rss_kib(pid, peak_field))

        def settled() -> bool:
            return (metric(srv, "ofacls_body_bytes") == max_queue * max_body
                    and metric(srv, 'ofacls_requests_total{endpoint="classify",status="503"}')
                    == clients - max_queue)
        wait_for(settled, "4 uploads held and the other 196 refused")
        peak = max(peak, rss_kib(pid, peak_field))
        grown_mib = (peak - idle) / 1024
        budget_mib = max_queue * max_body / 2**20
        # the budget, plus what 200 connections cost (about 25 KiB each: protocol, task, buffers)
        assert grown_mib < budget_mib + 12, f"grew {grown_mib:.0f} MiB for a {budget_mib:.1f} MiB budget"
        answers = []
        for sock in socks[-3:]:
            sock.setblocking(True)
            sock.settimeout(5)
            answers.append(sock.recv(4096))
        assert all(a.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in a.lower() for a in answers)
    finally:
        for sock in socks:
            sock.close()
        assert srv.stop()[0] == 0


# --- slow clients -----------------------------------------------------------------------


def test_images_being_decoded_count_against_the_queue(model: Path) -> None:
    """A request's images hold their places under --max-queue from the moment its
    body is read, not once decoded: while a slow decode runs, the queue is full and
    other clients get 503 at once rather than after waiting behind it."""
    import base64
    import io

    from PIL import Image

    flat = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 140, 200)).save(flat, "PNG")  # small file, slow decode
    big = base64.b64encode(flat.getvalue()).decode()
    body = json.dumps({"images": [{"base64": big}, {"base64": big}]}).encode()
    srv = Server(model, "--workers", "1", "--max-queue", "2", "--max-images", "2", "--quiet")
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(request, srv.base + "/v1/classify", body, {"Content-Type": "application/json"})

            def decoding() -> bool:
                """In one scrape: the body still held (its images being decoded), and
                their two places taken."""
                text = request(srv.base + "/metrics")[2].decode()
                return "ofacls_queue_depth 2\n" in text and "ofacls_body_bytes 0\n" not in text

            wait_for(decoding, "the images' places held while they decode")
            assert request(srv.base + "/v1/classify", flat.getvalue(),
                           {"Content-Type": "application/octet-stream"})[0] == 503
            assert slow.result()[0] == 200
    finally:
        assert srv.stop()[0] == 0


def test_slow_clients_are_cut_off(guarded: Server) -> None:
    port = guarded.port

    def idle() -> tuple[bytes, float]:
        start = time.monotonic()
        return read_until_closed(connect(port)), time.monotonic() - start

    def half_head() -> tuple[bytes, float]:
        sock = connect(port, b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        start = time.monotonic()
        return read_until_closed(sock), time.monotonic() - start

    def trickled(data: bytes, first: bytes = b"", *, after_answer: bool = False) -> tuple[bytes, float]:
        """Send `data` a byte every 0.3 s (until answered, or on after the answer too)."""
        sock = connect(port, first)
        start, got = time.monotonic(), b""
        try:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                if select.select([sock], [], [], 0.3)[0]:
                    chunk = sock.recv(65536)
                    got += chunk
                    if not chunk or not after_answer:
                        break
        except OSError:  # closed on us
            return got, time.monotonic() - start
        return got + read_until_closed(sock), time.monotonic() - start

    with ThreadPoolExecutor(5) as pool:
        runs = [pool.submit(idle), pool.submit(half_head),
                pool.submit(trickled, head(port) * 3),
                pool.submit(trickled, b"x" * 30, head(port, length=1000)),
                pool.submit(trickled, b"x" * 30, head(port, "/healthz", 1000, method="GET"),
                            after_answer=True)]
        (idle_got, idle_s), (half_got, half_s), (head_got, head_s), (body_got, body_s), \
            (unread_got, unread_s) = [r.result() for r in runs]
    assert idle_got == b"" and 1.5 < idle_s < 6
    assert half_got.startswith(b"HTTP/1.1 408 ") and half_s < 6
    assert head_got.startswith(b"HTTP/1.1 408 ") and head_s < 6
    assert body_got.startswith(b"HTTP/1.1 408 ") and b"connection: close" in body_got.lower()
    assert b"did not arrive within 2 s" in body_got and body_s < 6
    # answered at once; the rest of the body it did not need is then cut off as well
    assert unread_got.startswith(b"HTTP/1.1 200 ") and unread_s < 6
    assert metric(guarded, "ofacls_read_timeouts_total") >= 3
    assert metric(guarded, 'ofacls_requests_total{endpoint="classify",status="408"}') == 1


def test_stop_with_stalled_clients_drains_within_the_graceful_timeout(model: Path, image: bytes) -> None:
    srv = Server(model, "--graceful-timeout", "2")
    stalled = connect(srv.port, head(srv.port, length=100_000) + b"\x89PNG")
    half = connect(srv.port, b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        wait_for(lambda: metric(srv, "ofacls_body_bytes") == 100_000, "the upload under way")
        srv.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        wait_for(lambda: srv.said("stopping: requests in flight"),
                 "the first SIGTERM heard")
        srv.proc.send_signal(signal.SIGTERM)  # a second one changes nothing: still a bounded drain
        code, err = srv.stop()
        took = time.monotonic() - start
        assert code == 0, err
        assert took < 2 + 5, f"stopped after {took:.1f} s"
        assert "Traceback" not in err
        stalled.settimeout(5)
        assert read_until_closed(stalled).startswith(b"HTTP/1.1 503 ")
        assert "POST /v1/classify 503 " in err
    finally:
        stalled.close()
        half.close()


def test_a_second_ctrl_c_answers_requests_in_flight_503_now(model: Path) -> None:
    srv = Server(model, "--graceful-timeout", "60")
    stalled = connect(srv.port, head(srv.port, length=100_000) + b"\x89PNG")
    try:
        wait_for(lambda: metric(srv, "ofacls_body_bytes") == 100_000, "the upload under way")
        srv.proc.send_signal(signal.SIGINT)
        wait_for(lambda: srv.said("stopping: requests in flight"),
                 "the first Ctrl-C heard")
        assert srv.proc.poll() is None  # waiting for the upload, up to --graceful-timeout
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        code, err = srv.stop()
        assert code == 0, err
        assert time.monotonic() - start < 5
        assert "Traceback" not in err and "CancelledError" not in err, err
        stalled.settimeout(5)
        assert read_until_closed(stalled).startswith(b"HTTP/1.1 503 ")
        assert "POST /v1/classify 503 " in err and err.count("stopping") == 2
    finally:
        stalled.close()


# --- bodies ---------------------------------------------------------------------------


def test_malformed_json_of_any_depth_is_400(guarded: Server) -> None:
    for body in (b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b'{"url": ' + b"{" * 100_000,
                 b'{"url": "http://x/"', b"\xff\xfe"):
        status, _, answer = request(guarded.base + "/v1/classify", body, {"Content-Type": "application/json"})
        assert status == 400, body[:20]
        assert json.loads(answer)["error"]


def test_a_client_leaving_mid_upload_is_499_not_500(guarded: Server) -> None:
    sock = connect(guarded.port, head(guarded.port, length=100_000) + b"\x89PNG\r\n\x1a\n")
    wait_for(lambda: metric(guarded, "ofacls_body_bytes") == 100_000, "the upload under way")
    sock.close()
    wait_for(lambda: metric(guarded, 'ofacls_requests_total{endpoint="classify",status="499"}') == 1,
             "the request counted as the client's")
    assert metric(guarded, "ofacls_body_bytes") == 0
    # no 500 and no traceback: checked on the server's log when the fixture stops it


def test_a_client_leaving_while_its_image_waits_costs_no_model_time(model: Path, image: bytes) -> None:
    """Gone with its whole request sent, while the batch waits for company: counted as
    499 at once, and its image leaves the batch (no model call for it)."""
    srv = Server(model, "--max-wait-ms", "3000", "--max-batch", "8")
    try:
        sock = connect(srv.port, head(srv.port, length=len(image)) + image)
        wait_for(lambda: metric(srv, "ofacls_queue_depth") == 1, "the image queued")
        sock.close()
        gone = 'ofacls_requests_total{endpoint="classify",status="499"}'
        wait_for(lambda: metric(srv, gone) == 1, "the request counted as the client's")
        wait_for(lambda: metric(srv, "ofacls_queue_depth") == 0, "the batch done")
        assert metric(srv, "ofacls_batch_size_count") == 0
    finally:
        code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err


def test_one_byte_writes_do_not_stall_other_requests(model: Path, image: bytes) -> None:
    srv = Server(model, "--quiet")
    body = image + b"\0" * (1_000_000 - len(image))  # PIL ignores what follows the image
    sender = ("import socket, sys\n"
              "port, body = int(sys.argv[1]), sys.stdin.buffer.read()\n"
              "s = socket.create_connection(('127.0.0.1', port))\n"
              "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
              f"s.sendall({head(srv.port, length=len(body))!r})\n"
              "for i in range(len(body)):\n"
              "    s.send(body[i:i + 1])\n"
              "sys.stdout.buffer.write(s.recv(65536))\n")
    try:
        # a process of its own, so its loop does not compete with the polling below for the GIL
        proc = subprocess.Popen([sys.executable, "-c", sender, str(srv.port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(body)
        proc.stdin.close()
        slowest, polls = 0.0, 0
        while proc.poll() is None:
            start = time.monotonic()
            assert request(srv.base + "/healthz")[0] == 200
            slowest = max(slowest, time.monotonic() - start)
            polls += 1
            time.sleep(0.02)
        answer = proc.stdout.read()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert polls > 20 and slowest < 2, f"/healthz took up to {slowest:.2f} s"  # the flood lasts longer
    finally:
        assert srv.stop()[0] == 0


# --- Host and Origin --------------------------------------------------------------------


def exchange(port: int, data: bytes) -> bytes:
    sock = connect(port, data)
    sock.shutdown(socket.SHUT_WR)
    return read_until_closed(sock)


def test_host_must_name_this_service(guarded: Server) -> None:
    port = guarded.port
    ok = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "myname.test:80"]
    for host in ok:
        got = exchange(port, head(port, "/healthz", method="GET", host=host, extra="Connection: close\r\n"))
        assert got.startswith(b"HTTP/1.1 200 "), host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "sub.myname.test", ""):
        got = exchange(port, head(port, "/healthz", method="GET", host=host))
        assert got.startswith(b"HTTP/1.1 400 "), host
    assert exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # no Host


def test_other_sites_pages_are_refused(guarded: Server, image: bytes) -> None:
    url = guarded.base + "/v1/classify"
    ctype = {"Content-Type": "application/octet-stream"}
    own = {"Origin": guarded.base, **ctype}
    assert request(url, image, own)[0] == 200  # the service's own page
    assert request(url, image, {"Origin": f"https://127.0.0.1:{guarded.port}", **ctype})[0] == 200
    for origin in ("http://evil.example", f"http://evil.example:{guarded.port}", "null",
                   f"http://127.0.0.1:{free_port()}", f"http://localhost:{guarded.port}", "garbage"):
        status, _, body = request(url, image, {"Origin": origin, **ctype})
        assert status == 403 and json.loads(body)["error"], origin
    body, headers = multipart("cat.png", image)  # what a form on another site posts
    assert request(url, body, {"Origin": "http://evil.example", **headers})[0] == 403
    assert request(guarded.base + "/v1/labels", None, {"Origin": "http://evil.example"})[0] == 403


def test_allowed_hosts_by_listening_address() -> None:
    assert allowed_hosts("127.0.0.1", []) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("127.0.0.2", []) == ["localhost", "127.0.0.1", "[::1]", "127.0.0.2"]
    assert allowed_hosts("::1", ["a.test"])[-2:] == ["[::1]", "a.test"]
    assert allowed_hosts("192.0.2.7", []) == ["192.0.2.7"]
    assert allowed_hosts("0.0.0.0", []) == ["*"]  # every interface: exposure was chosen
    assert allowed_hosts("::", ["*.example.com"]) == ["localhost", "127.0.0.1", "[::1]", "*.example.com"]


def test_a_bad_allowed_hosts_pattern_exits_2(model: Path) -> None:
    from cli_helpers import cli_env

    result = subprocess.run([sys.executable, "-m", "ofacls", "serve", "--model", str(model), "--device",
                             "cpu", "--port", "0", "--allowed-hosts", "a.*.test"],
                            env=cli_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--allowed-hosts" in result.stderr


# --- URLs -----------------------------------------------------------------------------


def url_answer(srv: Server, url: str, *, as_json: bool) -> tuple[int, dict]:
    if as_json:
        status, _, body = request(srv.base + "/v1/classify", json.dumps({"url": url}).encode(),
                                  {"Content-Type": "application/json"})
    else:
        from urllib.parse import quote

        status, _, body = request(srv.base + "/v1/classify?url=" + quote(url, safe=""), b"",
                                  {"Content-Type": "application/octet-stream"})
    return status, json.loads(body)


def test_urls_to_private_addresses_are_refused(model: Path, image: bytes) -> None:
    with HTTPTestServer() as internal:
        internal.serve("/secret.png", image, content_type="image/png")
        port = internal.port
        srv = Server(model, "--allow-urls")
        try:
            urls = [f"http://127.0.0.1:{port}/secret.png", f"http://localhost:{port}/secret.png",
                    f"http://2130706433:{port}/secret.png", f"http://0x7f.1:{port}/secret.png",
                    f"http://127.1:{port}/secret.png", f"http://0177.0.0.1:{port}/secret.png",
                    f"http://[::ffff:127.0.0.1]:{port}/secret.png", f"http://[::1]:{port}/secret.png",
                    f"http://0.0.0.0:{port}/secret.png", f"http://user:hunter2@127.0.0.1:{port}/secret.png",
                    refused_url()]
            errors = set()
            for i, url in enumerate(urls):
                status, body = url_answer(srv, url, as_json=bool(i % 2))
                assert status == 422, (url, body)
                assert "hunter2" not in body["error"] and str(port) not in body["error"], body
                errors.add(body["error"])
            # one line for all of them: nothing tells an open port from a closed one
            assert errors <= {REFUSED, UNREACHABLE} and len(errors) == 1, errors
        finally:
            assert srv.stop()[0] == 0
        assert internal.requests == []


def test_downloaded_images_count_in_the_memory_budget(model: Path) -> None:
    """Fetched bytes are held like uploaded ones until decoded: under a budget of
    2 x 100 kB, one request's two 150 kB downloads do not both fit."""
    import io
    import random

    from PIL import Image

    noise = io.BytesIO()
    rng = random.Random(0)
    Image.frombytes("RGB", (250, 200), rng.randbytes(250 * 200 * 3)).save(noise, "PNG")
    assert 140_000 < len(noise.getvalue()) < 190_000
    with HTTPTestServer() as internal:
        url = internal.serve("/noise.png", noise.getvalue(), content_type="image/png")
        srv = Server(model, "--allow-urls", "--allow-private-urls", "--max-body", "100000",
                     "--max-queue", "2", "--quiet")
        try:
            status, _, raw = request(srv.base + "/v1/classify", json.dumps({"images": [
                {"url": url}, {"url": url}]}).encode(), {"Content-Type": "application/json"})
            assert status == 200
            errors = sorted(str(r["error"]) for r in json.loads(raw)["results"])
            assert errors == ["None", "too many images being read or decoded; retry shortly"]
            assert url_answer(srv, url, as_json=True)[0] == 200  # alone, it fits
        finally:
            assert srv.stop()[0] == 0


def test_private_urls_when_allowed_and_credentials_never_echoed(model: Path, image: bytes) -> None:
    with HTTPTestServer() as internal:
        internal.serve("/cat.png", image, content_type="image/png")
        internal.serve("/missing.png", b"", status=404)
        for path in ("/slow1", "/slow2", "/slow3", "/slow4", "/slow5"):
            internal.hang(path)
        srv = Server(model, "--allow-urls", "--allow-private-urls", "--workers", "2", "--timeout", "30")
        try:
            url = internal.url("/cat.png").replace("http://", "http://user:hunter2@")
            status, body = url_answer(srv, url, as_json=True)
            assert status == 200 and body["input"] == internal.url("/cat.png").replace("://", "://***@")
            assert internal.received[-1][1].get("Authorization")  # sent to the host, never shown
            status, body = url_answer(srv, internal.url("/missing.png").replace("://", "://u:hunter2@"),
                                      as_json=False)
            assert status == 422 and "hunter2" not in body["error"]
            # several URLs: each fetched, in order, a failed one its own entry
            status, _, raw = request(srv.base + "/v1/classify", json.dumps({"images": [
                {"url": url}, {"url": internal.url("/missing.png")}, {"url": url}]}).encode(),
                {"Content-Type": "application/json"})
            first, missing, last = json.loads(raw)["results"]
            assert status == 200 and first["error"] is None and last["label"] == first["label"]
            assert first["input"] == internal.url("/cat.png").replace("://", "://***@")
            assert missing["error"] and missing["top_k"] == []
            # a lone surrogate (valid JSON, no valid text) fails its own image, not the request
            odd = internal.url("/\ud800.png")
            status, _, raw = request(srv.base + "/v1/classify", json.dumps({"images": [
                {"url": url}, {"url": odd}]}).encode(), {"Content-Type": "application/json"})
            first, bad = json.loads(raw)["results"]
            assert status == 200 and first["error"] is None
            assert bad["input"] == odd.replace("\ud800", "\\ud800") and bad["error"]

            # URLs that never answer hold the fetch threads (2 running, 2 waiting), not uploads
            with ThreadPoolExecutor(4) as pool:
                hanging = [pool.submit(url_answer, srv, internal.url(f"/slow{i}"), as_json=True)
                           for i in range(1, 5)]
                wait_for(lambda: sum(p.startswith("/slow") for p in internal.requests) == 2,
                         "two fetches under way")
                wait_for(lambda: metric(srv, "ofacls_url_fetches") == 4, "two more waiting")
                start = time.monotonic()
                status, _, answer = request(srv.base + "/v1/classify", image,
                                            {"Content-Type": "application/octet-stream"})
                assert status == 200 and time.monotonic() - start < 5
                status, body = url_answer(srv, internal.url("/slow5"), as_json=True)
                assert status == 503 and body["error"]
                internal.stop()  # lets the hanging fetches end
                assert all(h.result()[0] == 422 for h in hanging)
        finally:
            code, err = srv.stop()
            assert code == 0, err
        assert "hunter2" not in err
