"""The demo page's server on malformed requests (no model needed: none of them reaches it): a
Content-Length that is missing or not a number gets a 400 answer, a chunked upload 411; a
client that promises more bytes than it sends is let go after the request timeout and holds
no thread; clients that lie and hang up leave nothing in the server's log; requests past
MAX_IN_FLIGHT get 503 at once. And a bounded load: 200 requests from 8 clients, all answered
(experiments/demo_load.py measures the same with a real model for docs/serving.md)."""
import io
import json
import socket
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image

from bmask_jax.inference import demo


class NoModel:
    """What DemoServer reads of a Predictor before a request reaches the model."""
    config = types.SimpleNamespace(predict=types.SimpleNamespace(max_image_pixels=10_000))

    def predict_arrays(self, images):
        raise AssertionError("a malformed request reached the model")


class OneSquare(NoModel):
    """A stand-in model: one instance, a square in the middle; waits for `gate` when given one."""
    category_ids = [1, 2]

    def __init__(self, gate=None):
        self.gate = gate

    def predict_arrays(self, images):
        if self.gate is not None:
            self.gate.wait(10)
        h, w = images[0].shape[:2]
        mask = np.zeros((1, h, w), bool)
        mask[0, h // 4:3 * h // 4, w // 4:3 * w // 4] = True
        return [{"boxes": np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]), "scores": np.array([0.9]),
                 "classes": np.array([0]), "class_names": ["square"], "masks": mask}]


def png(h=24, w=32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def post(address, body: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    import http.client
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/octet-stream"})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(demo, "REQUEST_TIMEOUT_S", 0.5)
    s = demo.DemoServer(NoModel(), "127.0.0.1", 0)
    s.serve_in_thread()
    yield s
    s.close()


def exchange(server, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    with socket.create_connection(server.httpd.server_address, timeout=wait) as c:
        c.sendall(head + body)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
        return reply


def test_a_content_length_that_is_not_a_number_gets_an_answer(server, capfd):
    reply = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.0 400") or status.startswith(b"HTTP/1.1 400"), reply[:200]
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1]) == {"error": "Content-Length 'ten' is not a number of bytes"}
    assert capfd.readouterr().err == ""


def test_a_missing_length_gets_400_and_a_chunked_upload_411(server):
    reply = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == b"400" and b"no Content-Length" in reply
    reply = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")
    assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == b"411" and b"chunked uploads are not taken" in reply


def test_requests_past_the_limit_get_503_at_once(monkeypatch):
    monkeypatch.setattr(demo, "MAX_IN_FLIGHT", 2)
    gate = threading.Event()
    s = demo.DemoServer(OneSquare(gate), "127.0.0.1", 0)
    s.serve_in_thread()
    try:
        held = [threading.Thread(target=post, args=(s.httpd.server_address, png())) for _ in range(2)]
        for t in held:
            t.start()
        time.sleep(0.5)                                  # both are in flight, waiting on the model
        start = time.monotonic()
        status, body = post(s.httpd.server_address, png())
        assert status == 503 and body == {"error": "busy: 2 requests are in flight; try again"}
        assert time.monotonic() - start < 2
        gate.set()
        for t in held:
            t.join(10)
        assert post(s.httpd.server_address, png())[0] == 200      # the slots came back
    finally:
        gate.set()
        s.close()


def test_a_bounded_load_is_all_answered(capfd):
    """200 uploads from 8 clients at once against the server (a stand-in model): every one is
    answered 200 with its instance; the latencies are printed (pytest -s)."""
    s = demo.DemoServer(OneSquare(), "127.0.0.1", 0)
    s.serve_in_thread()
    body, latencies, failures = png(), [], []

    def client():
        for _ in range(25):
            start = time.monotonic()
            status, reply = post(s.httpd.server_address, body)
            latencies.append(time.monotonic() - start)
            if status != 200 or len(reply["instances"]) != 1:
                failures.append((status, reply))

    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        s.close()
    assert failures == [] and len(latencies) == 200 and s.predictions == 200
    print(f"p50 {1e3 * np.percentile(latencies, 50):.1f} ms, p99 {1e3 * np.percentile(latencies, 99):.1f} ms")
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_sends_less_than_it_promised_is_let_go(server, capfd):
    before = threading.active_count()
    start = time.monotonic()
    reply = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", b"only ten b")
    assert time.monotonic() - start < 3                 # the server hung up on it after 0.5 s
    assert reply == b""
    for _ in range(50):                                  # its handler thread is gone
        if threading.active_count() <= before:
            break
        time.sleep(0.05)
    assert threading.active_count() <= before
    assert capfd.readouterr().err == ""


def test_clients_that_lie_and_hang_up_leave_no_traceback(server, capfd):
    for _ in range(20):
        with socket.create_connection(server.httpd.server_address) as c:
            c.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nabc")
    time.sleep(1.0)                                      # each handler times out or sees the hang-up
    reply = exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in reply.split(b"\r\n", 1)[0]       # still serving
    assert capfd.readouterr().err == ""
