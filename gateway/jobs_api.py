"""Bulk jobs over REST: ``/api/v1/jobs`` (token required) and the upload page ``/jobs/`` (no token to load it).

The contract is written out in ``docs/jobs-api.md``; the state lives in Redis through
``densecap_core.jobs.JobStore``; chunks go to RQ queue ``settings.jobs_queue`` and are captioned by
``python -m worker.job_worker``. Errors are JSON ``{"error": {"code", "message", ...}}`` with the HTTP
status of the ``JobError`` raised (400, 404, 409, 413, 429), 401 for a missing or wrong token and 503 when
Redis cannot be reached. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, abort, current_app, jsonify, redirect, request, send_from_directory

from densecap_core import jobs
from densecap_core.imageio import ImageError, peek_size
from densecap_core.jobs import BadItem, JobError, JobLimits, JobStore, UnknownJob
from gateway import auth
from gateway.app import error_response, get_redis, get_settings, require_token

log = logging.getLogger("densecap.gateway.jobs")

bp = Blueprint("jobs_api", __name__)

PAGE_DIR = Path(__file__).resolve().parents[1] / "client" / "static" / "jobs"
API = "/api/v1/jobs"
#: Items one manifest request may carry (the client sends its folder in slices of this size).
MAX_MANIFEST_ITEMS = 5000
#: Multipart overhead allowed on top of one maximal image.
MULTIPART_SLACK_BYTES = 1024 * 1024
MAX_PAGE = 2000
EXTENSION = "densecap_jobs"  # key of the job store in app.extensions


class NotMultipart(JobError):
    status, code = 415, "unsupported_media_type"


def _store() -> JobStore:
    """The app's job store: one per application (scripts registered once) over its thread-safe Redis client."""
    store = current_app.extensions.get(EXTENSION)
    if store is None:
        store = current_app.extensions[EXTENSION] = JobStore(get_redis(), JobLimits.from_settings(get_settings()))
    return store


def _owner() -> str:
    """Who is asking: a hash of the request's API token (the token itself is never stored)."""
    return hashlib.sha256(auth.presented_token(request).encode()).hexdigest()[:32]


def _check_owner(store: JobStore, job_id: str) -> None:
    """A job is visible only to the token that created it (jobs made without an owner: to every token).

    Another token gets 404 ``unknown_job``, as for a job that does not exist (never 403, which would confirm
    that the id exists).
    """
    owner = store.meta(job_id).get("owner", "")
    if owner and owner != _owner():
        raise UnknownJob(f"no job with id {job_id!r} for this API token (a job belongs to the token that "
                         "created it)")


def _limits_body(limits: JobLimits) -> dict[str, int]:
    return {"chunk_size": limits.chunk_size, "max_image_bytes": limits.max_image_bytes,
            "max_image_pixels": limits.max_image_pixels, "backlog_bytes": limits.backlog_bytes,
            "max_request_bytes": limits.max_image_bytes + MULTIPART_SLACK_BYTES,
            "max_manifest_items": MAX_MANIFEST_ITEMS}


def _status_body(store: JobStore, job_id: str) -> dict[str, Any]:
    body = store.status(job_id)
    body["limits"] = _limits_body(store.limits)
    body["urls"] = {"self": f"{API}/{job_id}", "manifest": f"{API}/{job_id}/manifest",
                    "images": f"{API}/{job_id}/images", "seal": f"{API}/{job_id}/seal",
                    "results": f"{API}/{job_id}/results", "cancel": f"{API}/{job_id}/cancel"}
    return body


@bp.errorhandler(JobError)
def _job_error(exc: JobError):
    response, status = error_response(exc.status, exc.code, exc.message, **exc.extra)
    if exc.status == 429:
        response.headers["Retry-After"] = str(exc.extra.get("retry_after", 2))
    return response, status


@bp.errorhandler(redis.ConnectionError)
@bp.errorhandler(redis.TimeoutError)
def _redis_down(exc):
    log.warning("jobs API: Redis unreachable: %s", exc)
    response, status = error_response(503, "redis_unreachable",
                                      "the job store (Redis) is unreachable; retry in a few seconds")
    response.headers["Retry-After"] = "2"
    return response, status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None and request.content_length:
        raise JobError("the request body is not valid JSON; send Content-Type: application/json")
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise JobError("the request body must be a JSON object")
    return body


# --- API -------------------------------------------------------------------------------------------------


