"""The remote teacher against a real HTTP server on loopback: ``reopold serve-teacher``'s server in a thread, with a
tiny random model. The reference is LocalTeacher on the same weights."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reopold.rollout import build_rollout
from reopold.tasks import build_tokenizer
from reopold.teacher import TeacherUnavailable
from reopold.teacher.local import LocalTeacher
from reopold.teacher.remote import RemoteTeacher
from reopold.teacher.server import build_server
from tests.tiny import make_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, served model name, model path) of a running server; shut down after the module's tests."""
    path = make_model(tmp_path_factory.mktemp("teacher") / "model", hidden=16, layers=1, seed=5, sharpness=3.0)
    # micro_batch_size=2: a request of 3 prompts takes two forwards, sorted by length.
    server = build_server(str(path), port=0, device="cpu", micro_batch_size=2, log_requests=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", str(path), path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A loopback port nobody listens on (bound by the OS, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def scoring_body(name: str, **fields) -> bytes:
    body = {"model": name, "prompt": [[4, 5, 6]], "echo": True, "max_tokens": 0, "prompt_logprobs": 0, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_remote_logprobs_equal_local_teacher(served):
    """Prompts of different lengths (left padding), a response cut at EOS, one without EOS, an empty one; batch_size 2
    splits the 4 non-empty rows over two requests. Every response token's log-prob matches LocalTeacher."""
    url, name, path = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    encode = lambda text: tokenizer(text)["input_ids"]
    eos = tokenizer.eos_token_id
    prompts = [encode("12*34="), encode("5*6="), encode("1+2="), encode("7="), encode("98*76=")]
    responses = [encode("408") + [eos] + encode("99"), encode("30;"), [], encode("7") + [eos], encode("7448")]
    rollout = build_rollout(prompts, responses, [None] * 5, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    local = LocalTeacher(AutoModelForCausalLM.from_pretrained(path)).logprobs(rollout)  # (B, T)

    remote = RemoteTeacher(url, name, batch_size=2, timeout=10).logprobs(rollout)

    mask = rollout.completion_mask
    assert remote.shape == local.shape and remote.dtype == torch.float32
    assert mask.sum() == 13  # 4 + 3 + 0 + 2 + 4 response tokens; the "99" after the EOS is not scored
    torch.testing.assert_close(remote[mask], local[mask], atol=1e-5, rtol=0)
    assert torch.all(remote[~mask] == 0)
    assert torch.all(remote[mask] < 0)  # real log-probs, not the zero fill


def test_completion_reply_has_vllm_prompt_logprobs_shape(served):
    url, name, path = served
    status, reply = post(f"{url}/v1/completions", scoring_body(name, temperature=0.5))  # sampling fields ignored
    assert status == 200 and reply["object"] == "text_completion" and len(reply["choices"]) == 1
    entries = reply["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and [list(e) for e in entries[1:]] == [["5"], ["6"]]  # keyed by the token's own id
    # Hand check of entry 1: log_softmax of the logits after token 4, read at token 5.
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([[4, 5, 6]])).logits[0, 0], -1)[5].item()
    assert entries[1]["5"]["logprob"] == pytest.approx(expected, abs=1e-5)
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_info_endpoints(served):
    url, name, _ = served
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert response.status == 200 and response.read() == b""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        card = json.loads(response.read())["data"][0]
    assert card["id"] == name and card["max_model_len"] == 128


@pytest.mark.parametrize(
    "data, status, says",
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps([1, 2]).encode(), 400, "JSON object"),
        (scoring_body("NAME", prompt="12+3="), 400, "token ids"),
        (scoring_body("NAME", prompt=[]), 400, "token ids"),
        (scoring_body("NAME", prompt=[[4, 5], []]), 400, "token ids"),
        (scoring_body("NAME", prompt=[[4, 10**6]]), 400, "outside the vocabulary"),
        (scoring_body("NAME", prompt=[[4, -1]]), 400, "outside the vocabulary"),
        (scoring_body("NAME", prompt=[list(range(4, 18)) * 10]), 400, "max_model_len"),
        (scoring_body("NAME", max_tokens=5), 400, "max_tokens=0"),
        (scoring_body("NAME", echo=False), 400, "echo=true"),
        (scoring_body("NAME", prompt_logprobs=None), 400, "prompt_logprobs=0"),
        (scoring_body("NAME", prompt_logprobs=5), 400, "prompt_logprobs=0"),
        (scoring_body("NAME", logprobs=1), 400, "logprobs"),
        (scoring_body("NAME", stream=True), 400, "stream"),
        (scoring_body("other-model"), 404, "does not exist"),
    ],
)
def test_malformed_completion_requests_are_refused(served, data, status, says):
    url, name, _ = served
    code, reply = post(f"{url}/v1/completions", data.replace(b"NAME", name.encode()))
    assert code == status and reply["error"]["code"] == status
    assert says in reply["error"]["message"]


