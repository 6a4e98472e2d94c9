"""The demo page's server on malformed requests (no model needed: none of them reaches it): a
Content-Length that is not a number gets a 400 answer; a client that promises more bytes than
it sends is let go after the request timeout and holds no thread; clients that lie and hang up
leave nothing in the server's log."""
import json
import socket
import threading
import time
import types

import pytest

from bmask_jax.inference import demo


class NoModel:
    """What DemoServer reads of a Predictor before a request reaches the model."""
    config = types.SimpleNamespace(predict=types.SimpleNamespace(max_image_pixels=10_000))

    def predict_arrays(self, images):
        raise AssertionError("a malformed request reached the model")


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