@bp.post(API)
@require_token
def create_job():
    """``{"label"?: str}`` -> 201 with the job's status, limits and URLs."""
    body = _json_body()
    label = body.get("label", "")
    if not isinstance(label, str):
        raise JobError("'label' must be a string")
    store = _store()
    job_id = store.create(label, owner=_owner())
    response = jsonify(_status_body(store, job_id))
    response.headers["Location"] = f"{API}/{job_id}"
    return response, 201


@bp.get(API)
@require_token
def list_jobs():
    store = _store()
    out = []
    for job_id in store.list_jobs(limit=_int_arg("limit", 50, 1, 500), owner=_owner()):
        try:
            out.append(store.status(job_id))
        except jobs.UnknownJob:
            continue  # expired since it was listed
    return jsonify({"jobs": out})


@bp.get(f"{API}/<job_id>")
@require_token
def job_status(job_id: str):
    _check_owner(_store(), job_id)
    return jsonify(_status_body(_store(), job_id))


@bp.post(f"{API}/<job_id>/manifest")
@require_token
def manifest(job_id: str):
    """Register items by hash before uploading: which of these does the server still need?

    ``{"items": [{"name", "sha256", "size"}]}`` -> ``{"items": [{"name", "sha256", "status"}]}`` where
    status is ``done`` (has a result), ``queued`` (bytes held, being captioned), ``need`` (upload it) or
    ``rejected`` (over the size limit: recorded as an error result).
    """
    _check_owner(_store(), job_id)
    store = _store()
    store.require_open(job_id)
    items = _json_body().get("items")
    if not isinstance(items, list) or not items:
        raise JobError("send {\"items\": [{\"name\": ..., \"sha256\": ..., \"size\": ...}, ...]}")
    if len(items) > MAX_MANIFEST_ITEMS:
        raise JobError(f"at most {MAX_MANIFEST_ITEMS} items per manifest request; split the list")
    checked = []
    for item in items:
        if not isinstance(item, dict):
            raise JobError("each item must be an object {\"name\", \"sha256\", \"size\"}")
        name = jobs.validate_item_name(item.get("name"))
        sha = item.get("sha256")
        if not isinstance(sha, str) or not jobs.SHA256_RE.match(sha):
            raise BadItem(f"item {name!r}: 'sha256' must be 64 lowercase hexadecimal digits")
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadItem(f"item {name!r}: 'size' must be the file's size in bytes")
        checked.append((name, sha, size))
    out = []
    to_register = []
    for name, sha, size in checked:
        if size > store.limits.max_image_bytes:
            store.record_rejected(job_id, name, sha, _too_big(size, store.limits))
            out.append({"name": name, "sha256": sha, "status": "rejected"})
        else:
            to_register.append((name, sha))
    statuses = store.register(job_id, to_register)
    out += [{"name": n, "sha256": s, "status": st} for (n, s), st in zip(to_register, statuses)]
    return jsonify({"items": out})


def _too_big(size: int, limits: JobLimits) -> str:
    return (f"file is {size} bytes, over the per-image limit of {limits.max_image_bytes} bytes; "
            "resize or recompress it")


def _image_problem(data: bytes, limits: JobLimits) -> str | None:
    """Why these bytes cannot be captioned (checked from the header only), or None."""
    if len(data) > limits.max_image_bytes:
        return _too_big(len(data), limits)
    try:
        width, height = peek_size(data)
    except ImageError as exc:  # unreadable, or a decompression bomb refused from its header
        return str(exc)
    if width * height > limits.max_image_pixels:
        return (f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
                f"{limits.max_image_pixels / 1e6:.1f} MP; resize it")
    return None


