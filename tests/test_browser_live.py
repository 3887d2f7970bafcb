"""The live page in real headless Chromium with a fake webcam (a Y4M clip from ``densecap synth --video``), against the
real gateway (gunicorn over TLS), a stream worker with a random-weight model and redis-server.

The page exposes what it drew (``window.densecapLive.drawn``) and counts results in ``data-results``;
the test also reads the overlay canvas's pixels to check that something was painted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env
from livestack import LiveStack, random_checkpoint, running_stack  # noqa: F401 (fixture)

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                                      reason="needs /usr/bin/chromium (scripts/setup installs it)")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, random_checkpoint):  # noqa: F811
    with running_stack(tmp_path_factory.mktemp("browser"), random_checkpoint) as s:
        yield s


def camera_clip(folder: Path) -> Path:
    """The fake camera: ``densecap synth --video`` (a moving synthetic scene; ``camera.json`` says what it shows)."""
    clip = folder / "camera.y4m"
    out = subprocess.run([sys.executable, "-m", "densecap_core.cli", "synth", "--video", str(clip), "--frames", "30",
                          "--fps", "10", "--video-size", "320x240"], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return camera_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def browser(clip):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip.resolve()}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 700})
    context.grant_permissions(["camera"], origin=stack.base)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def wait_until(page, expression: str, timeout: int) -> None:
    """Poll a JS expression with page.evaluate (wait_for_function would need eval, which our CSP forbids)."""
    waited = 0
    while not page.evaluate(expression):
        if waited >= timeout:
            raise TimeoutError(f"{expression!r} still false after {timeout} ms; status: {page.inner_text('#status')!r}")
        page.wait_for_timeout(100)
        waited += 100


def overlay_painted_pixels(page) -> int:
    return page.evaluate("""() => {
        const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }""")


def test_page_streams_the_camera_and_draws_captioned_boxes(page, stack):
    page.goto(f"{stack.base}/live/#token={stack.token}")
    assert page.evaluate("location.hash") == "", "the token must leave the URL"
    page.click("#start")
    wait_until(page, "Number(document.body.dataset.results || 0) >= 5", 30_000)
    assert page.evaluate("document.body.dataset.state") == "streaming"
    drawn = page.evaluate("window.densecapLive.drawn")
    assert 1 <= len(drawn) <= 10  # the "boxes shown" default
    for d in drawn:
        assert d["caption"].strip() and len(d["box"]) == 4 and d["color"].startswith("#")
    assert overlay_painted_pixels(page) > 500
    st = page.evaluate("({seq: densecapLive.state.seq, inFlight: densecapLive.state.inFlight.size})")
    assert st["inFlight"] <= 1
    page.wait_for_timeout(600)  # one stats refresh
    assert float(page.inner_text("#fps")) > 0
    assert page.inner_text("#latency") != "–"
    assert page.locator("#captions li").count() == len(drawn)

    # Fewer boxes on request (the page tells the server too).
    page.click("#controls summary")  # open the settings
    page.fill("#boxes", "2")
    page.dispatch_event("#boxes", "input")
    n = page.evaluate("Number(document.body.dataset.results)")
    wait_until(page, f"Number(document.body.dataset.results) >= {n + 3}", 20_000)
    assert len(page.evaluate("window.densecapLive.drawn")) <= 2

    page.click("#stop")
    assert page.evaluate("document.body.dataset.state") == "idle"
    assert overlay_painted_pixels(page) == 0


def test_page_reconnects_after_the_gateway_restarts(page, stack):
    page.goto(f"{stack.base}/live/#token={stack.token}")
    page.click("#start")
    wait_until(page, "Number(document.body.dataset.results || 0) >= 2", 30_000)
    LiveStack.stop_process(stack.gateway)
    wait_until(page, "document.body.dataset.state === 'connecting'", 15_000)
    stack.start_gateway()
    n = page.evaluate("Number(document.body.dataset.results)")
    wait_until(page, f"Number(document.body.dataset.results) >= {n + 3}", 30_000)
    assert page.evaluate("document.body.dataset.state") == "streaming"


def test_page_says_when_the_token_is_wrong(page, stack):
    page.goto(f"{stack.base}/live/#token=not-the-token")
    page.click("#start")
    wait_until(page, "document.body.dataset.state === 'error'", 10_000)
    assert "token" in page.inner_text("#status").lower()


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory):
    """The same stack serving the embedded default model (no DENSECAP_CHECKPOINT)."""
    with running_stack(tmp_path_factory.mktemp("browser-default"), None, worker_timeout=120) as s:
        yield s


def names_an_object(caption: str, objects: list[dict]) -> bool:
    """True when the caption names the colour and the shape of one object of the clip (synonyms allowed)."""
    from densecap_core.data.grammar import COLOUR_WORDS, SHAPE_WORDS
    text = f" {caption} "
    for obj in objects:
        colour = any(f" {w} " in text for w in COLOUR_WORDS[obj["colour"]])
        shape = any(f" {w} " in text or f" {p} " in text for w, p in SHAPE_WORDS[obj["shape"]].items())
        if colour and shape:
            return True
    return False


@contextlib.contextmanager
def streaming_page(browser, stack):
    """A fresh browser context on the live page of ``stack``, started (the fake camera streaming)."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 700})
    context.grant_permissions(["camera"], origin=stack.base)
    page = context.new_page()
    try:
        page.goto(f"{stack.base}/live/#token={stack.token}")
        page.click("#start")
        yield page
    finally:
        context.close()


