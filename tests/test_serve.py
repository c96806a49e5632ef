"""`ofacls serve`: the real server in a subprocess, driven over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cli_helpers import cli_env, run_cli, small_image

if TYPE_CHECKING:
    import torch

    from ofacls import Classifier

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ofacls serve` on a port the kernel picks (read from its "serving on" line, so
    no other process can take it in between), its stderr read as it comes (a full
    pipe would stall it), ready once /readyz says so."""

    def __init__(self, model: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ofacls", "serve", "--model", str(model), "--device", "cpu",
             "--port", "0", *args],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        bound = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving on http://" in line:
                    bound.set()
            bound.set()  # it exited

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        bound.wait(60)
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", "".join(self.lines))
        if found is None:
            self.proc.kill()
            raise AssertionError(f"server not listening: {self.stop()[1]}")
        self.port = int(found.group(1))
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.stop()[1]}")
            try:
                if request(self.base + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"server not ready within 60 s: {self.stop()[1]}")

    def said(self, text: str) -> bool:
        """Whether a line of its stderr so far holds `text`."""
        return any(text in line for line in self.lines)

    def stop(self) -> tuple[int, str]:
        """SIGTERM unless it has exited, then its exit code and whole stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=60)
        return self.proc.returncode, "".join(self.lines)


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def multipart(name: str, data: bytes, *more: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body with a `file` part per (name, data), in order."""
    boundary = uuid.uuid4().hex
    body = b""
    for part_name, part in ((name, data), *more):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"{part_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        body += part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("serve") / "cat.png")


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    srv = Server(model, "--max-body", "200kB", "--max-pixels", "100000", "--max-wait-ms", "50",
                 "--max-batch", "8", "--max-images", "4")
    yield srv
    code, err = srv.stop()
    assert code == 0, err


def classify(server: Server, data: bytes, query: str = "") -> tuple[int, dict[str, str], dict]:
    status, headers, body = request(f"{server.base}/v1/classify{query}", data,
                                    {"Content-Type": "application/octet-stream"})
    return status, headers, json.loads(body)


OK_CLASSIFY = 'ofacls_requests_total{endpoint="classify",status="200"}'


def metric(srv: Server, name: str) -> float:
    """A metric's value (0 if absent); `name` with its labels, if it has any."""
    text = request(srv.base + "/metrics")[2].decode()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")
              or line == name]
    return float(values[0]) if values else 0.0


@pytest.fixture(scope="module")
def in_process(model: Path, image: Path) -> tuple[Classifier, torch.Tensor]:
    """The model loaded here, and the test image's pixels: for a Batcher of our own."""
    from ofacls import Classifier

    clf = Classifier.from_pretrained(model)
    return clf, clf.pixels(image)


def test_each_model_call_of_a_batch_is_one_batch_size_observation(
        in_process: tuple[Classifier, torch.Tensor]) -> None:
    """Requests that meet in one batch but decode differently run as separate model
    calls: ofacls_batch_size sees each call."""
    import asyncio

    from ofacls.serve.batching import Batcher

    clf, pixels = in_process
    calls: list[int] = []

    async def run() -> None:
        batcher = Batcher(clf.predict_pixels, max_batch=3, max_wait=30.0, max_queue=3,
                          on_batch=calls.append)
        batcher.start()
        futures = [*batcher.submit_all([(pixels, "a"), (pixels, "b")], 1, "exact"),
                   *batcher.submit_all([(pixels, "c")], 1, "beam")]  # the third: it runs now
        await asyncio.wait_for(asyncio.gather(*futures), 60)
        await batcher.stop()

    asyncio.run(run())
    assert calls == [2, 1]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


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
    # a wrong method classifies nothing: counted as a request, not in the classify latency
    def latency_count() -> int:
        text = request(server.base + "/metrics")[2].decode()
        return int(next(ln for ln in text.splitlines()
                        if ln.startswith("ofacls_request_duration_seconds_count")).split()[1])

    before = latency_count()
    assert request(server.base + "/v1/classify", method="GET")[0] == 405
    assert latency_count() == before


