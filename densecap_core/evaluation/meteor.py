"""METEOR 1.5 through one long-lived Java process, spoken to directly over its ``-stdio`` protocol.

The DenseCap metric scores every matched detection's caption against the captions of its ground-truth region with
METEOR 1.5 (``-l en -norm``), as the original did through ``eval/meteor_bridge.py``. We use the jar and paraphrase
table that ship inside the ``pycocoevalcap`` wheel (nothing is downloaded) and talk to the jar ourselves because
pycocoevalcap's own ``Meteor._score`` writes ``str`` to a binary pipe on Python 3.

The protocol (one request per line, UTF-8):

- ``SCORE ||| ref1 ||| ... ||| refN ||| hypothesis`` -> one line of 23 sufficient statistics.
- ``EVAL ||| stats1 ||| ... ||| statsK`` -> K lines with each segment's METEOR, then one line with the aggregate.

:class:`MeteorScorer` sends pairs in chunks of :data:`CHUNK_PAIRS` (all SCORE lines of a chunk, then one EVAL),
which keeps the process busy without round trips and keeps each chunk's output well under a pipe buffer, so neither
side can block the other. The first request costs ~6 s (JVM start and paraphrase table); after that a few thousand
pairs per second go through. The process holds ~1.1 GB; keep one scorer alive for a whole evaluation.
"""

from __future__ import annotations

import importlib.util
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

JAVA_MISSING = ("Java 17 is needed for METEOR: run scripts/setup or apt-get install openjdk-17-jre-headless")

# Each SCORE answer is 23 numbers of a few characters (~100 bytes); 128 of them stay far below the 64 KiB pipe
# buffer, so the JVM never blocks on a full stdout while we are still writing the chunk's requests.
CHUNK_PAIRS = 128

_SEPARATOR = re.compile(r"\|\|\||[\r\n]")
_SPACES = re.compile(r"\s+")


class MeteorError(RuntimeError):
    """METEOR cannot run (no Java, no jar) or its process failed twice in a row."""


def clean_text(text: str) -> str:
    """Make a caption safe for one protocol field: no ``|||`` separators, no line breaks, single spaces."""
    return _SPACES.sub(" ", _SEPARATOR.sub(" ", str(text))).strip()


