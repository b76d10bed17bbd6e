"""A loopback fake of the Anthropic Messages API, for tests with the real SDK.

`FakeMessagesAPI` serves POST /v1/messages on 127.0.0.1 (a random port, in a thread) and
answers from a script: a queue of responses that tests fill with `reply` (a message with
text / tool_use blocks, a stop reason and usage, in the API's wire format) and `fail`
(an HTTP error with the API's error body). It records every request (headers and JSON
body) so tests can assert what the client sent: tools, cache_control, tool_results.
Point the SDK at it with `base_url=api.url` and any key.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
_ids = itertools.count(1)


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def tool_use(name: str, **input) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):04d}", "name": name, "input": input}


class FakeMessagesAPI:
    def __init__(self, model: str = "claude-sonnet-5-5"):
        self.model = model
        self.script: deque = deque()
        self.default: tuple | None = None  # answered when the script is empty
        self.requests: list[dict] = []  # {"headers": {lower-case name: value}, "body": {...}}
        self.served: list[dict] = []  # the bodies of the 200 answers sent, in order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeMessagesAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- scripting -----------------------------------------------------------------------

    def reply(self, *blocks: dict, stop_reason: str | None = None, usage: dict | None = None):
        """Queue one 200 answer; stop_reason defaults to tool_use when a block is one."""
        if stop_reason is None:
            stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) \
                else "end_turn"
        body = {
            "id": f"msg_{next(_ids):04d}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": list(blocks),
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 50,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      **(usage or {})},
        }
        self.script.append((200, body))

    def fail(self, status: int, message: str = "scripted failure", times: int = 1) -> None:
        """Queue `times` error answers with the API's error body."""
        for _ in range(times):
            self.script.append((status, self.error_body(status, message)))

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        return {"type": "error",
                "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}

    # -- what the client sent ---------------------------------------------------------------

    def served_usage(self) -> dict:
        """The usage of every 200 answer sent so far, summed, with their count."""
        kinds = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens")
        total = dict.fromkeys(kinds, 0) | {"requests": len(self.served)}
        for body in self.served:
            for kind in kinds:
                total[kind] += body["usage"][kind]
        return total

    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.requests]

    def tool_results(self, request: int = -1) -> list[dict]:
        """The tool_result blocks of a request's last (user) message."""
        last = self.requests[request]["body"]["messages"][-1]
        return [b for b in last["content"] if b.get("type") == "tool_result"]

    # -- the server --------------------------------------------------------------------------

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                api.requests.append({"headers": headers, "body": body})
                key = self.headers.get("x-api-key") or self.headers.get("authorization", "")
                if self.path.split("?")[0] != "/v1/messages":
                    status, answer = 404, api.error_body(404, f"no route {self.path}")
                elif not key.removeprefix("Bearer ").strip():
                    status, answer = 401, api.error_body(401, "no API key")
                elif api.script:
                    status, answer = api.script.popleft()
                elif api.default is not None:
                    status, answer = api.default
                else:
                    status, answer = 500, api.error_body(500, "fake: the script is empty")
                if status == 200:
                    api.served.append(answer)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{len(api.requests)}")
                if status >= 400:
                    self.send_header("retry-after-ms", "1")  # keeps the SDK's retries quick
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        return Handler