def test_errors(server: Server, image: Path, tmp_path: Path) -> None:
    data = image.read_bytes()
    for query in ("?top_k=0", "?top_k=x", "?top_k=101", "?decode=greedy"):
        status, _, body = classify(server, data, query)
        assert status == 400 and body["error"], query
    # a misspelt or repeated parameter is named, never answered with the default
    for query, named in (("?topk=1", "'topk'"), ("?top_k=1&colour=red", "'colour'"),
                         ("?top_k=1&top_k=2", "'top_k'")):
        status, _, body = classify(server, data, query)
        assert status == 400 and named in body["error"], query
    assert classify(server, b"")[0] == 400
    form, headers = multipart("x.png", b"")
    assert request(server.base + "/v1/classify", form.replace(b'name="file"', b'name="other"'),
                   headers)[0] == 400
    status, _, body = classify(server, b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000)
    assert status == 413 and "max-body" in body["error"]
    status, _, body = classify(server, b"%PDF-1.4 not an image")
    assert status == 415 and body["error"]
    status, _, body = classify(server, b"plain text, no image")
    assert status == 415 and body["error"].startswith("not an image (ofacls reads JPEG")
    status, _, body = classify(server, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert status == 422 and body["error"] and "PIL" not in body["error"]
    big = small_image(tmp_path / "big.png", size=(400, 300))  # 120 000 pixels > --max-pixels
    status, _, body = classify(server, big.read_bytes())
    assert status == 422 and "max-pixels" in body["error"]
    status, _, raw = request(server.base + "/v1/classify", b'{"url": "http://127.0.0.1:1/x.png"}',
                             {"Content-Type": "application/json"})
    assert status == 400 and "--allow-urls" in json.loads(raw)["error"]
    status, _, body = classify(server, data, "?url=http://127.0.0.1:1/x.png")  # a URL and a body
    assert status == 400 and "no body" in body["error"]
    assert json.loads(request(server.base + "/nowhere")[2])["error"]


def post_json(server: Server, doc: object, query: str = "") -> tuple[int, dict]:
    status, _, body = request(f"{server.base}/v1/classify{query}", json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_several_images_answered_in_order(server: Server, image: Path) -> None:
    data = image.read_bytes()
    want = classify(server, data, "?top_k=2")[2]
    body, headers = multipart("a.png", data, ("notes.txt", b"not an image"), ("c.png", data))
    status, _, raw = request(f"{server.base}/v1/classify?top_k=2", body, headers)
    results = json.loads(raw)["results"]
    assert status == 200 and [r["input"] for r in results] == ["a.png", "notes.txt", "c.png"]
    assert_same(results[0], want)
    assert_same(results[2], want)
    assert results[1]["error"].startswith("not an image") and results[1]["top_k"] == []
    assert results[1]["label"] is None and results[1]["score"] is None

    b64 = base64.b64encode(data).decode()
    status, got = post_json(server, {"images": [{"base64": b64}, {"base64": "!!"},
                                                {"url": "http://127.0.0.1:1/x.png"}, {"base64": b64}]},
                            "?top_k=2")
    assert status == 200 and len(got["results"]) == 4
    first, bad, url, last = got["results"]
    assert_same(first, want)
    assert_same(last, want)
    assert "base64" in bad["error"] and "--allow-urls" in url["error"]
    status, got = post_json(server, {"images": [{"base64": b64}]}, "?top_k=2")  # a list, even of one
    assert status == 200 and len(got["results"]) == 1
    assert_same(got["results"][0], want)

    # one `file` part: the single answer, as before
    body, headers = multipart("a.png", data)
    assert "results" not in json.loads(request(f"{server.base}/v1/classify", body, headers)[2])
    # more than --max-images (4): the whole request is refused, naming the option
    body, headers = multipart("a.png", data, *[(f"{i}.png", data) for i in range(4)])
    status, _, raw = request(f"{server.base}/v1/classify", body, headers)
    assert status == 413 and "--max-images" in json.loads(raw)["error"]
    status, got = post_json(server, {"images": [{"base64": b64}] * 5})
    assert status == 413 and "--max-images" in got["error"]
    for doc, named in (({"images": []}, "images"), ({"images": [{"b64": b64}]}, "'b64'"),
                       ({"images": [b64]}, "images[0]"), ({"url": "x", "images": []}, "a JSON body"),
                       ({"image": [{"base64": b64}]}, "'image'")):
        status, got = post_json(server, doc)
        assert status == 400 and named in got["error"], doc
    body, headers = multipart("a.png", data)
    body = body.replace(b'name="file"', b'name="picture"')
    status, _, raw = request(f"{server.base}/v1/classify", body, headers)
    assert status == 400 and "'picture'" in json.loads(raw)["error"]


def test_other_endpoints(server: Server) -> None:
    assert request(server.base + "/healthz")[0] == 200
    labels = json.loads(request(server.base + "/v1/labels")[2])["labels"]
    assert len(labels) == 1000 and labels[0]["index"] == 0
    doc = json.loads(request(server.base + "/openapi.json")[2])
    assert "/v1/classify" in doc["paths"] and "/v1/info" in doc["paths"]
    info = json.loads(request(server.base + "/v1/info")[2])
    assert info == {"model": "tiny", "ready": True, "top_k": 5, "decode": "exact", "max_images": 4,
                    "calibration": None}
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


def test_a_batch_being_collected_counts_against_the_queue(
        in_process: tuple[Classifier, torch.Tensor], image: Path) -> None:
    """Requests the batcher holds while it waits --max-wait-ms for more are still
    queued: they count against --max-queue (and in the queue-depth metric)."""
    import asyncio

    from ofacls.serve.batching import Batcher, QueueFull

    clf, pixels = in_process

    async def run() -> list[str | None]:
        batcher = Batcher(clf.predict_pixels, max_batch=3, max_wait=30.0, max_queue=3)
        batcher.start()
        waiting = batcher.submit_all([(pixels, "a"), (pixels, "b")], 1, "exact")
        await asyncio.sleep(0.2)  # the batcher takes both and waits for a third
        assert batcher.depth == 2
        with pytest.raises(QueueFull):
            batcher.submit_all([(pixels, "c"), (pixels, "d")], 1, "exact")
        third = batcher.submit_all([(pixels, "c")], 1, "exact")  # fills the batch: it runs now
        answers = await asyncio.wait_for(asyncio.gather(*waiting, *third), 60)
        await batcher.stop()
        return [p.label for p in answers]

    labels = asyncio.run(run())
    assert labels == [clf.classify(image, top_k=1)[0].label] * 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_answers_requests_in_flight(model: Path, image: Path, sig: int) -> None:
    srv = Server(model, "--max-wait-ms", "1500", "--max-batch", "64")
    data = image.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(classify, srv, data) for _ in range(8)]
        # the signal comes while the batch still waits for more: a stop finishes it too
        wait_for(lambda: metric(srv, "ofacls_queue_depth") == 8, "the 8 requests queued")
        srv.proc.send_signal(sig)
        answers = [f.result() for f in futures]
    code, err = srv.stop()
    assert [s for s, _, _ in answers] == [200] * 8
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "POST /v1/classify" in ln]
    access = re.compile(r"ofacls: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1:\d+ "
                        r"POST /v1/classify 200 \d+\.\d ms")
    assert len(lines) == 8 and all(access.fullmatch(ln) for ln in lines), lines
    assert "Traceback" not in err and err.count("stopping") == 1