def find_meteor_jar() -> Path:
    """Path of ``meteor-1.5.jar`` inside the installed ``pycocoevalcap`` (its ``data/paraphrase-en.gz`` is beside it)."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap.meteor")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MeteorError("pycocoevalcap is not installed; METEOR's jar ships with it: pip install pycocoevalcap "
                          "(or run scripts/setup)")
    for folder in spec.submodule_search_locations:
        jar = Path(folder) / "meteor-1.5.jar"
        if jar.is_file() and (jar.parent / "data" / "paraphrase-en.gz").is_file():
            return jar
    raise MeteorError("pycocoevalcap is installed but its meteor-1.5.jar or data/paraphrase-en.gz is missing; "
                      "reinstall it: pip install --force-reinstall pycocoevalcap")


class MeteorScorer:
    """Thread-safe METEOR 1.5 scorer backed by one ``java -jar meteor-1.5.jar - - -stdio -l en -norm`` process.

    ``score([(hypothesis, [reference, ...]), ...]) -> list[float]`` gives each pair's segment METEOR in ``[0, 1]``.
    A pair with no references scores 0.0 without asking the JVM (METEOR itself answers 0 for an empty reference).

    The process starts on the first request (or on :meth:`start`) and lives until :meth:`close` or the end of a
    ``with`` block. If it dies mid-request (the original bridge's "Broken pipe", issue #50), the scorer starts a
    fresh one and retries that chunk once; a second failure raises :class:`MeteorError` with the JVM's stderr tail.
    A missing ``java`` raises :class:`MeteorError` at construction, before any work is done.
    """

    def __init__(self, *, java: str = "java", max_heap: str = "2G", timeout_s: float = 120.0,
                 chunk_pairs: int = CHUNK_PAIRS):
        java_path = shutil.which(java)
        if java_path is None:
            raise MeteorError(JAVA_MISSING)
        self.jar = find_meteor_jar()
        self.command = [java_path, f"-Xmx{max_heap}", "-jar", str(self.jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        self.timeout_s = timeout_s  # per answer line; the first one includes JVM start (~6 s)
        self.chunk_pairs = max(1, int(chunk_pairs))
        self.starts = 0  # how many JVMs this scorer has launched (1 unless one died)
        self.pairs_scored = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._buffer = b""

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a safety net only: callers should close() or use ``with``
        try:
            self._stop()
        except Exception:
            pass

    @property
    def pid(self) -> int | None:
        """Process id of the running JVM, or None when none is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the JVM now (otherwise the first :meth:`score` does); a no-op when it is already running."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        """Stop the JVM. The scorer may be used again afterwards (a new JVM starts on demand)."""
        with self._lock:
            self._stop()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        # stderr goes to a file: a pipe nobody reads could fill up and stall the JVM; the file gives error context.
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(self.command, cwd=str(self.jar.parent), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)
        except OSError as exc:
            raise MeteorError(f"could not start METEOR ({exc}). {JAVA_MISSING}") from exc
        self._buffer = b""
        self.starts += 1

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _stderr_tail(self, limit: int = 2000) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""

    # -- protocol ------------------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a raw pipe may accept only part of a large write
            written = self._proc.stdin.write(view)
            view = view[written:]

    def _readline(self) -> str:
        """One answer line; raises EOFError if the JVM closed its output, TimeoutError if it said nothing."""
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"METEOR gave no answer within {self.timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError("METEOR closed its output (the Java process exited)")
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8").strip()

    def _score_chunk(self, pairs: Sequence[tuple[str, list[str]]]) -> list[float]:
        self._ensure_started()
        requests = "".join("SCORE ||| " + " ||| ".join(refs) + " ||| " + hyp + "\n" for hyp, refs in pairs)
        self._write(requests.encode("utf-8"))
        stats = [self._readline() for _ in pairs]
        self._write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        scores = [float(self._readline()) for _ in pairs]
        self._readline()  # the aggregate over the chunk, not needed
        return scores

    def _score_chunk_with_restart(self, pairs: Sequence[tuple[str, list[str]]]) -> list[float]:
        for attempt in (1, 2):
            try:
                return self._score_chunk(pairs)
            except (OSError, EOFError, TimeoutError, ValueError) as exc:
                # OSError covers BrokenPipeError; ValueError a garbled answer. Either way the stream is out of
                # step, so this JVM is finished: start over with a fresh one, once.
                detail = self._stderr_tail()
                if self._proc is not None:
                    self._proc.kill()
                self._stop()
                if attempt == 2:
                    msg = f"METEOR failed twice ({type(exc).__name__}: {exc})"
                    raise MeteorError(msg + (f"; Java said:\n{detail}" if detail else "")) from exc
        raise AssertionError("unreachable")

    # -- public --------------------------------------------------------------------------------------------------

    def score(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> list[float]:
        """METEOR of each ``(hypothesis, references)`` pair, in order. Thread-safe; texts are cleaned first."""
        cleaned = [(clean_text(hyp), [clean_text(r) for r in refs]) for hyp, refs in pairs]
        results = [0.0] * len(cleaned)
        todo = [i for i, (_, refs) in enumerate(cleaned) if refs]
        for k in range(0, len(todo), self.chunk_pairs):
            index = todo[k:k + self.chunk_pairs]
            with self._lock:
                scores = self._score_chunk_with_restart([cleaned[i] for i in index])
                self.pairs_scored += len(index)
            for i, value in zip(index, scores):
                results[i] = value
        return results

    def score_one(self, hypothesis: str, references: Sequence[str]) -> float:
        """METEOR of one pair (convenience; :meth:`score` is faster for many)."""
        return self.score([(hypothesis, references)])[0]


def benchmark(num_pairs: int = 5000, references: int = 3, seed: int = 0, chunk_pairs: int | None = None) -> dict:
    """Time JVM start-up and steady-state throughput on synthetic-grammar captions (what docs/evaluation.md quotes)."""
    import random

    rng = random.Random(seed)
    words = ("a the small large red blue green white black striped dotted circle square star triangle box "
             "left of right above below next to man riding horse on grass tree sky with").split()

    def caption() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))

    pairs = [(caption(), [caption() for _ in range(references)]) for _ in range(num_pairs)]
    with MeteorScorer(chunk_pairs=chunk_pairs or CHUNK_PAIRS) as scorer:
        t0 = time.perf_counter()
        scorer.score(pairs[:1])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer.score(pairs)  # warm the JIT: the first thousands of pairs run slower
        t0 = time.perf_counter()
        scorer.score(pairs)
        steady = time.perf_counter() - t0
    return {"pairs": num_pairs, "references_per_pair": references, "first_call_s": round(first, 2),
            "pairs_per_s": round(num_pairs / steady, 1),
            "chunk_pairs": scorer.chunk_pairs}

