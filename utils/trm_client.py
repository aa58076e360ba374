"""Async client for the thinking reward model (or any judge) behind an OpenAI-compatible chat API.

Shared by step-1 annotation and the step-2 trainer. Server faults never raise: a request that
never yields a score comes back as ScoreResult(score=None, error=...).
"""
import asyncio
import logging
import os
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import openai
from tqdm import tqdm

from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import JUDGE_THINKING, image_to_data_url, trm_messages
from sophiavl.utils.outcome_reward import parse_score

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300
# vLLM's own sampling fields, sent with every request: a field a request leaves out is filled by `vllm serve`
# from the judge checkpoint's generation_config.json (released Qwen2.5-VL: top_k 1, repetition_penalty 1.05,
# which penalises the score digits for appearing in the judge's own prompt). The serve launchers also pass
# --generation-config vllm. Other OpenAI-compatible APIs may reject these fields: vllm_sampling=False.
VLLM_NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
# vLLM's server renders the judge's chat template with these: a thinking template (Qwen3.5's) would otherwise open
# the answer with <think> and spend max_tokens there, with no score at the end. Templates without it ignore it.
VLLM_JUDGE_TEMPLATE = {"chat_template_kwargs": {"enable_thinking": JUDGE_THINKING}}


@dataclass
class ScoreResult:
    score: float | None
    text: str | None
    error: str | None
    latency_s: float
    attempts: int


class _EncodedImages:
    """Each distinct image object of one batch is PNG-encoded once, off the event loop, and dropped when
    the last item using it is done. The N responses of a prompt share its image, and encoding a ~1 MP
    image per request (~25 ms) held a 2-core client under half of a 16-slot judge's throughput
    (benchmarks/RESULTS.md)."""

    def __init__(self, items=()):
        self._uses = Counter(id(image) for _, _, images in items for image in images)
        self._tasks = {}  # id(image) -> (image, task); holding the image keeps its id from being reused

    async def data_urls(self, images: list) -> list[str]:
        tasks = []
        for image in images:
            if id(image) not in self._tasks:
                self._tasks[id(image)] = (image, asyncio.ensure_future(asyncio.to_thread(image_to_data_url, image)))
            tasks.append(self._tasks[id(image)][1])
        return list(await asyncio.gather(*tasks))

    def release(self, images: list) -> None:
        for image in images:
            self._uses[id(image)] -= 1
            if self._uses[id(image)] <= 0:
                self._tasks.pop(id(image), None)


def _openai_trm_messages(question: str, response: str, image_urls: list[str]) -> list[dict]:
    """trm_messages with each image placeholder, in order, replaced by its data-URL part
    (utils.prompts.to_openai_messages, with the images already encoded)."""
    urls = iter(image_urls)
    messages = []
    for message in trm_messages(question, response, len(image_urls)):
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": next(urls)}} if part.get("type") == "image"
                       else dict(part) for part in content]
        messages.append({**message, "content": content})
    return messages


class _Retryable(Exception):
    """A fault that may go away: connection, timeout, 429, 5xx, a garbled body."""


class _Final(Exception):
    """A fault that the same request would hit again: other 4xx, a completion without text."""


def normalize_base_url(url: str) -> str:
    """Accept ".../v1", ".../v1/chat/completions" (the reference's OPENAI_API_URL) or a bare host.

    Returns the base URL the openai client expects, ending in the API version segment.
    """
    parsed = urllib.parse.urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(f"judge/TRM URL {url!r} is not an http(s)://host[:port]/v1 URL")
    if parsed.query or parsed.fragment:
        raise InputError(f"judge/TRM URL {url!r} must not carry a query or fragment")
    path = parsed.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not path:
        path = "/v1"  # vllm serve and most OpenAI-compatible servers mount the API here
    return urllib.parse.urlunparse((parsed.scheme, parsed.netloc, path, "", "", ""))


def _short(text: object) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


