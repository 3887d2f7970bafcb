"""METEOR 1.5 through the real jar and a real JVM (skipped, with the reason, where Java is missing)."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import pytest

from densecap_core.evaluation.meteor import JAVA_MISSING, MeteorError, MeteorScorer, clean_text

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: METEOR needs Java 17 (scripts/setup installs it)")


def test_clean_text_removes_protocol_separators_and_line_breaks():
    assert clean_text("a ||| b\nc\r\n  d") == "a b c d"
    assert clean_text("  plain  ") == "plain"


def test_missing_java_gives_a_clear_error():
    with pytest.raises(MeteorError) as info:
        MeteorScorer(java="no-such-java-binary-here")
    assert str(info.value) == JAVA_MISSING
    assert "openjdk-17-jre-headless" in str(info.value)


@pytest.fixture(scope="module")
def scorer():
    with MeteorScorer() as meteor:
        yield meteor
    assert meteor.pid is None  # closed: no JVM left behind


@needs_java
@pytest.mark.java
@pytest.mark.slow
def test_identical_caption_scores_about_one_and_unrelated_scores_low(scorer):
    same, unrelated, empty = scorer.score([
        ("a man riding a horse", ["a man riding a horse"]),
        ("a man riding a horse", ["green leaves on a tree"]),
        ("a man riding a horse", []),
    ])
    assert same == pytest.approx(1.0, abs=1e-6)
    assert 0 <= unrelated < 0.1
    assert empty == 0.0


@needs_java
@pytest.mark.java
@pytest.mark.slow
def test_many_pairs_through_one_jvm_match_one_by_one(scorer):
    words = "a red blue green circle square triangle next to above large small striped man hat the".split()
    pairs = [(" ".join(words[(i * 7 + k) % len(words)] for k in range(5)),
              [" ".join(words[(i * 3 + k) % len(words)] for k in range(4)), "a red circle"])
             for i in range(300)]
    pid, starts = scorer.pid, scorer.starts
    batched = scorer.score(pairs)
    assert scorer.pid == pid and scorer.starts == starts  # no new JVM for 300 pairs
    scorer.chunk_pairs = 7  # chunks that end mid-way must not shift answers between pairs
    try:
        rechunked = scorer.score(pairs[:50])
    finally:
        scorer.chunk_pairs = 128
    one_by_one = [scorer.score_one(hyp, refs) for hyp, refs in pairs[:10]]
    assert rechunked == batched[:50]
    assert one_by_one == batched[:10]
    assert len(set(batched)) > 5  # different pairs really got different scores


@needs_java
@pytest.mark.java
@pytest.mark.slow
def test_threads_share_one_scorer_safely(scorer):
    pairs = [(f"a {c} {s}", [f"the {c} {s}", "a thing"]) for c in ("red", "blue", "big") for s in ("dog", "cat")]
    expected = scorer.score(pairs)
    results, errors = {}, []

    def work(n):
        try:
            results[n] = scorer.score(pairs * 20)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(results[n] == expected * 20 for n in range(4))


@needs_java
@pytest.mark.java
@pytest.mark.slow
def test_a_dead_jvm_is_restarted_once(scorer):
    scorer.start()
    old_pid, starts = scorer.pid, scorer.starts
    os.kill(old_pid, signal.SIGKILL)
    score = scorer.score_one("a red circle", ["a red circle"])  # the broken pipe of issue #50, recovered
    assert score == pytest.approx(1.0, abs=1e-6)
    assert scorer.starts == starts + 1 and scorer.pid not in (None, old_pid)


def test_a_process_that_keeps_dying_gives_up_after_one_restart():
    # `false` exits at once, like a JVM that cannot start: one restart, then a clear error (no hang, no loop).
    scorer = MeteorScorer(java="false", timeout_s=10)
    with pytest.raises(MeteorError, match="failed twice"):
        scorer.score([("a cat", ["a cat"])])
    assert scorer.starts == 2
    scorer.close()