def test_default_model_names_what_the_camera_shows(browser, default_stack, clip):
    objects = json.loads(clip.with_suffix(".json").read_text())["objects"]
    with streaming_page(browser, default_stack) as page:
        captions: set[str] = set()
        for _ in range(6):  # several frames: the objects move, and the model may miss one in a frame
            n = page.evaluate("Number(document.body.dataset.results || 0)")
            wait_until(page, f"Number(document.body.dataset.results || 0) >= {n + 2}", 60_000)
            captions |= {d["caption"] for d in page.evaluate("window.densecapLive.drawn")}
        assert any(names_an_object(c, objects) for c in captions), (captions, objects)


def test_find_marks_a_phrase_in_the_video(browser, default_stack, clip):
    """The Find box: the clip's first object's phrase is found (a dashed white box, data-find="found") in some
    frame; a colour and shape the clip does not show is reported not in view; a word the model never says is
    named in an error. Each is checked against results for that phrase only."""
    from densecap_core.data import scene
    from densecap_core.data.grammar import COLOUR_WORDS, SHAPE_WORDS

    objects = json.loads(clip.with_suffix(".json").read_text())["objects"]
    present = {(o["colour"], o["shape"]) for o in objects}
    colour, shape = next((c, s) for c in scene.COLOURS for s in scene.SHAPES if (c, s) not in present)
    absent = f"a {COLOUR_WORDS[colour][0]} {next(iter(SHAPE_WORDS[shape]))}"
    with streaming_page(browser, default_stack) as page:
        wait_until(page, "Number(document.body.dataset.results || 0) >= 1", 60_000)

        def states_for(query: str, frames: int = 6) -> list[str]:
            page.fill("#query", query)
            page.press("#query", "Enter")  # "change": sent at once
            wait_until(page, f"(window.densecapLive.state.find || {{}}).query === {json.dumps(query)}", 30_000)
            seen = []
            for _ in range(frames):
                n = page.evaluate("Number(document.body.dataset.results || 0)")
                wait_until(page, f"Number(document.body.dataset.results || 0) >= {n + 1}", 30_000)
                seen.append(page.evaluate("document.body.dataset.find"))
                if seen[-1] == "found":
                    found = page.evaluate("window.densecapLive.found")
                    assert found["label"].startswith(query) and len(found["box"]) == 4
            return seen

        assert "found" in states_for(objects[0]["phrase"])
        assert "found" in page.inner_text("#find").lower()
        assert "absent" in states_for(absent), absent
        assert states_for("a purple banana", frames=2) == ["error", "error"]
        assert "banana" in page.inner_text("#find")
        page.fill("#query", "")
        page.press("#query", "Enter")
        wait_until(page, "document.body.dataset.find === 'empty'", 10_000)
        n = page.evaluate("Number(document.body.dataset.results || 0)")
        wait_until(page, f"Number(document.body.dataset.results || 0) >= {n + 2}", 30_000)
        assert page.evaluate("window.densecapLive.found") is None and page.inner_text("#find") == ""
