"""``reopold serve-teacher MODEL --port P``: any Hugging Face causal LM behind the part of vLLM's OpenAI-compatible
API that RemoteTeacher uses, on CPU or GPU, with nothing but the standard library's HTTP server.

Endpoints (request and response fields as vLLM names them; see reopold.teacher.remote for the vLLM sources):

    POST /v1/completions  token-id prompts, ``echo: true``, ``max_tokens: 0``, ``prompt_logprobs: 0``: each choice's
                          ``prompt_logprobs`` is ``[null, {"<id>": {"logprob", "rank": null, "decoded_token": null}},
                          ...]``, the log-prob of every prompt token after the first at temperature 1. Nothing is
                          generated; sampling fields (temperature, top_p, ...) are accepted and ignored. With
                          ``reopold_cover: true`` (reopold's extension) each entry also holds ``cover``: the log-prob
                          that the next token spells at least that token's bytes (``reopold.core.marginal``), for a
                          client whose student has another tokenizer (docs/cross_tokenizer.md).
    POST /tokenize        ``{"prompt": str, "add_special_tokens": bool}`` -> ``{"count", "max_model_len", "tokens",
                          "token_strs"}``
    GET  /v1/models       ``{"object": "list", "data": [{"id", "object": "model", "owned_by", "max_model_len"}]}``
    GET  /health          200, empty body

Anything else gets a 400 (404 for an unknown path or model) with vLLM's error body ``{"error": {"message", "type",
"param", "code"}}``.

Holding up under load and abuse: with an API key (``--api-key`` or ``$REOPOLD_API_KEY``) every route but /health needs
``Authorization: Bearer <key>`` (compared in constant time; 401 otherwise), as vLLM's ``--api-key``. A request may
hold at most ``max_prompts`` prompts and ``max_tokens`` tokens (413 otherwise), so one client cannot hold the model
for minutes; the model is locked per micro-batch, so concurrent requests interleave. Each connection must send its
request within ``read_timeout`` seconds (408, or the connection is closed). A fixed pool of ``workers`` threads
serves connections and at most ``queue`` more wait; beyond that a connection gets 503 at once (the client retries).
There is no TLS: the default host is loopback; on a shared network put it behind something that adds it.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from reopold.models.scorer import TokenScorer
from reopold.rollout import Rollout

MAX_BODY_BYTES = 256 * 2**20  # a request larger than this is refused (413) before it is read
LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "REOPOLD_API_KEY"
# Defaults of the per-request limits and the connection handling (serve-teacher's flags). 256 prompts and 2**18
# tokens hold a 1.5B-model teacher on one GPU for a few seconds; training sends teacher.micro_batch_size prompts.
MAX_PROMPTS = 256
MAX_TOKENS = 2**18
READ_TIMEOUT = 30.0
WORKERS = 8


class RequestError(Exception):
    """A request the server will not serve; becomes an HTTP error with vLLM's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class ServedModel:
    """A frozen causal LM and its tokenizer. One forward pass at a time (a lock): threads only overlap the I/O."""

    def __init__(self, lm, tokenizer, name: str, *, micro_batch_size: int = 16, max_prompts: int = MAX_PROMPTS,
                 max_tokens: int = MAX_TOKENS):
        self.max_prompts, self.max_tokens = max_prompts, max_tokens
        self.scorer = TokenScorer(lm.eval().requires_grad_(False))  # temperature 1: raw log-probs, as vLLM's
        self.tokenizer = tokenizer
        self.name = name
        self.micro_batch_size = micro_batch_size
        self.vocab_size = lm.get_output_embeddings().weight.shape[0]
        self.max_model_len = getattr(lm.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.device = next(lm.parameters()).device
        self.lock = threading.Lock()

    @functools.cached_property
    def extensions(self):
        """The tokens that extend each token's bytes (``reopold.core.marginal``), built on the first cover request."""
        from reopold.core.marginal import extensions
        from reopold.teacher.cross import token_bytes

        return extensions(token_bytes(self.tokenizer))

    @torch.no_grad()
    def prompt_logprobs(self, sequences: list[list[int]], cover: bool = False) -> list[list]:
        """log p(x_j | x_<j) for j = 1 .. len - 1 of every sequence, scored micro-batch by micro-batch; with
        ``cover`` a (logprob, cover) pair per token."""
        table = self.extensions if cover else None
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a forward
        out: list[list] = [[] for _ in sequences]
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.micro_batch_size):
            rows = order[start : start + self.micro_batch_size]
            width = max(2, max(len(sequences[i]) for i in rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, L) right-padded
            attention = torch.zeros((len(rows), width), dtype=torch.long)  # (b, L)
            for k, i in enumerate(rows):
                ids[k, : len(sequences[i])] = torch.tensor(sequences[i])
                attention[k, : len(sequences[i])] = 1
            # The whole sequence as a "response" after a one-token "prompt": TokenScorer then scores tokens 1..L-1
            # the way LocalTeacher does (same lm-head handling, chunked over the vocabulary).
            batch = Rollout(ids, attention, attention[:, 1:].bool(), prompt_length=1).to(self.device)
            with self.lock:  # per micro-batch: concurrent requests take turns
                logprobs, covers = self.scorer(batch, with_entropy=False, cover=table)  # (b, L - 1) each
            for k, i in enumerate(rows):
                values = logprobs[k, : len(sequences[i]) - 1].float().cpu().tolist()
                out[i] = values if table is None else list(zip(values, covers[k, : len(values)].float().cpu().tolist(),
                                                               strict=True))
        return out

    def completions(self, body) -> dict:
        sequences = self._parse_completion(body)
        cover = body.get("reopold_cover", False)
        if not isinstance(cover, bool):
            raise RequestError("reopold_cover must be true or false", param="reopold_cover")
        logprobs = self.prompt_logprobs(sequences, cover)
        with self.lock:  # a fast tokenizer is not safe to share between threads
            texts = [self.tokenizer.decode(sequence) for sequence in sequences]
        choices = []
        for index, (sequence, values, text) in enumerate(zip(sequences, logprobs, texts, strict=True)):
            entries = [None] + [{str(token): _entry(value)} for token, value in zip(sequence[1:], values, strict=True)]
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "prompt_logprobs": entries})
        prompt_tokens = sum(map(len, sequences))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens},
        }  # fmt: skip

    def tokenize(self, body) -> dict:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        self._check_model(body)
        if "messages" in body:
            raise RequestError("chat tokenization is not supported; send the text as 'prompt'", param="messages")
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", param="prompt")
        if len(prompt) > 16 * self.max_tokens:
            raise RequestError(f"'prompt' has {len(prompt)} characters, over this server's limit of "
                               f"{16 * self.max_tokens} (16 x --max-tokens)", status=413, param="prompt")
        if not isinstance(special, bool):
            raise RequestError("'add_special_tokens' must be true or false", param="add_special_tokens")
        with self.lock:
            tokens = list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
            strings = self.tokenizer.convert_ids_to_tokens(tokens) if body.get("return_token_strs") else None
        return {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": strings}

    def models(self) -> dict:
        card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "reopold",
                "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}

    def _check_model(self, body: dict) -> None:
        if body.get("model") not in (None, self.name):
            raise RequestError(f"The model `{body['model']}` does not exist; this server serves `{self.name}`",
                               status=404, param="model")

    def _parse_completion(self, body) -> list[list[int]]:
        """The token-id prompts of a completions request, or a RequestError saying which field is wrong."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        self._check_model(body)
        if body.get("stream"):
            raise RequestError("stream=true is not supported (prompt_logprobs are not streamed)", param="stream")
        if body.get("n", 1) not in (1, None):
            raise RequestError("only n=1 is supported", param="n")
        if body.get("max_tokens", 16) != 0 or body.get("echo") is not True:
            raise RequestError("this server only scores prompts: send echo=true and max_tokens=0", param="max_tokens")
        if body.get("logprobs") is not None:
            raise RequestError("'logprobs' (of generated tokens) is not supported: nothing is generated; use "
                               "prompt_logprobs", param="logprobs")
        if body.get("prompt_logprobs") != 0 or isinstance(body.get("prompt_logprobs"), bool):
            raise RequestError("set prompt_logprobs=0: the log-prob of each prompt token itself is all this server "
                               "returns", param="prompt_logprobs")
        prompt = body.get("prompt")
        is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)
        if isinstance(prompt, list) and prompt and all(map(is_id, prompt)):
            prompt = [prompt]  # one prompt given as a flat id list
        if not (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)):
            raise RequestError("'prompt' must be token ids: a non-empty list of non-empty lists of ints (text prompts "
                               "are not supported)", param="prompt")
        if len(prompt) > self.max_prompts:
            raise RequestError(f"{len(prompt)} prompts in one request, over this server's limit of {self.max_prompts} "
                               "(--max-prompts); send fewer per request (teacher.micro_batch_size)", status=413,
                               param="prompt")
        tokens = sum(map(len, prompt))
        if tokens > self.max_tokens:
            raise RequestError(f"{tokens} tokens in one request, over this server's limit of {self.max_tokens} "
                               "(--max-tokens); send fewer prompts per request (teacher.micro_batch_size)",
                               status=413, param="prompt")
        for i, sequence in enumerate(prompt):
            if not all(is_id(t) and 0 <= t < self.vocab_size for t in sequence):
                raise RequestError(f"prompt {i} holds a token id outside the vocabulary [0, {self.vocab_size})",
                                   param="prompt")
            if len(sequence) > self.max_model_len:
                raise RequestError(f"prompt {i} has {len(sequence)} tokens, more than max_model_len "
                                   f"{self.max_model_len}", param="prompt")
        return prompt


def _entry(value) -> dict:
    """One prompt_logprobs entry: a log-prob, or a (log-prob, cover) pair. -inf is clamped, as vLLM does."""
    logprob, cover = value if isinstance(value, tuple) else (value, None)
    entry = {"logprob": max(logprob, -9999.0), "rank": None, "decoded_token": None}
    if cover is not None:
        entry["cover"] = max(cover, -9999.0)
    return entry


class TeacherHTTPServer(HTTPServer):
    """One listening thread hands connections to a fixed pool of ``workers`` threads; at most ``queue`` more wait,
    and any beyond get a 503 at once, so stalled clients cannot make the server start a thread each."""

    allow_reuse_address = True
    request_queue_size = 64  # the kernel's backlog of connections not yet accepted

    def __init__(self, address: tuple[str, int], *, log_requests: bool = True, api_key: str | None = None,
                 read_timeout: float = READ_TIMEOUT, workers: int = WORKERS, queue: int | None = None):
        super().__init__(address, TeacherRequestHandler)
        self.model: ServedModel | None = None  # set once loaded: binding first makes a busy port fail fast
        self.log_requests = log_requests
        self.api_key = api_key or None
        self.read_timeout = read_timeout
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serve-teacher")
        self.slots = threading.BoundedSemaphore(workers + (4 * workers if queue is None else queue))

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self._refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            self.pool.submit(self._serve_connection, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is closing
            self.slots.release()
            self.shutdown_request(request)

    def _serve_connection(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def _refuse_busy(self, request) -> None:
        body = json.dumps({"error": {"message": "the server is busy (every worker and queue slot taken); retry",
                                     "type": "ServiceUnavailableError", "param": None, "code": 503}}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away or stalled while being answered
            if self.log_requests:
                print(f"serve-teacher: connection from {client_address[0]} failed: {error}", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class TeacherRequestHandler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    GET_ROUTES = {"/health": None, "/v1/models": ServedModel.models}
    POST_ROUTES = {"/v1/completions": ServedModel.completions, "/tokenize": ServedModel.tokenize}

    def setup(self):
        self.timeout = self.server.read_timeout  # applied to the socket by StreamRequestHandler.setup
        super().setup()

    def _authorized(self, path: str) -> bool:
        """With an API key, every route but /health needs ``Authorization: Bearer <key>`` (constant-time check)."""
        key = self.server.api_key
        if key is None or path == "/health":
            return True
        given = self.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, f"Bearer {key}".encode()):
            return True
        self._drain()  # read the body first: closing on unread data would reset the connection before the 401
        self._error(RequestError("missing or wrong API key: send 'Authorization: Bearer <key>' (training: "
                                 "teacher.api_key_env names the variable that holds it)", status=401))
        return False

    def _drain(self) -> None:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= 2**20:
            try:
                self.rfile.read(int(length))
            except OSError:
                pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if not self._authorized(path):
            return
        if path not in self.GET_ROUTES:
            return self._error(RequestError(f"no route GET {path}", status=404))
        route = self.GET_ROUTES[path]
        if route is None:
            return self._send(200, b"")
        self._send(200, json.dumps(route(self.server.model)).encode())

    def do_POST(self):
        path = self.path.split("?")[0]
        if not self._authorized(path):
            return
        try:
            if path not in self.POST_ROUTES:
                raise RequestError(f"no route POST {path}", status=404)
            body = self._read_json()
            reply = self.POST_ROUTES[path](self.server.model, body)
        except RequestError as err:
            return self._error(err)
        except Exception as err:  # a failed forward (e.g. out of memory): the client may retry a 500
            traceback.print_exc()
            return self._error(RequestError(f"{type(err).__name__}: {err}", status=500))
        self._send(200, json.dumps(reply).encode())

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a Content-Length header is required")
        limit = min(MAX_BODY_BYTES, 2**20 + 16 * self.server.model.max_tokens)  # ids are at most ~8 bytes each
        if int(length) > limit:
            raise RequestError(f"request body over {limit} bytes; send fewer prompts per request", status=413)
        try:
            data = self.rfile.read(int(length))
        except TimeoutError as err:
            self.close_connection = True
            raise RequestError(f"the request body did not arrive within {self.server.read_timeout:g} s",
                               status=408) from err
        try:
            return json.loads(data)
        except ValueError as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from err

    def _error(self, err: RequestError):
        kind = {401: "AuthenticationError", 404: "NotFoundError", 408: "RequestTimeoutError",
                413: "RequestTooLargeError", 500: "InternalServerError"}.get(err.status, "BadRequestError")
        body = {"error": {"message": str(err), "type": kind, "param": err.param, "code": err.status}}
        self._send(err.status, json.dumps(body).encode())

    def _send(self, status: int, payload: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)


def build_server(model: str, host: str = "127.0.0.1", port: int = 8000, *, dtype: str = "float32",
                 device: str | None = None, served_model_name: str | None = None, micro_batch_size: int = 16,
                 log_requests: bool = True, api_key: str | None = None, max_prompts: int = MAX_PROMPTS,
                 max_tokens: int = MAX_TOKENS, read_timeout: float = READ_TIMEOUT, workers: int = WORKERS,
                 queue: int | None = None) -> TeacherHTTPServer:
    """Bind ``host:port`` (0: any free port, see ``server.server_address``), then load the model; the caller runs
    ``serve_forever`` (in a thread, for tests) and ``shutdown`` + ``server_close`` to stop. ``api_key`` None reads
    ``$REOPOLD_API_KEY`` (unset or empty: no authentication); limits and pool as in the module's docstring."""
    from reopold.models.loading import load_model, load_tokenizer

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535; got {port}")
    for flag, value in {"--micro-batch-size": micro_batch_size, "--max-prompts": max_prompts,
                        "--max-tokens": max_tokens, "--workers": workers}.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1; got {value}")
    if not read_timeout > 0 or (queue is not None and queue < 0):
        raise ValueError(f"--read-timeout must be > 0 and --queue >= 0; got {read_timeout}, {queue}")
    api_key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    try:
        server = TeacherHTTPServer((host, port), log_requests=log_requests, api_key=api_key,
                                   read_timeout=read_timeout, workers=workers, queue=queue)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from err
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = load_model(model, dtype=dtype, device=device, trainable=False)
        server.model = ServedModel(lm, load_tokenizer(model), served_model_name or model,
                                   micro_batch_size=micro_batch_size, max_prompts=max_prompts, max_tokens=max_tokens)
    except BaseException:
        server.server_close()
        raise
    return server


def serve_teacher(model: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``model`` until interrupted (Ctrl-C); ``options`` as in ``build_server``."""
    server = build_server(model, host, port, **options)
    if host not in LOOPBACK and server.api_key is None:
        print(f"warning: listening on {host}: no authentication (--api-key or ${API_KEY_ENV}) or TLS, so anyone who "
              "can reach this port can use the model; keep it on a private network", file=sys.stderr)
    elif host not in LOOPBACK:
        print(f"warning: listening on {host} without TLS: the API key travels in clear; keep it on a private "
              "network", file=sys.stderr)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {server.model.name} on {server.model.device} at http://{bound_host}:{bound_port} "
          f"(teacher.url: http://{bound_host}:{bound_port}, teacher.model: {server.model.name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
