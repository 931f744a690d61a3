"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for tests that run the captioner (and the
LLM-guided layouts) end to end."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ChatServer:
    url: str = ""
    caption: str = "a photo of a dog sitting on grass"
    authorizations: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    """Answers to give, one per request in order (a test's good or bad layout JSON); then ``caption``."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    """The JSON body of every request received."""


@contextmanager
def start_chat_server(
    caption: str = "a photo of a dog sitting on grass", replies: list[str] | None = None
) -> Iterator[ChatServer]:
    """Answers every POST with one chat completion: the next of ``replies`` while any are left, else ``caption``;
    records Authorization headers and request bodies."""
    state = ChatServer(caption=caption, replies=list(replies or []))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                state.authorizations.append(self.headers.get("Authorization", ""))
                state.requests.append(json.loads(raw or b"{}"))
                text = state.replies.pop(0) if state.replies else state.caption
            body = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": "test-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
