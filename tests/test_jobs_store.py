"""Bulk-job state on a real redis-server (no gateway, no model): the job store's guarantees, item-name
safety, upload packing and folder scanning. Fast; imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env
from densecap_core import protocol
from densecap_core.jobs import (BadItem, Backlogged, JobCanceled, JobLimits, JobStore, UnknownJob,
                                completion_rate, sha256_hex, validate_item_name)
from densecap_core.schema import ImageResult, Region


@pytest.fixture
def store(redis_server):
    return JobStore(redis_server.client(), JobLimits(chunk_size=2, backlog_bytes=100))


def ok_result(n: int = 2) -> ImageResult:
    return ImageResult(name="x", width=64, height=48,
                       regions=[Region(box=(1, 2, 3, 4), caption=f"thing {i}", score=1.0 - i / 10) for i in range(n)])


@pytest.mark.parametrize("name", ["a.jpg", "sub/b.png", "deep/er/c d.JPG", "ünïcode/ß.jpg", ".hidden.jpg"])
def test_safe_names_pass(name):
    assert validate_item_name(name) == name


@pytest.mark.parametrize("name", ["", "../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "a\\b.jpg",
                                  "a//b.jpg", "./a.jpg", "a/.", "dir/", "a\x00b", "tab\there", 5, None,
                                  "x" * 2000])
def test_unsafe_names_are_refused_with_a_reason(name):
    with pytest.raises(BadItem) as info:
        validate_item_name(name)
    assert info.value.status == 400 and len(info.value.message) > 20


def test_register_then_results_follow_the_content_hash(store):
    job = store.create("t")
    a, b = sha256_hex(b"A"), sha256_hex(b"B")
    # two names share bytes A: one upload, one computation, two results
    assert store.register(job, [("a.jpg", a), ("copy/a.jpg", a), ("b.jpg", b)]) == ["need", "need", "need"]
    assert store.mark_queued(job, {a: 10, b: 20}) == 2
    assert store.register(job, [("a.jpg", a)]) == ["queued"]
    assert store.status(job)["backlog_bytes"] == 30
    assert store.store_result(job, a, ok_result()) == 1
    st = store.status(job)
    assert st["counts"] == {"images": 3, "done": 2, "failed": 0, "pending": 1, "queued_unique": 1, "results": 2}
    assert st["backlog_bytes"] == 20 and st["state"] == "running"
    records, cursor = store.results_page(job, 0, 10)
    assert sorted(r["name"] for r in records) == ["a.jpg", "copy/a.jpg"] and cursor == 2
    assert all(r["sha256"] == a and r["regions"][0]["caption"] == "thing 0" for r in records)
    # a third name for bytes already done is done at once and joins the log
    assert store.register(job, [("again/a.jpg", a)]) == ["done"]
    records, cursor = store.results_page(job, cursor, 10)
    assert [r["name"] for r in records] == ["again/a.jpg"] and cursor == 3


def test_a_rerun_overwrites_and_never_duplicates(store):
    job = store.create()
    a = sha256_hex(b"A")
    store.register(job, [("a.jpg", a)])
    assert store.store_result(job, a, ok_result(1)) == 1
    assert store.store_result(job, a, ok_result(3)) == 0  # a retried chunk
    records, cursor = store.results_page(job, 0, 100)
    assert cursor == 1 and len(records) == 1 and len(records[0]["regions"]) == 3
    st = store.status(job)
    assert st["counts"]["done"] == 1 and st["counts"]["results"] == 1 and st["computed"] == 2
    # an error written on a worker's behalf never replaces a real result
    assert store.store_result(job, a, ImageResult("a", 0, 0, error="lost"), only_if_absent=True) == 0
    assert "error" not in store.results_page(job, 0, 1)[0][0]


def test_changed_bytes_under_the_same_name(store):
    job = store.create()
    old, new = sha256_hex(b"old"), sha256_hex(b"new")
    store.register(job, [("a.jpg", old)])
    store.store_result(job, old, ok_result())
    assert store.register(job, [("a.jpg", new)]) == ["need"]
    st = store.status(job)
    assert st["counts"]["done"] == 0 and st["counts"]["pending"] == 1
    store.store_result(job, new, ImageResult("a", 0, 0, error="bad"))
    records, _ = store.results_page(job, 0, 10)
    # the name is listed again with its new result (last wins); the old entry now shows the new result
    assert [r["sha256"] for r in records] == [new, new] and records[-1]["error"] == "bad"
    assert store.status(job)["counts"]["failed"] == 1


def test_rejected_items_are_results_and_seal_needs_bytes(store):
    job = store.create()
    store.record_rejected(job, "notes.txt", sha256_hex(b"text"), "not an image")
    store.register(job, [("lost.jpg", sha256_hex(b"never uploaded"))])
    assert store.seal(job) == ["lost.jpg"]
    assert store.status(job)["sealed"] is False
    store.store_result(job, sha256_hex(b"never uploaded"), ok_result())
    assert store.seal(job) == []
    st = store.status(job)
    assert st["state"] == "finished" and st["counts"]["failed"] == 1 and st["counts"]["done"] == 2


def test_seal_never_reports_an_item_a_worker_finishes_meanwhile(store):
    """Seal while a worker moves items from queued to done: every item always has bytes queued or a result."""
    import threading

    job = store.create()
    shas = [sha256_hex(f"img{i}".encode()) for i in range(400)]
    store.register(job, [(f"{i}.jpg", sha) for i, sha in enumerate(shas)])
    store.mark_queued(job, {sha: 1 for sha in shas})
    worker = JobStore(store.r, store.limits)  # its own store object, as a job worker process has

    def finish_all():
        for sha in shas:
            worker.store_result(job, sha, ok_result(1))

    thread = threading.Thread(target=finish_all)
    thread.start()
    reported = []
    while thread.is_alive():
        reported += store.seal(job)
    thread.join()
    assert reported == [] and store.seal(job) == []
    assert store.status(job)["state"] == "finished"


def test_backlog_limit_and_cancel(store):
    job = store.create()
    a = sha256_hex(b"A")
    store.register(job, [("a.jpg", a)])
    store.put_blob(job, a, b"A" * 150)
    store.mark_queued(job, {a: 150})
    with pytest.raises(Backlogged) as info:
        store.check_backlog(job)
    assert info.value.status == 429
    store.add_chunk(job, "chunk-1")
    assert store.cancel(job) == ["chunk-1"]
    r = store.r
    assert not r.exists(protocol.job_blob_key(job, a)) and not r.exists(protocol.job_queued_key(job))
    assert store.status(job)["state"] == "canceled" and store.is_canceled(job)
    with pytest.raises(JobCanceled):
        store.require_open(job)
    store.check_backlog(job)  # nothing held any more


def test_unknown_and_malformed_job_ids(store):
    for job_id in ("nope", "0" * 32, "../" + "a" * 29):
        with pytest.raises(UnknownJob) as info:
            store.status(job_id)
        assert info.value.status == 404
    with pytest.raises(UnknownJob):
        store.register("f" * 32, [("a.jpg", sha256_hex(b"a"))])


def test_job_keys_expire(redis_server):
    store = JobStore(redis_server.client(), JobLimits(job_ttl_s=100))
    job = store.create()
    a = sha256_hex(b"A")
    store.register(job, [("a.jpg", a)])
    store.store_result(job, a, ok_result())
    ttls = [store.r.ttl(k) for k in protocol.job_keys(job) if store.r.exists(k)]
    assert ttls and all(0 < t <= 100 for t in ttls)


def test_completion_rate():
    now = 1000.0
    assert completion_rate([], now) == 0.0
    assert completion_rate([999.0, 998.0, 997.0, 996.0], now) == pytest.approx(1.0)  # 4 in the last 4 s
    assert completion_rate([100.0, 90.0, 80.0], now) == pytest.approx(0.1)  # old: the pace it ran at
    assert completion_rate([500.0], now) == 0.0


def test_pack_uploads_respects_count_and_bytes():
    from client.submit import LocalImage, pack_uploads
    images = [LocalImage(f"{i}.jpg", Path(f"{i}.jpg"), size) for i, size in enumerate([10, 10, 10, 5000, 10, 10])]
    batches = pack_uploads(images, chunk_size=2, max_request_bytes=4000)
    assert [[im.name for im in b] for b in batches] == [["0.jpg", "1.jpg"], ["2.jpg"], ["3.jpg"], ["4.jpg", "5.jpg"]]


def test_scan_folder_skips_dotfiles_and_the_output(tmp_path):
    from client.submit import scan_folder
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "out").mkdir()
    for rel in ("a.jpg", "sub/b.jpg", "sub/deeper/c.txt", ".dot.jpg", ".git/x.jpg", "out/results.json", "sub/.d"):
        (tmp_path / rel).write_bytes(b"x")
    names = [im.name for im in scan_folder(tmp_path, exclude=tmp_path / "out")]
    assert names == ["a.jpg", "sub/b.jpg", "sub/deeper/c.txt"]


def test_the_gateway_and_client_side_import_no_torch():
    code = ("import sys, gateway.jobs_api, client.submit, densecap_core.jobs, worker.jobs; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True, timeout=60)