@bp.post(f"{API}/<job_id>/images")
@require_token
def upload_images(job_id: str):
    """Multipart fields named ``file`` (filename = item name, e.g. ``sub/a.jpg``); one request <= one chunk.

    Each file is hashed, checked (bytes, header, pixels), registered and, unless its bytes are already
    done or queued, stored and enqueued. A file that is not a usable image gets an error result (the job
    goes on); a bad *name* refuses the whole request (400) before anything is stored.
    """
    _check_owner(_store(), job_id)
    store = _store()
    meta = store.require_open(job_id)
    store.check_backlog(job_id, meta)
    request.max_content_length = store.limits.max_image_bytes + MULTIPART_SLACK_BYTES
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise NotMultipart("send images as multipart/form-data, one field named 'file' per image")
    files = request.files.getlist("file")
    if not files:
        raise JobError("no files in the request: use multipart fields named 'file' whose filename is the "
                       "image's path relative to the submitted folder")
    names = [jobs.validate_item_name(f.filename) for f in files]
    if len(set(names)) != len(names):
        raise BadItem("the same file name appears twice in one request")
    accepted, rejected, good = [], [], []
    for name, storage in zip(names, files):
        data = storage.read()
        sha = jobs.sha256_hex(data)
        problem = _image_problem(data, store.limits)
        if problem:
            store.record_rejected(job_id, name, sha, problem)
            rejected.append({"name": name, "sha256": sha, "error": problem})
        else:
            good.append((name, sha, data))
    statuses = store.register(job_id, [(n, s) for n, s, _ in good])
    need: dict[str, int] = {}
    for (name, sha, data), status in zip(good, statuses):
        if status == "need" and sha not in need:
            store.put_blob(job_id, sha, data)
            need[sha] = len(data)
        accepted.append({"name": name, "sha256": sha, "status": "queued" if status == "need" else status})
    chunk_ids = jobs.enqueue_chunks(store, get_settings().jobs_queue, job_id, need)
    return jsonify({"accepted": accepted, "rejected": rejected, "chunks": len(chunk_ids)})


@bp.post(f"{API}/<job_id>/seal")
@require_token
def seal(job_id: str):
    """No more items: the job finishes once every item has a result. 409 lists items still lacking bytes."""
    _check_owner(_store(), job_id)
    store = _store()
    missing = store.seal(job_id)
    if missing:
        return error_response(409, "items_missing",
                              f"{len(missing)} registered item(s) have neither bytes nor a result; upload them "
                              "(POST .../images) before sealing", missing=missing[:100], missing_count=len(missing))
    return jsonify(_status_body(store, job_id))


@bp.post(f"{API}/<job_id>/cancel")
@require_token
def cancel(job_id: str):
    """Stop the job: waiting chunks are removed from RQ, a running chunk stops after its current batch."""
    _check_owner(_store(), job_id)
    store = _store()
    chunk_ids = store.cancel(job_id)
    removed = jobs.cancel_chunks(store.r, chunk_ids)
    body = _status_body(store, job_id)
    body["chunks_removed"] = removed
    return jsonify(body)


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise JobError(f"query parameter {name!r} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise JobError(f"query parameter {name!r} must be between {lo} and {hi}")
    return value


@bp.get(f"{API}/<job_id>/results")
@require_token
def results(job_id: str):
    """Results in arrival order from ``cursor``. JSON page (``limit``) or, with ``format=jsonl``, every
    result from ``cursor`` as JSON lines (header ``X-Next-Cursor``)."""
    _check_owner(_store(), job_id)
    store = _store()
    status = store.status(job_id)
    cursor = _int_arg("cursor", 0, 0, 1 << 40)
    fmt = request.args.get("format", "json")
    if fmt == "jsonl":
        end = status["counts"]["results"]

        def lines():
            at = cursor
            while at < end:
                records, nxt = store.results_page(job_id, at, min(MAX_PAGE, end - at))
                for record in records:
                    yield json.dumps(record, separators=(",", ":")) + "\n"
                if nxt == at:
                    break
                at = nxt

        response = Response(lines(), mimetype="application/x-ndjson")
        response.headers["X-Next-Cursor"] = str(max(end, cursor))
        response.headers["X-Job-State"] = status["state"]
        return response
    if fmt != "json":
        raise JobError("query parameter 'format' must be 'json' or 'jsonl'")
    limit = _int_arg("limit", 500, 1, MAX_PAGE)
    records, next_cursor = store.results_page(job_id, cursor, limit)
    complete = status["state"] in ("finished", "canceled") and next_cursor >= status["counts"]["results"]
    return jsonify({"results": records, "next_cursor": next_cursor, "state": status["state"],
                    "complete": complete})


# --- the upload page -------------------------------------------------------------------------------------


@bp.get("/jobs")
def page_no_slash():
    return redirect("/jobs/", code=301)


@bp.get("/jobs/")
def page():
    return _send_page("index.html")


@bp.get("/jobs/<path:filename>")
def page_asset(filename: str):
    return _send_page(filename)


def _send_page(filename: str):
    if not (PAGE_DIR / "index.html").is_file():
        abort(404, description="the jobs page is not installed (client/static/jobs is missing)")
    response = send_from_directory(PAGE_DIR, filename, max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
