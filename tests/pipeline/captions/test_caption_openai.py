"""OpenAI backend with the real ``openai`` client against a local stdlib HTTP server."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from pipeline.captions import CaptionCache, OpenAICaptioner, OpenAICaptionerConfig, caption_image
from pipeline.errors import CaptionError

SECRET = "sk-test-S3CRETkey-0123456789abcdefXYZW"
KEY_ENV = "CASTLORA_TEST_CAPTION_KEY"
MODEL = "vision-test-model"

Reply = tuple[int, dict[str, Any] | None, float]
"""(HTTP status, JSON body, seconds to sleep before answering)."""


def completion(text: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None, "param": None}}


@dataclass
class FakeServer:
    url: str
    replies: list[Callable[[dict[str, Any]], Reply]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def reply_with(self, *replies: Reply | Callable[[dict[str, Any]], Reply]) -> None:
        """Answer the n-th request with the n-th reply (the last one repeats)."""
        self.replies = [r if callable(r) else (lambda _req, r=r: r) for r in replies]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request = {"path": self.path, "auth": self.headers.get("Authorization"), "json": body}
            state.requests.append(request)
            index = min(len(state.requests), len(state.replies)) - 1
            status, payload, delay = state.replies[index](request)
            if delay:
                state.release.wait(delay)
            data = json.dumps(payload or {}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    caplog.set_level(logging.DEBUG)
    yield
    # Whatever happened in the test, the key must not have reached the logs.
    assert SECRET not in caplog.text
    assert SECRET[-4:] not in caplog.text


def captioner_for(server: FakeServer, **overrides: Any) -> OpenAICaptioner:
    options = {"base_url": server.url, "model": MODEL, "api_key_env": KEY_ENV, "backoff_s": 0.001}
    return OpenAICaptioner(OpenAICaptionerConfig(**(options | overrides)))


def assert_no_secret(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert SECRET not in text and SECRET[-4:] not in text and SECRET[:8] not in text


@pytest.fixture
def photo() -> Image.Image:
    return Image.new("RGB", (1000, 500), (90, 140, 60))


def decoded_image(request: dict[str, Any]) -> Image.Image:
    parts = request["json"]["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    header, data = url.split(",", 1)
    assert header in ("data:image/jpeg;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_success_sends_model_instruction_and_downscaled_image(server: FakeServer, photo: Image.Image) -> None:
    def answer(request: dict[str, Any]) -> Reply:
        body = request["json"]
        if body.get("model") != MODEL or decoded_image(request) is None:
            return 400, error_body("bad request"), 0
        return 200, completion('  "A green dog stands on a lawn in front of a fence."\n'), 0

    server.reply_with(answer)
    caption = captioner_for(server).caption(photo, "dog")

    assert caption == "A green dog stands on a lawn in front of a fence."
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {SECRET}"
    sent = decoded_image(request)
    assert max(sent.size) == 768 and sent.size[0] == 2 * sent.size[1]
    text = next(p["text"] for p in request["json"]["messages"][0]["content"] if p["type"] == "text")
    assert "the dog" in text and "background" in text


def test_caption_image_caches_and_applies_token_phrase(server: FakeServer, photo: Image.Image, tmp_path) -> None:
    server.reply_with((200, completion("A dog on a lawn."), 0))
    captioner, cache = captioner_for(server), CaptionCache(tmp_path)
    first = caption_image(captioner, cache, photo, "c" * 64, "dog", "olis dog")
    second = caption_image(captioner, cache, photo, "c" * 64, "dog", "zwx dog")
    assert first.text == "A olis dog on a lawn." and second.text == "A zwx dog on a lawn."
    assert len(server.requests) == 1


def test_retries_server_errors_then_succeeds(server: FakeServer, photo: Image.Image) -> None:
    server.reply_with(
        (500, error_body("overloaded"), 0),
        (503, error_body("try later"), 0),
        (200, completion("A dog asleep on a blue sofa."), 0),
    )
    assert captioner_for(server, max_retries=4).caption(photo, "dog") == "A dog asleep on a blue sofa."
    assert len(server.requests) == 3


def test_rate_limit_is_retried(server: FakeServer, photo: Image.Image) -> None:
    server.reply_with((429, error_body("slow down"), 0), (200, completion("A dog."), 0))
    assert captioner_for(server).caption(photo, "dog") == "A dog."
    assert len(server.requests) == 2


def test_gives_up_after_max_retries(server: FakeServer, photo: Image.Image) -> None:
    server.reply_with((502, error_body("bad gateway"), 0))
    with pytest.raises(CaptionError) as info:
        captioner_for(server, max_retries=2).caption(photo, "dog")
    assert len(server.requests) == 3
    assert "502" in str(info.value) and server.url in str(info.value)


def test_unauthorized_fails_at_once_without_leaking_key(server: FakeServer, photo: Image.Image) -> None:
    # Real servers echo a masked key; none of it may reach the message.
    server.reply_with((401, error_body(f"Incorrect API key provided: {SECRET[:8]}****{SECRET[-4:]}"), 0))
    with pytest.raises(CaptionError) as info:
        captioner_for(server).caption(photo, "dog")
    assert len(server.requests) == 1
    message = str(info.value)
    assert "401" in message and KEY_ENV in message and f"{server.url}/chat/completions" in message
    assert_no_secret(info.value)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_are_not_retried_and_redacted(server: FakeServer, photo: Image.Image, status: int) -> None:
    server.reply_with((status, error_body(f"model {MODEL} not usable with key {SECRET}"), 0))
    with pytest.raises(CaptionError) as info:
        captioner_for(server).caption(photo, "dog")
    assert len(server.requests) == 1
    assert str(status) in str(info.value) and MODEL in str(info.value)
    assert_no_secret(info.value)


def test_connection_refused_names_base_url(photo: Image.Image) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    captioner = OpenAICaptioner(
        OpenAICaptionerConfig(base_url=base_url, model=MODEL, api_key_env=KEY_ENV, max_retries=2, backoff_s=0.001)
    )
    with pytest.raises(CaptionError) as info:
        captioner.caption(photo, "dog")
    message = str(info.value)
    assert base_url in message and "3 attempt" in message and "could not connect" in message
    assert_no_secret(info.value)


def test_timeout_raises_caption_error(server: FakeServer, photo: Image.Image) -> None:
    server.reply_with((200, completion("too late"), 2.0))
    with pytest.raises(CaptionError) as info:
        captioner_for(server, timeout_s=0.2, max_retries=1).caption(photo, "dog")
    assert "timed out" in str(info.value) and server.url in str(info.value)
    assert len(server.requests) == 2
    assert_no_secret(info.value)


@pytest.mark.parametrize("content", ["", "   ", None])
def test_empty_reply_is_an_error(server: FakeServer, photo: Image.Image, content: str | None) -> None:
    server.reply_with((200, completion(content), 0))
    with pytest.raises(CaptionError, match="no caption text"):
        captioner_for(server).caption(photo, "dog")


def test_reply_without_choices_is_an_error(server: FakeServer, photo: Image.Image) -> None:
    server.reply_with((200, {"id": "x", "object": "chat.completion", "choices": []}, 0))
    with pytest.raises(CaptionError, match="no caption text"):
        captioner_for(server).caption(photo, "dog")


def test_missing_key_without_base_url_names_the_variable(monkeypatch: pytest.MonkeyPatch, photo) -> None:
    monkeypatch.delenv(KEY_ENV)
    captioner = OpenAICaptioner(OpenAICaptionerConfig(api_key_env=KEY_ENV))
    with pytest.raises(CaptionError, match=KEY_ENV):
        captioner.caption(photo, "dog")


def test_local_server_without_key_gets_placeholder(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, photo: Image.Image
) -> None:
    monkeypatch.delenv(KEY_ENV)
    server.reply_with((200, completion("A dog on a rug."), 0))
    assert captioner_for(server).caption(photo, "dog") == "A dog on a rug."
    assert server.requests[0]["auth"] == "Bearer not-needed"


def test_base_url_without_scheme_is_rejected(photo: Image.Image) -> None:
    captioner = OpenAICaptioner(OpenAICaptionerConfig(base_url="localhost:8000/v1", api_key_env=KEY_ENV))
    with pytest.raises(CaptionError, match="http://"):
        captioner.caption(photo, "dog")
