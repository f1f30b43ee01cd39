"""A local HTTP server posing as the Hugging Face hub (HF_ENDPOINT), serving files from memory.

huggingface_hub asks `HEAD` then `GET` of `/<repo>/resolve/<revision>/<file>` and needs the commit and ETag
headers; anything else gets 404. Every request is recorded in `requests`.
"""

from __future__ import annotations

import hashlib
import http.server
import threading


class FakeHub:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = dict(files), []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, send_body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path))
                body = hub.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self._reply(send_body=False)

            def do_GET(self) -> None:
                self._reply(send_body=True)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]