def test_malformed_tokenize_and_unknown_route_are_refused(served):
    url, name, _ = served
    code, reply = post(f"{url}/tokenize", json.dumps({"model": name, "prompt": [4, 5]}).encode())
    assert code == 400 and reply["error"]["param"] == "prompt"
    code, reply = post(f"{url}/v1/chat/completions", b"{}")
    assert code == 404 and "no route" in reply["error"]["message"]


def test_tokenizer_probe_agrees(served):
    url, name, path = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = RemoteTeacher(url, name, timeout=10).check_tokenizer(tokenizer, "12+7=19;")
    assert ids == tokenizer("12+7=19;", add_special_tokens=False)["input_ids"] and len(ids) == 8


def test_tokenizer_probe_detects_a_different_tokenizer(served):
    url, name, _ = served
    shuffled = build_tokenizer(alphabet="9876543210*+=;:")  # same characters, different ids
    with pytest.raises(ValueError, match="first difference at token 0"):
        RemoteTeacher(url, name, timeout=10).check_tokenizer(shuffled, "12+7=19;")


def test_unknown_model_is_not_retried(served):
    url, _, path = served
    delays = []
    teacher = RemoteTeacher(url, "no-such-model", retries=3, backoff=0.01, timeout=10, sleep=delays.append)
    with pytest.raises(TeacherUnavailable, match="HTTP 404"):
        teacher.check_tokenizer(AutoTokenizer.from_pretrained(path), "1")
    assert delays == []


def test_retries_with_backoff_then_teacher_unavailable():
    """Nothing listens: 1 attempt + 3 retries, waiting 0.01, 0.02, 0.04 s, then a message naming the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    delays = []
    teacher = RemoteTeacher(url, "m", timeout=0.5, retries=3, backoff=0.01, sleep=delays.append)
    rollout = build_rollout([[4, 5]], [[6, 1]], [None], pad_token_id=0, eos_token_id=1)
    with pytest.raises(TeacherUnavailable, match="did not answer after 4 attempts") as raised:
        teacher.logprobs(rollout)
    assert delays == [0.01, 0.02, 0.04]
    assert f"{url}/v1/completions" in str(raised.value) and "serve-teacher" in str(raised.value)


def test_retries_ride_out_a_brief_outage():
    """A server that answers 503 twice, then works: the client retries and succeeds on the third attempt."""
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = (503, b'{"error": {"message": "loading"}}') if len(calls) < 3 else (200, b'{"tokens": [4]}')
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        delays = []
        teacher = RemoteTeacher(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", retries=3, backoff=0.01,
                                timeout=10, sleep=delays.append)
        ids = teacher.check_tokenizer(build_tokenizer(), "1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert ids == [4] and len(calls) == 3 and delays == [0.01, 0.02]
    assert calls[0] == {"model": "m", "prompt": "1", "add_special_tokens": False}


def test_logits_say_gkd_needs_a_local_teacher():
    rollout = build_rollout([[4]], [[5]], [None], pad_token_id=0, eos_token_id=1)
    with pytest.raises(NotImplementedError, match="gkd"):
        RemoteTeacher("http://127.0.0.1:1", "m").logits(rollout)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"retries": -1}, {"timeout": 0}])
def test_bad_client_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="need timeout > 0"):
        RemoteTeacher("http://127.0.0.1:1", "m", **kwargs)
