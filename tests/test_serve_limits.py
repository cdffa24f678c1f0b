"""``reopold serve-teacher`` under abuse, against a real server on loopback: the API key, per-request limits, the read
timeout and the bounded worker pool. Every client here has a timeout, and counts stay small (at most 12 sockets)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from reopold.teacher.remote import RemoteTeacher
from reopold.teacher.server import build_server
from tests.tiny import make_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("teacher") / "model", hidden=16, layers=1, seed=5)


class Running:
    def __init__(self, path, **options):
        self.server = build_server(str(path), port=0, device="cpu", log_requests=False, **options)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(model_path):
    running = []

    def start(**options) -> Running:
        running.append(Running(model_path, **options))
        return running[-1]

    yield start
    for server in running:
        server.close()


def request(url: str, body: dict | None = None, key: str | None = None, timeout: float = 10) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def read_all(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (the socket has a timeout)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def scoring(prompts: list[list[int]]) -> dict:
    return {"prompt": prompts, "echo": True, "max_tokens": 0, "prompt_logprobs": 0}


def test_api_key_is_required_on_every_route_but_health(serve):
    server = serve(api_key="s3cret")
    for key in (None, "wrong", "s3cret-but-longer"):
        status, body = request(server.url + "/v1/completions", scoring([[4, 5, 6]]), key=key)
        assert status == 401 and "missing or wrong API key" in body["error"]["message"]
        assert request(server.url + "/v1/models", key=key)[0] == 401
    assert request(server.url + "/health")[0] == 200
    status, body = request(server.url + "/v1/completions", scoring([[4, 5, 6]]), key="s3cret")
    assert status == 200 and len(body["choices"][0]["prompt_logprobs"]) == 3


def test_api_key_from_the_environment_and_the_client(serve, monkeypatch):
    from reopold.tasks import build_tokenizer
    from reopold.teacher import TeacherUnavailable

    monkeypatch.setenv("REOPOLD_API_KEY", "from-env")
    server = serve()
    tokenizer = build_tokenizer()
    RemoteTeacher(server.url, None, api_key="from-env", timeout=5).check_tokenizer(tokenizer)
    with pytest.raises(TeacherUnavailable, match="HTTP 401: missing or wrong API key"):
        RemoteTeacher(server.url, None, api_key="nope", timeout=5, retries=0).check_tokenizer(tokenizer)


def test_per_request_limits_answer_413(serve):
    server = serve(max_prompts=4, max_tokens=20)
    status, body = request(server.url + "/v1/completions", scoring([[4, 5]] * 5))
    assert status == 413 and "5 prompts in one request, over this server's limit of 4" in body["error"]["message"]
    status, body = request(server.url + "/v1/completions", scoring([[4] * 10] * 3))
    assert status == 413 and "30 tokens in one request, over this server's limit of 20" in body["error"]["message"]
    status, body = request(server.url + "/v1/completions", scoring([[4] * 10] * 2))
    assert status == 200 and len(body["choices"]) == 2


def test_a_client_that_never_sends_is_dropped_after_the_read_timeout(serve):
    server = serve(read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server, nothing sent
        assert 0.3 < time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as partial:
        partial.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"prompt\"")
        reply = read_all(partial)
        assert reply.startswith("HTTP/1.0 408") and "did not arrive within 0.5 s" in reply


def test_stalled_clients_take_a_bounded_pool_then_get_503(serve):
    """2 workers + 2 queue slots: 12 stalled connections start at most 2 threads; those beyond the 4 slots get a 503
    at once; once the stalled ones time out, the server answers again."""
    server = serve(workers=2, queue=2, read_timeout=1.0)
    before = {t.name for t in threading.enumerate()}
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(12)]
    try:
        time.sleep(0.5)
        workers = [t for t in threading.enumerate() if t.name.startswith("serve-teacher") and t.name not in before]
        assert 1 <= len(workers) <= 2
        refused = 0
        for sock in stalled[4:]:
            sock.settimeout(5)
            reply = read_all(sock)
            refused += reply.startswith("HTTP/1.0 503") and "the server is busy" in reply
        assert refused == 8
        started, status = time.monotonic(), 503
        while status == 503 and time.monotonic() - started < 10:  # the 4 held slots drain within 2 read timeouts
            time.sleep(0.2)
            status, _ = request(server.url + "/health", timeout=5)
        assert status == 200 and time.monotonic() - started < 5
    finally:
        for sock in stalled:
            sock.close()


def test_bad_server_flags_fail_before_loading(model_path):
    with pytest.raises(ValueError, match=r"--port must be in 0..65535; got 99999"):
        build_server(str(model_path), port=99999)
    with pytest.raises(ValueError, match="--max-tokens must be >= 1"):
        build_server(str(model_path), port=0, max_tokens=0)
