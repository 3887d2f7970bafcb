"""Isolation between API tokens on the bulk jobs API, against the real gateway (gunicorn over TLS) and Redis.

A job belongs to the token that created it (gateway/jobs_api.py): another token gets 404 ``unknown_job`` on
every endpoint of it and does not see it listed. Tokens never expire (they are static: DENSECAP_API_TOKENS or
the generated var/token); what exists is tested: a token removed from the list stops working at the gateway's
next start. Secrets in logs: tests/test_reliability_faults.py; live sessions' isolation:
tests/test_gateway_live.py and the load test (no result reaches another session).
"""

from __future__ import annotations

import pytest

from conftest import RedisServer
from faultstack import OTHER_TOKEN, TOKEN, SystemStack
from client.jobs_client import ApiError, UploadFile


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    redis_server = RedisServer(tmp)
    s = SystemStack(tmp, redis_server, None, DENSECAP_REDIS_PASSWORD="")
    try:
        s.start_gateway()
        yield s
    finally:
        s.close()
        redis_server.kill()


def test_a_job_is_visible_only_to_the_token_that_created_it(stack):
    mine, theirs = stack.jobs_client(TOKEN, retry_for_s=5), stack.jobs_client(OTHER_TOKEN, retry_for_s=5)
    job = mine.create_job("private")["id"]
    reply = mine.upload(job, [UploadFile("notes.txt", b"not an image")])  # rejected at once: an error result
    assert reply["rejected"] and mine.results(job)["results"][0]["name"] == "notes.txt"
    their_job = theirs.create_job("theirs")["id"]

    calls = {"status": lambda c: c.status(job), "results": lambda c: c.results(job),
             "manifest": lambda c: c.manifest(job, [{"name": "a.jpg", "sha256": "0" * 64, "size": 1}]),
             "upload": lambda c: c.upload(job, [UploadFile("b.txt", b"x")]), "seal": lambda c: c.seal(job),
             "cancel": lambda c: c.cancel(job)}
    for name, call in calls.items():
        with pytest.raises(ApiError) as info:
            call(theirs)
        assert (info.value.status, info.value.code) == (404, "unknown_job"), name
    listed = {j["id"] for j in theirs.request("GET", "/api/v1/jobs").json()["jobs"]}
    assert their_job in listed and job not in listed
    listed = {j["id"] for j in mine.request("GET", "/api/v1/jobs").json()["jobs"]}
    assert job in listed and their_job not in listed
    # Nothing the other token tried changed the job; its owner still reads everything.
    status = mine.status(job)
    assert status["state"] != "canceled" and status["counts"]["images"] == 1 and not status["sealed"]
    assert mine.results(job)["results"][0]["name"] == "notes.txt"


def test_a_removed_token_stops_working_at_the_next_start(stack, tmp_path):
    assert stack.get("/auth/check", {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 200
    rotated = SystemStack(tmp_path, stack.redis_server, None, DENSECAP_REDIS_PASSWORD="", DENSECAP_API_TOKENS=TOKEN)
    rotated.start_gateway()
    try:
        assert rotated.get("/auth/check", {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 401
        assert rotated.get("/auth/check", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        for bad in ("", " ", TOKEN[:-1], TOKEN + " x", TOKEN.upper(), f"{TOKEN},{TOKEN}"):
            assert rotated.get("/auth/check", {"Authorization": f"Bearer {bad}"})[0] == 401, repr(bad)
    finally:
        rotated.close()
