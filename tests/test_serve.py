"""`ofacls serve`: the real server in a subprocess, driven over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import cli_env, run_cli, small_image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ofacls", "serve", "--model", str(model), "--device", "cpu",
             "--port", str(self.port), *args],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.communicate()[1]}")
            try:
                if request(self.base + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"server not ready within 60 s: {self.proc.communicate()[1]}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def multipart(name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return body + data + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("serve") / "cat.png")


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    srv = Server(model, "--max-body", "200000", "--max-pixels", "100000", "--max-wait-ms", "50",
                 "--max-batch", "8")
    yield srv
    code, err = srv.stop()
    assert code == 0, err


def classify(server: Server, data: bytes, query: str = "") -> tuple[int, dict[str, str], dict]:
    status, headers, body = request(f"{server.base}/v1/classify{query}", data,
                                    {"Content-Type": "application/octet-stream"})
    return status, headers, json.loads(body)


def assert_same(got: dict, want: dict) -> None:
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
    assert [t["index"] for t in got["top_k"]] == [t["index"] for t in want["top_k"]]
    for a, b in zip(got["top_k"], want["top_k"]):
        assert abs(a["score"] - b["score"]) < 1e-5
    assert got["label"] == want["label"] and got["error"] is None


@pytest.mark.parametrize("decode", ["exact", "beam"])
def test_answers_equal_predict_json(server: Server, model: Path, image: Path, decode: str) -> None:
    want = json.loads(run_cli(["predict", "--json", "--model", str(model), "--device", "cpu",
                               "--top-k", "3", "--decode", decode, str(image)],
                              env=cli_env()).stdout)
    status, _, raw = classify(server, image.read_bytes(), f"?top_k=3&decode={decode}")
    assert status == 200 and raw["input"] == "-"
    assert_same(raw, want)
    body, headers = multipart("cat.png", image.read_bytes())
    status, _, form = request(f"{server.base}/v1/classify?top_k=3&decode={decode}", body, headers)
    got = json.loads(form)
    assert status == 200 and got["input"] == "cat.png"
    assert_same(got, want)


def test_concurrent_clients_share_batches(server: Server, image: Path) -> None:
    data = image.read_bytes()
    first = classify(server, data)[2]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: classify(server, data), range(32)))
    assert all(status == 200 for status, _, _ in answers)
    for _, _, got in answers:
        assert_same(got, first)
    metrics = request(server.base + "/metrics")[2].decode()
    one = next(line for line in metrics.splitlines() if line.startswith('ofacls_batch_size_bucket{le="1"}'))
    count = next(line for line in metrics.splitlines() if line.startswith("ofacls_batch_size_count"))
    assert int(count.split()[1]) > int(one.split()[1]), "no batch held more than one image"
    assert 'ofacls_requests_total{endpoint="classify",status="200"}' in metrics
    assert "ofacls_queue_depth 0" in metrics


def test_errors(server: Server, image: Path, tmp_path: Path) -> None:
    data = image.read_bytes()
    for query in ("?top_k=0", "?top_k=x", "?top_k=101", "?decode=greedy"):
        status, _, body = classify(server, data, query)
        assert status == 400 and body["error"], query
    assert classify(server, b"")[0] == 400
    form, headers = multipart("x.png", b"")
    assert request(server.base + "/v1/classify", form.replace(b'name="file"', b'name="other"'),
                   headers)[0] == 400
    status, _, body = classify(server, b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000)
    assert status == 413 and "max-body" in body["error"]
    status, _, body = classify(server, b"%PDF-1.4 not an image")
    assert status == 415 and body["error"]
    status, _, body = classify(server, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert status == 422 and body["error"]
    big = small_image(tmp_path / "big.png", size=(400, 300))  # 120 000 pixels > --max-pixels
    status, _, body = classify(server, big.read_bytes())
    assert status == 422 and "max-pixels" in body["error"]
    status, _, raw = request(server.base + "/v1/classify", b'{"url": "http://127.0.0.1:1/x.png"}',
                             {"Content-Type": "application/json"})
    assert status == 400 and "--allow-urls" in json.loads(raw)["error"]
    assert json.loads(request(server.base + "/nowhere")[2])["error"]


def test_other_endpoints(server: Server) -> None:
    assert request(server.base + "/healthz")[0] == 200
    labels = json.loads(request(server.base + "/v1/labels")[2])["labels"]
    assert len(labels) == 1000 and labels[0]["index"] == 0
    doc = json.loads(request(server.base + "/openapi.json")[2])
    assert "/v1/classify" in doc["paths"]
    status, headers, page = request(server.base + "/")
    assert status == 200 and b"aria-live" in page and b"<script src" not in page


def test_queue_full_is_503(model: Path, image: Path) -> None:
    srv = Server(model, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0", "--quiet")
    try:
        data = image.read_bytes()
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: classify(srv, data), range(24)))
        statuses = [s for s, _, _ in answers]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        assert all(h.get("retry-after") for s, h, _ in answers if s == 503)
    finally:
        assert srv.stop()[0] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_answers_requests_in_flight(model: Path, image: Path, sig: int) -> None:
    srv = Server(model, "--max-wait-ms", "1500", "--max-batch", "64")
    data = image.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(classify, srv, data) for _ in range(8)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until all 8 wait in the queue
            metrics = request(srv.base + "/metrics")[2].decode()
            if "ofacls_queue_depth 8" in metrics:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("requests never queued")
        srv.proc.send_signal(sig)
        answers = [f.result() for f in futures]
    code, err = srv.stop()
    assert [s for s, _, _ in answers] == [200] * 8
    assert code == 0, err
    assert err.count("ofacls: POST /v1/classify 200 ") == 8


def test_unknown_model_exits_3(tmp_path: Path) -> None:
    port = str(free_port())
    result = subprocess.run([sys.executable, "-m", "ofacls", "serve", "--model", str(tmp_path / "none"),
                             "--offline", "--device", "cpu", "--port", port],
                            env=cli_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr


def _chromedriver() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


def test_page_in_a_headless_browser(server: Server, image: Path, tmp_path: Path) -> None:
    driver_path = _chromedriver()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver_path is None or browser is None:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                              options=options)
    try:
        driver.get(server.base + "/")
        driver.find_element(By.ID, "topk").clear()
        driver.find_element(By.ID, "topk").send_keys("3")
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li"))
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .label")]
        want = classify(server, image.read_bytes(), "?top_k=3")[2]
        assert shown == [t["label"] for t in want["top_k"]]
        shot = os.environ.get("OFACLS_SERVE_SCREENSHOT")
        if shot:
            driver.save_screenshot(shot)
    finally:
        driver.quit()


def test_without_the_extra_exits_2_naming_it() -> None:
    code = ("import sys; sys.modules['uvicorn'] = None; sys.argv = ['ofacls', 'serve']; "
            "from ofacls.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "pip install 'ofacls[serve]'" in result.stderr
