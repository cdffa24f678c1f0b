"""A teacher behind an HTTP server (vLLM's OpenAI-compatible server or ``reopold serve-teacher``): log pi_T of each
sampled token from the completions API's prompt log-probs, with retries and a clean stop (docs/remote_teacher.md
lists the exact fields sent and read)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import torch

from reopold.core.marginal import cover_from_candidates
from reopold.rollout.batch import Rollout
from reopold.teacher import SpanScores, TeacherUnavailable

# Digits, operators, spaces, accents, CJK, an emoji, a tab and a newline: the places where tokenizers of one
# family drift apart (normalisation, byte fallback, whitespace handling).
DEFAULT_PROBE = "Distill 12 + 30 = 42; naïve café, 東京 🙂\n\tdone."
MAX_DELAY = 60.0  # seconds: the longest wait between two attempts
TOP_K_COVER = 20  # candidates per position for covers from a server that returns none (vLLM's default max_logprobs)
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # HTTP codes worth retrying: timeouts, overload, a restarting server


class RemoteTeacher:
    """The Teacher Protocol (reopold.teacher) over HTTP: batched, with a timeout and retries with exponential backoff.

    Args:
        base_url: the server's root, e.g. ``http://gpu-box:8000`` (a trailing ``/v1`` is accepted and dropped).
        model: the name the server serves the teacher under (vLLM: ``--served-model-name`` or the model path).
        timeout: seconds one HTTP request may take before it counts as a failed attempt.
        retries: further attempts after a failed one; the k-th retry waits ``backoff * 2**(k-1)`` seconds (at most
            60), so ``retries=5, backoff=1`` rides out about 31 s of downtime before giving up.
        batch_size: responses per request.
        api_key: sent as ``Authorization: Bearer`` (vLLM ``--api-key``); None sends none.
        sleep: how to wait between attempts (tests pass a recorder).
    """

    def __init__(self, base_url: str, model: str, *, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                 batch_size: int = 64, api_key: str | None = None, sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher url must start with http:// or https://; got {base_url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got timeout={timeout}, "
                             f"retries={retries}, backoff={backoff}, batch_size={batch_size}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.batch_size = batch_size
        self.api_key = api_key
        self.sleep = sleep
        self._covers: bool | None = None  # whether the server returns covers, once asked

    def score(self, rollout: Rollout) -> SpanScores:
        """One tokenizer: the token log-probs, no span alignment."""
        return SpanScores(self.logprobs(rollout), None)

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) float32: log pi_T of each response token given its prompt and the response before it.

        Each row goes out as its real tokens only (left padding of the prompt and right padding of the response
        removed), so the server scores exactly the sequence the student produced. Positions outside
        ``completion_mask`` hold 0.0; rows with no response token are not sent.
        """
        return self._score_rows(rollout, cover=False)[0]

    def logprobs_and_cover(self, rollout: Rollout, table) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs and covers (``reopold.core.marginal``; ``table``: the ``extensions`` of the teacher's
        vocabulary, from a local copy of its tokenizer that pre-flight checked against the server's). Exact where
        the server returns covers (``reopold serve-teacher``); otherwise from its top-``TOP_K_COVER``
        ``prompt_logprobs`` (vLLM), a lower bound (``cover_from_candidates``)."""
        if self.supports_cover():
            return self._score_rows(rollout, cover=True)
        return self._score_rows(rollout, cover=False, top_k=TOP_K_COVER, table=table)

    def supports_cover(self) -> bool:
        """Whether the server returns covers (``reopold serve-teacher`` does; vLLM does not). Asked once."""
        if self._covers is None:
            try:
                entries = self._prompt_logprobs([[0, 0]], cover=True)
                self._covers = isinstance(entries[0][1], dict) and all(
                    isinstance(v, dict) and "cover" in v for v in entries[0][1].values())
            except TeacherUnavailable:
                self._covers = False
        return self._covers

    def _score_rows(self, rollout: Rollout, cover: bool, top_k: int = 0,
                    table=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt_length = rollout.prompt_length
        rows, sequences, masks = [], [], []
        for i in range(len(rollout)):
            prompt = rollout.input_ids[i, :prompt_length][rollout.attention_mask[i, :prompt_length].bool()]
            response = rollout.completion_ids[i][rollout.completion_mask[i]]
            if len(response) == 0:
                continue
            if len(prompt) == 0:
                raise ValueError(f"row {i} has an empty prompt: its first response token has no context to score")
            rows.append(i)
            sequences.append(prompt.tolist() + response.tolist())
            masks.append(rollout.completion_mask[i].cpu())
        out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32)  # (B, T)
        covers = torch.zeros_like(out) if cover or top_k else None
        candidates = []  # top-k: (row, mask, each position's candidate entries, the written tokens)
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            for k, entries in enumerate(self._prompt_logprobs(batch, cover, top_k)):
                row, sequence, mask = rows[start + k], batch[k], masks[start + k]
                first = len(sequence) - int(mask.sum())  # index of the first response token in the sequence
                values = [self._logprob(entries, j, sequence[j], cover) for j in range(first, len(sequence))]
                out[row, mask] = torch.tensor([v[0] for v in values], dtype=torch.float32)
                if cover:
                    covers[row, mask] = torch.tensor([v[1] for v in values], dtype=torch.float32)
                elif top_k:
                    candidates.append((row, mask, entries[first:], sequence[first:]))
        if candidates:  # one pass over every position of every row
            covers_of = _top_k_covers([c[2] for c in candidates], [c[3] for c in candidates], table)
            for (row, mask, _, _), values in zip(candidates, covers_of, strict=True):
                covers[row, mask] = values
        device = rollout.input_ids.device
        return out.to(device), None if covers is None else covers.to(device)

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        raise NotImplementedError(
            "algo.name=gkd needs the teacher's full next-token distribution, which a completions server does not "
            "return (only the log-probs of given tokens). Use a local teacher for gkd: set teacher.model and leave "
            "teacher.url empty."
        )

    def check_tokenizer(self, tokenizer, probe_text: str = DEFAULT_PROBE) -> list[int]:
        """Pre-flight: the server's tokenizer turns ``probe_text`` into the same ids as ``tokenizer`` (no special
        tokens added on either side). Returns the ids; raises ValueError on a mismatch, TeacherUnavailable when the
        server cannot be reached. Token ids are sent as they are, so two tokenizers that disagree here would make the
        teacher score different tokens from the ones the student sampled."""
        reply = self._call("/tokenize", {"model": self.model, "prompt": probe_text, "add_special_tokens": False})
        remote = reply.get("tokens") if isinstance(reply, dict) else None
        if not isinstance(remote, list):
            raise TeacherUnavailable(f"{self.base_url}/tokenize answered without a 'tokens' list: {str(reply)[:200]}")
        local = list(tokenizer(probe_text, add_special_tokens=False)["input_ids"])
        if remote != local:
            same = [a == b for a, b in zip(remote, local, strict=False)]
            at = same.index(False) if False in same else len(same)  # first differing token
            raise ValueError(
                f"the teacher server at {self.base_url} tokenizes the probe {probe_text!r} differently from the "
                f"student's tokenizer: {len(remote)} vs {len(local)} tokens, first difference at token {at} (server "
                f"{remote[at : at + 5]}, student {local[at : at + 5]}). Teacher log-probs are looked up by the "
                "student's token ids, so both sides need one tokenizer: serve a teacher of the student's model family."
            )
        return local

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def _prompt_logprobs(self, batch: list[list[int]], cover: bool = False, top_k: int = 0) -> list[list]:
        """The ``prompt_logprobs`` list of each sequence of the batch, in order (with ``top_k`` more candidates at
        each position)."""
        body = {
            "model": self.model, "prompt": batch, "echo": True, "max_tokens": 0, "prompt_logprobs": top_k,
            "temperature": 1.0, "top_p": 1.0, "top_k": -1,
        }  # fmt: skip
        if cover:
            body["reopold_cover"] = True
        reply = self._call("/v1/completions", body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(batch):
            raise TeacherUnavailable(f"{self.base_url}/v1/completions answered {len(batch)} prompts with "
                                     f"{len(choices) if isinstance(choices, list) else 'no'} choices")
        choices = sorted(choices, key=lambda choice: choice.get("index", 0))
        entries = [choice.get("prompt_logprobs") for choice in choices]
        for sequence, entry in zip(batch, entries, strict=True):
            if not isinstance(entry, list) or len(entry) != len(sequence):
                raise TeacherUnavailable(
                    f"{self.base_url}/v1/completions did not return prompt_logprobs for every prompt token; the "
                    "server must support vLLM's prompt_logprobs parameter (vLLM, or reopold serve-teacher)"
                )
        return entries

    def _logprob(self, entries: list, position: int, token: int, cover: bool = False) -> tuple[float, float | None]:
        entry = entries[position]
        item = entry.get(str(token)) if isinstance(entry, dict) else None
        if item is None:
            raise TeacherUnavailable(f"{self.base_url} returned no log-prob for token {token} at position {position}")
        logprob = float(item["logprob"] if isinstance(item, dict) else item)
        if not cover:
            return logprob, None
        if not (isinstance(item, dict) and "cover" in item):
            raise TeacherUnavailable(f"{self.base_url} returned no 'cover' with its log-probs: only reopold "
                                     "serve-teacher does; set teacher.span_logprob: canonical for this server")
        return logprob, float(item["cover"])

    def _call(self, path: str, body: dict) -> dict:
        """POST ``body`` as JSON; retry connection failures, timeouts and 408/429/5xx with exponential backoff."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        waited, last_error = 0.0, ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_DELAY)
                self.sleep(delay)
                waited += delay
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:  # before OSError: HTTPError is one
                detail = _error_detail(err)
                if err.code not in RETRY_STATUS:
                    raise TeacherUnavailable(
                        f"the teacher server at {url} rejected the request (HTTP {err.code}: {detail}); not retried. "
                        f"Check that teacher.model names the served model ({self.base_url}/v1/models lists it) and "
                        "that the server supports prompt_logprobs."
                    ) from err
                last_error = f"HTTP {err.code}: {detail}"
                continue
            except (OSError, http.client.HTTPException) as err:  # refused, reset, DNS, timeout
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                return json.loads(payload)
            except ValueError as err:
                raise TeacherUnavailable(f"the teacher server at {url} answered non-JSON: {payload[:200]!r}") from err
        raise TeacherUnavailable(
            f"the teacher server at {url} did not answer after {self.retries + 1} attempts over {waited:.1f} s "
            f"(last error: {last_error}). Check that it is running (reopold serve-teacher MODEL --port P, or vllm "
            "serve MODEL) and reachable at teacher.url; raise teacher.retries or teacher.timeout to wait longer."
        )


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The message of an error body: vLLM's ``{"error": {"message": ...}}``, its older flat ``{"message": ...}``,
    or the raw text."""
    try:
        text = err.read().decode(errors="replace")
    except OSError:
        return str(err.reason)
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300] or str(err.reason)
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)[:300]
    return text[:300]


def _top_k_covers(positions: list[list[dict]], tokens: list[list[int]], table) -> list[torch.Tensor]:
    """Per row, the covers of its written ``tokens`` from each position's top-k candidate entries (``{"<id>":
    {"logprob"}}``, the written token among them): one ``cover_from_candidates`` over all rows' positions."""
    flat = [[(int(key), float(item["logprob"] if isinstance(item, dict) else item)) for key, item in entry.items()]
            for row in positions for entry in row]
    width = max(map(len, flat))
    ids = torch.tensor([[t for t, _ in c] + [-1] * (width - len(c)) for c in flat], dtype=torch.long)
    logprobs = torch.tensor([[v for _, v in c] + [float("-inf")] * (width - len(c)) for c in flat],
                            dtype=torch.float64)
    written = torch.tensor([t for row in tokens for t in row], dtype=torch.long)
    values = cover_from_candidates(ids, logprobs, written, table).float()
    return list(values.split([len(row) for row in tokens]))
