"""A loopback-only stand-in for the Hub endpoints huggingface_hub's create_repo/upload_folder use:
repo creation, preupload, the git-LFS batch API + upload, and commit. It stores what it receives."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str, lfs_over: int = 1024, fail_commits: int = 0, deny: bool = False):
        self.token = token
        self.lfs_over = lfs_over
        self.fail_commits = fail_commits
        self.deny = deny
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[str] = []
        self.commit_attempts = 0
        self.validated: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj=None):
                body = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                if hub.deny or auth != f"Bearer {hub.token}":
                    self._send(401 if not hub.deny else 403, {"error": "Invalid credentials"})
                    return False
                return True

            def do_PUT(self):
                hub.log.append(f"PUT {self.path}")
                if self.path.startswith("/lfs-upload/"):
                    data = self._body()
                    oid = self.path.rsplit("/", 1)[1]
                    if hashlib.sha256(data).hexdigest() != oid:
                        return self._send(400, {"error": "oid mismatch"})
                    hub.lfs[oid] = data
                    return self._send(200, {})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                hub.log.append(f"POST {self.path}")
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    if not self._authorized():
                        return
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos.setdefault(repo, {"private": req.get("private")})
                    hub.files.setdefault(repo, {})
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    import yaml

                    content = json.loads(body).get("content", "")
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    except yaml.YAMLError as e:
                        return self._send(400, {"error": f"invalid YAML: {e}"})
                    hub.validated.append(meta)
                    return self._send(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    if not self._authorized():
                        return
                    req = json.loads(body)
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["size"] > hub.lfs_over else "regular",
                         "shouldIgnore": False} for f in req["files"]]})
                if path.endswith(".git/info/lfs/objects/batch"):
                    req = json.loads(body)
                    host = self.headers["Host"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"http://{host}/lfs-upload/{o['oid']}"}}}
                        for o in req["objects"]]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    if not self._authorized():
                        return
                    hub.commit_attempts += 1
                    if hub.fail_commits > 0:
                        hub.fail_commits -= 1
                        return self._send(503, {"error": "Service Unavailable"})
                    repo = path[len("/api/models/"):].split("/commit/")[0]
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        v = item["value"]
                        if item["key"] == "file":
                            hub.files[repo][v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "lfsFile":
                            hub.files[repo][v["path"]] = hub.lfs[v["oid"]]
                    host = self.headers["Host"]
                    return self._send(200, {"commitUrl": f"http://{host}/{repo}/commit/abc123",
                                            "commitOid": "abc123" * 6 + "abcd", "pullRequestUrl": None})
                self._send(404, {"error": f"fakehub: no route for POST {path}"})

            def do_GET(self):
                hub.log.append(f"GET {self.path}")
                self._send(404, {"error": f"fakehub: no route for GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
