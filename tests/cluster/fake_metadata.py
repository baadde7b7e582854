"""A fake cloud metadata server on 127.0.0.1 that answers as GCE, EC2 (IMDSv2) and Azure document it.

One server speaks all three (their paths do not overlap), so a test points one
``*_endpoint`` at it and calls ``preempt(seconds)``: from then on the chosen cloud
announces that this machine goes away ``seconds`` from now.

What each cloud documents, and this fake enforces:

* GCE (``/computeMetadata/v1/...``): requests need ``Metadata-Flavor: Google`` (else
  403) and must not carry ``X-Forwarded-For`` (else 403); answers carry
  ``Metadata-Flavor: Google``. ``instance/preempted`` is ``FALSE``/``TRUE``;
  ``instance/maintenance-event`` is ``NONE`` or ``TERMINATE_ON_HOST_MAINTENANCE``.
* EC2 IMDSv2: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
  in 1..21600 (else 400) gives a token; a ``GET`` without a valid token is 401.
  ``/latest/meta-data/spot/instance-action`` is 404 until an interruption is planned,
  then ``{"action": "terminate", "time": "YYYY-MM-DDThh:mm:ssZ"}``.
* Azure: requests need ``Metadata: true`` (else 400);
  ``/metadata/scheduledevents`` lists ``Events`` (``Preempt`` with ``NotBefore`` as an
  RFC 1123 date, ``Resources`` naming the VM); ``/metadata/instance/compute/name``
  (``format=text``) is the VM's name.
"""

from __future__ import annotations

import datetime
import email.utils
import http.server
import json
import math
import secrets
import threading
import time
import urllib.parse

VM_NAME = "trainer-vm-0"


class FakeMetadataServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.cloud: str | None = None       # which cloud announces, once preempt() was called
        self.deadline_wall: float | None = None
        self.maintenance = False            # GCE: TERMINATE_ON_HOST_MAINTENANCE instead of preempted
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.other_vm_event = False         # Azure: a Preempt event for another VM only
        self.gce_flavor_header = True       # False: answer like a server that is not GCE's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def preempt(self, cloud: str, seconds: float, maintenance: bool = False) -> float:
        """From now on ``cloud`` announces preemption ``seconds`` ahead; returns the deadline (Unix s)."""
        with self.lock:
            self.cloud, self.maintenance = cloud, maintenance
            self.deadline_wall = time.time() + seconds
            return self.deadline_wall

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def __enter__(self) -> "FakeMetadataServer":
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeMetadataServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append((self.command, url.path))
        if url.path.startswith("/computeMetadata/v1/"):
            return self._gce(url.path.removeprefix("/computeMetadata/v1/"))
        if url.path.startswith("/latest/"):
            return self._aws(url.path)
        if url.path.startswith("/metadata/"):
            return self._azure(url.path, urllib.parse.parse_qs(url.query))
        self._reply(404, b"not found")

    # -- GCE
    def _gce(self, key: str) -> None:
        if self.headers.get("Metadata-Flavor") != "Google" or self.headers.get("X-Forwarded-For"):
            return self._reply(403, b"Missing Metadata-Flavor:Google header.", gce=True)
        now_announced = self.server.cloud == "gce"
        if key == "instance/preempted":
            value = "TRUE" if now_announced and not self.server.maintenance else "FALSE"
        elif key == "instance/maintenance-event":
            value = "TERMINATE_ON_HOST_MAINTENANCE" if now_announced and self.server.maintenance else "NONE"
        else:
            return self._reply(404, b"not found", gce=True)
        self._reply(200, value.encode(), gce=self.server.gce_flavor_header)

    # -- AWS IMDSv2
    def _aws(self, path: str) -> None:
        if path == "/latest/api/token":
            return self._aws_token()
        if self.headers.get("X-aws-ec2-metadata-token") not in self.server.tokens:
            return self._reply(401, b"")
        if path != "/latest/meta-data/spot/instance-action" or self.server.cloud != "aws":
            return self._reply(404, b"")
        when = datetime.datetime.fromtimestamp(math.ceil(self.server.deadline_wall), datetime.timezone.utc)
        body = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._reply(200, json.dumps(body).encode(), content_type="text/plain")

    def _aws_token(self) -> None:
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if self.command != "PUT" or self.headers.get("X-Forwarded-For") or not ttl.isdigit() \
                or not 1 <= int(ttl) <= 21600:
            return self._reply(400, b"")
        token = secrets.token_urlsafe(32)
        with self.server.lock:
            self.server.tokens.add(token)
        self._reply(200, token.encode())

    # -- Azure
    def _azure(self, path: str, query: dict) -> None:
        if self.headers.get("Metadata") != "true" or "api-version" not in query:
            return self._reply(400, json.dumps({"error": "Bad request"}).encode())
        if path == "/metadata/instance/compute/name":
            return self._reply(200, VM_NAME.encode())
        if path != "/metadata/scheduledevents":
            return self._reply(404, b"")
        self._reply(200, json.dumps({"DocumentIncarnation": 2 if self._azure_events() else 1,
                                     "Events": self._azure_events()}).encode(), content_type="application/json")

    def _azure_events(self) -> list[dict]:
        if self.server.cloud != "azure":
            return []
        not_before = email.utils.formatdate(math.ceil(self.server.deadline_wall), usegmt=True)
        resource = "some-other-vm" if self.server.other_vm_event else VM_NAME
        return [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                 "ResourceType": "VirtualMachine", "Resources": [resource], "EventStatus": "Scheduled",
                 "NotBefore": not_before, "Description": "", "EventSource": "Platform",
                 "DurationInSeconds": -1}]

    def _reply(self, status: int, body: bytes, gce: bool = False, content_type: str = "text/plain") -> None:
        self.send_response(status)
        if gce:
            self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
