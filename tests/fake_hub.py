"""A small stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub calls to create a repo and
commit files (create, preupload, commit with its NDJSON body), with the committed files kept in memory."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.private: dict[str, bool] = {}
        self.unknown: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else request["name"]
                    hub.repos.setdefault(repo, {})
                    hub.private[repo] = bool(request.get("private")) or request.get("visibility") == "private"
                    return self._reply({"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply({"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/<org>/<name>/<action>/<revision>
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        stored = hub.repos.setdefault(repo, {})
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                stored[value["path"]] = base64.b64decode(value["content"])
                        oid = hashlib.sha1(json.dumps(sorted(stored)).encode() + body).hexdigest()
                        hub.commits[repo] = oid
                        return self._reply({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                hub.unknown.append(f"POST {path}")
                return self._reply({"error": "not found"}, 404)

            def do_GET(self):
                hub.unknown.append(f"GET {self.path}")
                return self._reply({"error": "not found"}, 404)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seed_cache(self, repo: str, cache_dir: Path) -> Path:
        """Lay the repo's files out as huggingface_hub's cache does, as a download would have left them."""
        root = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / self.commits[repo]
        for name, data in self.repos[repo].items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(data)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(self.commits[repo])
        return snapshot