def test_unknown_model_exits_3_before_binding(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for model in (str(tmp_path / "none"), str(tmp_path / "empty"), "nobody/no-such-model"):
        port = free_port()
        with socket.socket() as taken:  # the port is taken: a bind would fail with exit 2
            taken.bind(("127.0.0.1", port))
            result = subprocess.run([sys.executable, "-m", "ofacls", "serve", "--model", model,
                                     "--offline", "--device", "cpu", "--port", str(port)],
                                    env=cli_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, result.stderr
        assert "serving" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def _chromedriver() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


@contextlib.contextmanager
def headless_chromium(tmp_path: Path) -> Iterator[Any]:
    """A selenium driver on headless Chromium; the test is skipped where there is none."""
    driver_path = _chromedriver()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver_path is None or browser is None:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_in_a_headless_browser(server: Server, image: Path, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def shown(driver: Any) -> tuple[list[str], list[str]]:
        return ([e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .label")],
                [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .score")])

    def labels(answer: dict) -> list[str]:
        return [t["label"] for t in answer["top_k"]]

    def settled(driver: Any, want: list[str]) -> tuple[list[str], list[str]] | None:
        """The results shown, once they are `want` (None while the page redraws them)."""
        try:
            names, scores = shown(driver)
        except StaleElementReferenceException:
            return None
        return (names, scores) if names == want and len(scores) == len(want) else None

    with headless_chromium(tmp_path) as driver:
        driver.get(server.base + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")  # the model, named
        topk = driver.find_element(By.ID, "topk")
        topk.clear()
        topk.send_keys("3")
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: len(shown(d)[0]) == 3)
        names, scores = shown(driver)
        want = classify(server, image.read_bytes(), "?top_k=3")[2]
        assert names == labels(want)
        # exact search: probabilities, as percentages that sum to at most 100
        assert all(s.endswith("%") for s in scores) and sum(float(s[:-1]) for s in scores) <= 100.05
        assert driver.find_element(By.ID, "preview").is_displayed()
        shot = os.environ.get("OFACLS_SERVE_SCREENSHOT")
        if shot:
            driver.save_screenshot(shot)

        topk.send_keys("\b2")  # a new k reruns it, with no new pick of the file
        assert wait.until(lambda d: settled(d, labels(want)[:2]))

        Select(driver.find_element(By.ID, "decode")).select_by_value("beam")
        beam = classify(server, image.read_bytes(), "?top_k=2&decode=beam")[2]
        wait.until(lambda d: "log-probability per token" in d.find_element(By.ID, "status").text)
        # the page clears and redraws its results: read them once they hold the answer
        names, scores = wait.until(lambda d: settled(d, labels(beam)))
        assert names == labels(beam)
        assert [float(s) for s in scores] == [round(t["score"], 3) for t in beam["top_k"]]
        assert not any("%" in s for s in scores)

        notes = tmp_path / "notes.pdf"
        notes.write_bytes(b"%PDF-1.4 a document, not an image")
        driver.find_element(By.ID, "file").send_keys(str(notes))
        # the status reads "Classifying…" first, then the answer: wait for the answer
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "status").text)
        status = driver.find_element(By.ID, "status").text
        assert "notes.pdf" in status and "ofacls reads" in status, status
        assert not driver.find_element(By.ID, "preview").is_displayed()  # no broken-image icon
        assert shown(driver)[0] == []

        # A new k starts a rerun 300 ms later; an image picked before it runs is asked
        # once, with that k, and leaving the number box ("change") asks nothing more.
        beam3 = classify(server, image.read_bytes(), "?top_k=3&decode=beam")[2]
        before = metric(server, OK_CLASSIFY)
        # the page's timers run 100x slower meanwhile: the pick comes first on any machine
        driver.execute_script("window.realTimeout = window.setTimeout;"
                              "window.setTimeout = (f, ms) => window.realTimeout(f, ms * 100);")
        topk.send_keys("\b3")
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.execute_script("window.setTimeout = window.realTimeout;")
        wait.until(lambda d: settled(d, labels(beam3)))
        driver.find_element(By.ID, "decode").click()  # focus leaves the number box
        time.sleep(1)
        assert metric(server, OK_CLASSIFY) - before == 1
        assert settled(driver, labels(beam3))


def test_ctrl_c_with_the_page_open_is_clean(model: Path, tmp_path: Path) -> None:
    """A browser keeps its connection open; Ctrl-C still stops at once, with exit 0."""
    srv = Server(model)
    with headless_chromium(tmp_path) as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(srv.base + "/")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
        srv.proc.send_signal(signal.SIGINT)
        code, err = srv.stop()
    assert code == 0, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert err.count("stopping") == 1, err


def test_without_the_extra_exits_2_naming_it() -> None:
    code = ("import sys; sys.modules['uvicorn'] = None; sys.argv = ['ofacls', 'serve']; "
            "from ofacls.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "pip install 'ofacls[serve]'" in result.stderr


def test_a_request_chooses_its_own_labels(server: Server, model: Path, image: Path) -> None:
    """`labels=a,b,c`: the model's labels (their indices) or any text (places in the list),
    as predict --labels answers; requests with other labels in one batch keep theirs."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import quote

    sets = ["forklift,hand truck,pallet jack", "tench,goldfish", "a cat,a dog"]

    def ask(labels: str) -> tuple[int, dict]:
        status, _, answer = classify(server, image.read_bytes(), f"?top_k=3&labels={quote(labels)}")
        return status, answer

    with ThreadPoolExecutor(len(sets) * 2) as pool:
        answers = list(pool.map(ask, sets * 2))
    wants = {labels: json.loads(run_cli(["predict", "--json", "--model", str(model), "--device", "cpu",
                                         "-k", "3", "--labels", labels, str(image)], env=cli_env()).stdout)
             for labels in sets}
    for labels, (status, got) in zip(sets * 2, answers):
        assert status == 200, got
        assert_same(got, wants[labels])
        assert {t["label"] for t in got["top_k"]} == set(labels.split(","))
    for bad, says in (("a,a", "listed twice"), ("%1b", "control character"), (",", "names no labels"),
                      (",".join(map(str, range(1001))), "more than 1,000")):
        status, _, answer = classify(server, image.read_bytes(), f"?labels={bad}")
        assert status == 400 and says in answer["error"], answer


def test_a_calibrated_service_answers_with_prediction_sets(model: Path, image: Path, tmp_path: Path) -> None:
    from ofacls.calibration import Calibration

    cal = tmp_path / "cal.json"
    Calibration(0.01, 0.9, 100, {"model": str(model), "revision": None, "decode": "exact",
                                 "precision": "fp32", "quantize": None, "labels": None}).save(cal)
    srv = Server(model, "--calibration", str(cal))
    try:
        status, _, got = classify(srv, image.read_bytes(), "?top_k=2")
        want = json.loads(run_cli(["predict", "--json", "--model", str(model), "--device", "cpu",
                                   "-k", "2", "--calibration", str(cal), str(image)], env=cli_env()).stdout)
        assert status == 200 and got["prediction_set"] == want["prediction_set"]
        assert got["prediction_set"] and len(got["top_k"]) == 2
        # sets hold for the labels and decoding the calibration was made with only
        for query in ("?decode=beam", "?labels=tench,goldfish"):
            status, _, other = classify(srv, image.read_bytes(), query)
            assert status == 200 and "prediction_set" not in other
        info = json.loads(request(f"{srv.base}/v1/info")[2])
        assert info["calibration"]["coverage"] == 0.9 and info["calibration"]["threshold"] == 0.01
    finally:
        code, err = srv.stop()
    assert code == 0, err
    # made with other labels: refused once the model is loaded, in one line
    Calibration(0.01, 0.9, 100, {"model": str(model), "revision": None, "decode": "exact",
                                 "precision": "fp32", "quantize": None, "labels": ["tench"]}).save(cal)
    proc = run_cli(["serve", "--model", str(model), "--device", "cpu", "--port", "0",
                    "--calibration", str(cal)], env=cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "was made with labels [tench], this run has all the model's" in proc.stderr
