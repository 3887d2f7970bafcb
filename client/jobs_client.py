"""A small Python client of the bulk jobs REST API (``/api/v1/jobs``, see ``docs/jobs-api.md``).

Thread-safe for the uploads ``densecap submit`` runs in parallel (one ``requests.Session`` per thread).
Transient trouble is retried here, so callers see only errors a user must act on:

- HTTP 429 (the job holds as many waiting images as the server allows): wait ``Retry-After``, again;
- HTTP 502/503/504 and connection errors: retried with backoff for up to ``retry_for_s`` seconds.

Every other error raises ``ApiError`` with the server's message. Torch-free.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import requests

API = "/api/v1/jobs"
#: After this long answered 429 (the job's backlog is full and not shrinking), the user is told why.
BACKLOG_NOTICE_S = 60.0


class ApiError(RuntimeError):
    """The server refused a request; ``str()`` is a sentence for the user."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None):
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status, self.code, self.message, self.body = status, code, message, body or {}


@dataclass
class UploadFile:
    name: str  # item name: path relative to the submitted folder, '/'-separated
    data: bytes


class JobsClient:
    def __init__(self, server: str, token: str, *, verify: bool | str = True, timeout_s: float = 120.0,
                 retry_for_s: float = 120.0, notice=None):
        self.server = server.rstrip("/")
        self.notice = notice  # called once with a hint when uploads have waited on 429s for a long time
        self._backlog_noticed = False
        self.token = token
        self.verify = verify
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
            self._local.session = session
        return session

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One API call with the retries described above; returns a 2xx response or raises ``ApiError``."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.5
        backlogged_since = None
        while True:
            try:
                # verify per request: a session-level value loses to $REQUESTS_CA_BUNDLE (requests#3829).
                response = self._session().request(method, self.server + path, timeout=self.timeout_s,
                                                   verify=self.verify, **kwargs)
            except requests.exceptions.SSLError as exc:
                raise ApiError(0, "tls", f"TLS verification of {self.server} failed ({exc.__class__.__name__}); "
                                         "pass --ca-cert with the gateway's certificate (var/tls/cert.pem), "
                                         "or --insecure on a trusted network") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                if time.monotonic() > deadline:
                    raise ApiError(0, "unreachable", f"cannot reach {self.server} ({exc.__class__.__name__}); "
                                                     "is the gateway running?") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if response.status_code == 429:
                backlogged_since = backlogged_since or time.monotonic()
                if time.monotonic() - backlogged_since > BACKLOG_NOTICE_S and self.notice and not self._backlog_noticed:
                    self._backlog_noticed = True
                    self.notice(f"the server has held back uploads for {BACKLOG_NOTICE_S:.0f} s because no job "
                                "worker is captioning them; is `python -m worker.job_worker` running?")
                time.sleep(_retry_after(response, 2.0))
                deadline = time.monotonic() + self.retry_for_s  # waiting for workers is progress, not trouble
                continue
            if response.status_code in (502, 503, 504) and time.monotonic() < deadline:
                time.sleep(_retry_after(response, delay))
                delay = min(delay * 2, 5.0)
                continue
            if response.status_code >= 400:
                raise _api_error(response)
            return response

    # the API, one method per endpoint

    def create_job(self, label: str = "") -> dict[str, Any]:
        return self.request("POST", API, json={"label": label}).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"{API}/{job_id}").json()

    def manifest(self, job_id: str, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.request("POST", f"{API}/{job_id}/manifest", json={"items": list(items)}).json()["items"]

    def upload(self, job_id: str, files: Iterable[UploadFile]) -> dict[str, Any]:
        parts = [("file", (f.name, f.data, "application/octet-stream")) for f in files]
        return self.request("POST", f"{API}/{job_id}/images", files=parts).json()

    def seal(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"{API}/{job_id}/seal").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"{API}/{job_id}/cancel").json()

    def results(self, job_id: str, cursor: int = 0, limit: int = 500) -> dict[str, Any]:
        return self.request("GET", f"{API}/{job_id}/results", params={"cursor": cursor, "limit": limit}).json()


def _retry_after(response: requests.Response, default: float) -> float:
    try:
        return max(0.1, min(30.0, float(response.headers.get("Retry-After", default))))
    except ValueError:
        return default


def _api_error(response: requests.Response) -> ApiError:
    try:
        body = response.json()
        err = body.get("error", {})
        if isinstance(err, dict):
            return ApiError(response.status_code, err.get("code", "error"), err.get("message", response.reason), body)
    except (ValueError, json.JSONDecodeError, AttributeError):
        pass
    return ApiError(response.status_code, "error", f"{response.reason}: {response.text[:200]}")