class TRMClient:
    """Scores (question, response, images) with a judge served behind /v1/chat/completions.

    `max_images`: the server's images-per-request cap (vLLM's --limit-mm-per-prompt), None when unknown. vLLM
    answers a request over it with HTTP 400 every time, so such a request is refused here, unsent: its result
    is a failure naming the count and the cap, and the first refusal is logged."""

    def __init__(self, base_url: str, model: str, *, max_concurrency: int = 16, timeout_s: float = 60,
                 max_retries: int = 3, backoff_s: float = 0.5, max_tokens: int = 16, temperature: float = 0.0,
                 vllm_sampling: bool = True, max_images: int | None = None):
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_tokens < 1:
            raise InputError("TRM client needs max_concurrency >= 1, timeout > 0, max_retries >= 0, "
                             "backoff >= 0 and max_tokens >= 1")
        if max_images is not None and max_images < 0:
            raise InputError(f"TRM client needs max_images >= 0 (or None: no cap), got {max_images}")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.vllm_sampling = vllm_sampling
        self.max_images = max_images
        self._refusal_logged = False
        self._loop = None
        self._client = None
        self._semaphore = None

    def _bind_to_running_loop(self):
        # httpx connection pools and asyncio semaphores belong to one event loop; the sync
        # wrapper starts a new loop per call, so both are rebuilt when the loop changes.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                max_retries=0,  # ours are the only retries
                timeout=self.timeout_s,
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop

    async def aclose(self):
        if self._client is not None:
            await self._client.close()
        self._loop = self._client = self._semaphore = None

    async def score(self, question: str, response: str, images: list, encoded: _EncodedImages | None = None
                    ) -> ScoreResult:
        """`encoded`: a cache shared by the items of one batch (score_many), so shared images encode once."""
        self._bind_to_running_loop()
        start = time.monotonic()
        if self.max_images is not None and len(images) > self.max_images:
            error = (f"not sent: {len(images)} images, over the TRM server's cap of {self.max_images} per request "
                     f"(serve it with --max-images {len(images)} or more)")
            if not self._refusal_logged:
                self._refusal_logged = True
                logger.warning("TRM request %s; later ones over the cap are refused without a log line (each counts "
                               "as a TRM failure)", error)
            return ScoreResult(None, None, error, time.monotonic() - start, 0)
        # The semaphore covers the whole item (encoding, attempts, back-off), so at most
        # max_concurrency items hold requests at once.
        async with self._semaphore:
            urls = await (encoded or _EncodedImages()).data_urls(images)
            messages = _openai_trm_messages(question, response, urls)
            attempt, error = 0, None
            while attempt <= self.max_retries:
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                attempt += 1
                try:
                    text = await self._complete(messages)
                except _Retryable as err:
                    error = str(err)
                    logger.debug("TRM attempt %d failed: %s", attempt, error)
                    continue
                except _Final as err:
                    return ScoreResult(None, None, str(err), time.monotonic() - start, attempt)
                score = parse_score(text)
                if score is None:
                    error = f"no parsable score in judge output: {_short(text)!r}"
                    return ScoreResult(None, text, error, time.monotonic() - start, attempt)
                return ScoreResult(score, text, None, time.monotonic() - start, attempt)
        error = f"gave up after {attempt} attempts: {error}"
        return ScoreResult(None, None, error, time.monotonic() - start, attempt)

    async def _complete(self, messages: list[dict]) -> str:
        request = self._client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature,
            top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            extra_body={**VLLM_NEUTRAL_SAMPLING, **VLLM_JUDGE_TEMPLATE} if self.vllm_sampling else None)
        try:
            # wait_for is a hard wall-clock bound; httpx's timeouts are per read, so a server
            # trickling bytes could otherwise hold a request forever.
            completion = await asyncio.wait_for(request, self.timeout_s)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retryable(f"timed out after {self.timeout_s}s") from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection error: {_short(err.__cause__ or err)}") from None
        except openai.APIStatusError as err:
            if err.status_code == 429 or err.status_code >= 500:
                raise _Retryable(f"HTTP {err.status_code}: {_short(err.message)}") from None
            raise _Final(f"HTTP {err.status_code} (not retried): {_short(err.message)}") from None
        except (openai.APIResponseValidationError, ValueError) as err:  # ValueError: invalid JSON body
            raise _Retryable(f"invalid response body: {_short(err)}") from None
        except openai.APIError as err:  # any other fault the openai package reports
            raise _Retryable(f"API error: {_short(err)}") from None
        try:
            text = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError, KeyError):
            raise _Retryable(f"response without choices: {_short(completion)}") from None
        if not isinstance(text, str):
            raise _Final("judge completion has no text")
        return text

    async def score_many(self, items: list[tuple[str, str, list]], progress: bool = False) -> list[ScoreResult]:
        bar = tqdm(total=len(items), desc="TRM", disable=not progress)
        encoded = _EncodedImages(items)

        async def one(item):
            result = await self.score(*item, encoded=encoded)
            encoded.release(item[2])
            bar.update(1)
            return result

        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            bar.close()

    def score_many_sync(self, items: list[tuple[str, str, list]], progress: bool = False) -> list[ScoreResult]:
        async def run():
            try:
                return await self.score_many(items, progress)
            finally:
                await self.aclose()

        return asyncio.run(run())
