"""Cloud preemption notices: ask this machine's metadata service whether it is about to go away.

Clouds warn before they take a machine back, each in its own way; every source here
turns its cloud's answer into one ``Notice`` with a deadline (``time.monotonic()``
seconds by which the machine is gone):

* ``GceMetadata``: ``instance/preempted`` turns ``TRUE`` about 30 s before a Spot or
  preemptible VM is stopped; ``instance/maintenance-event`` turns
  ``TERMINATE_ON_HOST_MAINTENANCE`` 60 s before a VM that cannot live-migrate is
  stopped (``MIGRATE_ON_HOST_MAINTENANCE`` is a live migration: the VM keeps running,
  no notice). Every request carries ``Metadata-Flavor: Google`` and every answer must
  carry it back, so a proxy or another server is never taken for the metadata server.
* ``AwsSpot``: IMDSv2. A session token from ``PUT /latest/api/token`` (header
  ``X-aws-ec2-metadata-token-ttl-seconds``), then ``GET
  /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 while
  nothing is planned; ``{"action": "terminate"|"stop"|"hibernate", "time":
  "2017-09-18T08:22:00Z"}`` about two minutes ahead. A 401 (expired token) fetches a
  new token once.
* ``AzureScheduledEvents``: ``GET /metadata/scheduledevents?api-version=2020-07-01``
  with ``Metadata: true``; an event of type ``Preempt`` (Spot eviction, >= 30 s
  notice) or ``Terminate`` (scale-set deletion) whose ``Resources`` name this VM, with
  its ``NotBefore`` time (RFC 1123; empty once the event started). The VM's name comes
  from ``/metadata/instance/compute/name`` (the host name when that fails).

Endpoints are constructor arguments (``fault_tolerance.preemption_notices.*_endpoint``),
so tests run fake metadata servers on 127.0.0.1. Requests go straight to the endpoint,
never through an ``http_proxy``, with a short timeout; an answer is read up to
``MAX_ANSWER_BYTES`` and anything unexpected raises ``NoticeSourceError`` (the poller logs
it and asks again at the next interval).

Kubernetes (SIGTERM with ``terminationGracePeriodSeconds``) and Ray node drains are
not HTTP sources: the ``PreemptionWatcher`` handles them, and builds their ``Notice``
with the same class.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Protocol

from orchestrator.cluster.errors import ClusterError

GCE_ENDPOINT = "http://metadata.google.internal/computeMetadata/v1"
AWS_ENDPOINT = "http://169.254.169.254"
AZURE_ENDPOINT = "http://169.254.169.254"
REQUEST_TIMEOUT_S = 2.0
MAX_ANSWER_BYTES = 64 * 1024  # metadata answers are a few bytes; never read a hostile stream


class NoticeSourceError(ClusterError):
    """A metadata service could not be asked, or answered something this source does not understand."""


@dataclasses.dataclass(frozen=True)
class Notice:
    """The machine (or some Ray nodes) will be taken away.

    ``deadline``: ``time.monotonic()`` seconds by which it is gone (None: not said).
    ``node_ids``: the Ray nodes concerned; empty = the machine this driver runs on, i.e.
    the whole job must stop.
    """

    source: str
    reason: str
    deadline: float | None = None
    node_ids: frozenset[str] = frozenset()

    def seconds_left(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now


class NoticeSource(Protocol):
    """One way a cloud announces preemption; ``poll`` asks once."""

    name: str

    def poll(self) -> Notice | None:
        """The notice, if one is out; raises ``NoticeSourceError`` when the service cannot tell."""


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, headers: Mapping[str, str], timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    """One request, straight to ``url``; HTTP error statuses are answers, not exceptions."""
    request = urllib.request.Request(url, method=method, headers=dict(headers), data=b"" if method == "PUT" else None)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers), response.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, dict(exc.headers or {}), exc.read(MAX_ANSWER_BYTES))
    except (OSError, ValueError) as exc:  # refused, timed out, unresolvable, malformed URL
        raise NoticeSourceError(f"{method} {url}: {type(exc).__name__}: {exc}") from None


def wall_to_monotonic(epoch_s: float, clock: Callable[[], float], wall: Callable[[], float]) -> float:
    """A wall-clock (Unix) time as ``clock()`` seconds."""
    return clock() + (epoch_s - wall())


# ---------------------------------------------------------------------------- GCE
class GceMetadata:
    """Google Compute Engine: ``instance/preempted`` and ``instance/maintenance-event``."""

    name = "gce"
    PREEMPTION_NOTICE_S = 30.0   # Spot / preemptible VMs: ACPI soft-off 30 s after the flag turns TRUE
    MAINTENANCE_NOTICE_S = 60.0  # the maintenance-event value changes 60 s before the maintenance

    def __init__(self, endpoint: str = GCE_ENDPOINT, clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint.rstrip("/")
        self.clock = clock

    def poll(self) -> Notice | None:
        if self._get("instance/preempted").strip().upper() == "TRUE":
            return Notice(self.name, "GCE is preempting this VM (instance/preempted is TRUE)",
                          self.clock() + self.PREEMPTION_NOTICE_S)
        event = self._get("instance/maintenance-event").strip()
        if event.startswith("TERMINATE"):
            return Notice(self.name, f"GCE host maintenance will stop this VM (instance/maintenance-event is {event})",
                          self.clock() + self.MAINTENANCE_NOTICE_S)
        return None

    def _get(self, key: str) -> str:
        url = f"{self.endpoint}/{key}"
        answer = http("GET", url, {"Metadata-Flavor": "Google"})
        if answer.status != 200:
            raise NoticeSourceError(f"GET {url}: HTTP {answer.status}")
        if _header(answer.headers, "Metadata-Flavor") != "Google":
            raise NoticeSourceError(f"GET {url}: the answer lacks 'Metadata-Flavor: Google'; "
                                    f"not the GCE metadata server")
        return answer.text()


# ---------------------------------------------------------------------------- AWS
class AwsSpot:
    """EC2 Spot interruption notice through IMDSv2 (session token, then instance-action)."""

    name = "aws"
    TOKEN_TTL_S = 21600  # the longest IMDSv2 allows

    def __init__(self, endpoint: str = AWS_ENDPOINT, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.endpoint = endpoint.rstrip("/")
        self.clock, self.wall = clock, wall
        self._token: str | None = None
        self._token_expires = 0.0

    def poll(self) -> Notice | None:
        url = f"{self.endpoint}/latest/meta-data/spot/instance-action"
        answer = self._get(url)
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise NoticeSourceError(f"GET {url}: HTTP {answer.status}")
        action = _json_object(answer, url)
        deadline = wall_to_monotonic(_iso_utc(action.get("time"), url), self.clock, self.wall)
        return Notice(self.name, f"EC2 Spot interruption: {action.get('action', '?')} at {action.get('time')}",
                      deadline)

    def _get(self, url: str) -> Answer:
        answer = http("GET", url, {"X-aws-ec2-metadata-token": self._session_token()})
        if answer.status == 401:  # the token expired or was revoked: one fresh try
            self._token = None
            answer = http("GET", url, {"X-aws-ec2-metadata-token": self._session_token()})
        return answer

    def _session_token(self) -> str:
        if self._token is None or self.clock() >= self._token_expires:
            url = f"{self.endpoint}/latest/api/token"
            answer = http("PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
            if answer.status != 200 or not answer.body.strip():
                raise NoticeSourceError(f"PUT {url}: HTTP {answer.status}; no IMDSv2 session token")
            self._token = answer.text().strip()
            self._token_expires = self.clock() + self.TOKEN_TTL_S - 60
        return self._token


# ---------------------------------------------------------------------------- Azure
class AzureScheduledEvents:
    """Azure Scheduled Events: a ``Preempt`` (Spot eviction) or ``Terminate`` event for this VM."""

    name = "azure"
    API_VERSION = "2020-07-01"
    EVENT_TYPES = ("Preempt", "Terminate")

    def __init__(self, endpoint: str = AZURE_ENDPOINT, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.endpoint = endpoint.rstrip("/")
        self.clock, self.wall = clock, wall
        self._vm_name: str | None = None

    def poll(self) -> Notice | None:
        url = f"{self.endpoint}/metadata/scheduledevents?api-version={self.API_VERSION}"
        answer = http("GET", url, {"Metadata": "true"})
        if answer.status != 200:
            raise NoticeSourceError(f"GET {url}: HTTP {answer.status}")
        events = _json_object(answer, url).get("Events") or []
        ours = [e for e in events if isinstance(e, dict) and e.get("EventType") in self.EVENT_TYPES
                and self._concerns_this_vm(e)]
        if not ours:
            return None
        deadline = min(self._deadline(e, url) for e in ours)
        event = ours[0]
        return Notice(self.name, f"Azure scheduled event {event.get('EventType')} {event.get('EventId', '?')} "
                                 f"({event.get('EventStatus', '?')}, not before {event.get('NotBefore') or 'now'})",
                      deadline)

    def _deadline(self, event: Mapping[str, Any], url: str) -> float:
        not_before = event.get("NotBefore") or ""
        if not not_before:  # the event has started
            return self.clock()
        try:
            when = email.utils.parsedate_to_datetime(str(not_before))
        except (TypeError, ValueError):
            raise NoticeSourceError(f"GET {url}: NotBefore {not_before!r} is not an RFC 1123 date") from None
        return wall_to_monotonic(when.timestamp(), self.clock, self.wall)

    def _concerns_this_vm(self, event: Mapping[str, Any]) -> bool:
        resources = event.get("Resources") or []
        return not resources or self.vm_name() in resources

    def vm_name(self) -> str:
        if self._vm_name is None:
            url = f"{self.endpoint}/metadata/instance/compute/name?api-version=2021-02-01&format=text"
            try:
                answer = http("GET", url, {"Metadata": "true"})
                name = answer.text().strip() if answer.status == 200 else ""
            except NoticeSourceError:
                name = ""
            self._vm_name = name or socket.gethostname()
        return self._vm_name


# ---------------------------------------------------------------------------- helpers
def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def _json_object(answer: Answer, url: str) -> dict:
    try:
        value = json.loads(answer.body)
    except ValueError:
        raise NoticeSourceError(f"GET {url}: the answer is not JSON: {answer.text()[:80]!r}") from None
    if not isinstance(value, dict):
        raise NoticeSourceError(f"GET {url}: expected a JSON object, got {type(value).__name__}")
    return value


def _iso_utc(text: Any, url: str) -> float:
    """``2017-09-18T08:22:00Z`` -> Unix seconds."""
    try:
        when = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise NoticeSourceError(f"GET {url}: time {text!r} is not YYYY-MM-DDThh:mm:ssZ") from None
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def cloud_sources(settings) -> list[NoticeSource]:
    """The metadata sources a ``PreemptionNoticesConfig`` turns on, in a fixed order."""
    sources: list[NoticeSource] = []
    if settings.gce:
        sources.append(GceMetadata(settings.gce_endpoint))
    if settings.aws:
        sources.append(AwsSpot(settings.aws_endpoint))
    if settings.azure:
        sources.append(AzureScheduledEvents(settings.azure_endpoint))
    return sources
