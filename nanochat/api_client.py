"""A client for OpenAI-compatible chat endpoints (OpenAI, vLLM, llama.cpp, Ollama, scripts/chat_web.py): POST
{api_base}/chat/completions, retrying 429, 5xx and connection errors; scripts/gen_data.py runs it in threads."""
import contextlib
import email.utils
import random
import threading
import time
from collections import Counter

import requests

STOP = threading.Event()  # set when the run is stopping: workers give up instead of retrying

class FatalAPIError(RuntimeError):
    """Retrying cannot help (bad key, unknown model or URL): stop the whole run."""

class APIError(RuntimeError):
    """This request failed (after retries, or with a reply we cannot use)."""

def retry_after_seconds(value):
    """Retry-After as seconds (a number, or an HTTP date); None when absent or unreadable."""
    # a number first; a date only if it is not one (parsing None or garbage raises, and falls through)
    for parse in (float, lambda v: email.utils.parsedate_to_datetime(v).timestamp() - time.time()):
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parse(value))
    return None

class ChatClient:
    # 408 timeout, 409 conflict, 425 too early, 429 rate limit: worth another try, as is every 5xx
    RETRY_STATUS = {408, 409, 425, 429}
    HINTS = {401: "check the API key (--api-key-env)", 403: "the key may lack access to this model",
             404: "check --api-base (it usually ends in /v1) and --model"}  # fatal: retrying cannot help
    MAX_RETRY_AFTER = 600.0  # never sleep longer than this, whatever the server asks
    lock = threading.Lock()  # for the counts, which all threads update
    def __init__(self, api_base, model, api_key=None, timeout=120.0, max_retries=6, backoff=1.0,
                 max_backoff=60.0, counters=None):
        self.url, self.model, self.timeout = api_base.rstrip("/") + "/chat/completions", model, timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.counters = Counter() if counters is None else counters
    def complete(self, messages, temperature=1.0, max_tokens=1024, seed=None):
        payload = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                   **({} if seed is None else {"seed": seed})}
        for attempt in range(self.max_retries + 1):
            if STOP.is_set():
                raise APIError("the run is stopping")
            try:
                response = requests.post(self.url, json=payload, headers=self.headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                problem, retry_after = f"{type(e).__name__}: {e}", None
            else:
                status, body = response.status_code, response.text[:300].strip()
                if status == 200:
                    # any other shape (an error object sent with 200, a list of parts) is not a reply we can use
                    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                        if isinstance(content := response.json()["choices"][0]["message"]["content"], str):
                            return content
                    raise APIError(f"unexpected response (not an OpenAI chat completion of text): {response.text[:200]!r}")
                if status in self.HINTS:
                    raise FatalAPIError(f"{self.url} answered HTTP {status}: {body} ({self.HINTS[status]})")
                if status not in self.RETRY_STATUS and status < 500:  # this request is wrong: again would be too
                    raise APIError(f"HTTP {status}: {body}")
                problem, retry_after = f"HTTP {status}: {body[:100]}", retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.max_retries:
                raise APIError(f"gave up after {attempt + 1} attempts; last error: {problem}")
            # Retry-After: never earlier than asked, a little later at random; else exponential backoff with
            # jitter. Either way parallel workers do not all come back at once
            delay = (min(retry_after, self.MAX_RETRY_AFTER) * random.uniform(1.0, 1.25) if retry_after is not None
                     else min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5))
            with self.lock:
                self.counters["retried"] += 1
            STOP.wait(delay)  # wakes at once when the run stops
