"""The results viewer, for real: `densecap view` as a process, the page in headless Chromium.

The data folder is built here (images drawn with Pillow, a results.json in the original format), so these
tests need no model. The HTTP tests need no browser; the browser tests skip without /usr/bin/chromium
(scripts/setup installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import child_env, free_port, wait_for_port
from densecap_core.commands.view import resolve_inside

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HOSTILE_CAPTION = '<img src=x id=injected onerror="window.injected=1">'


def _record(name: str, n_boxes: int, size: tuple[int, int]) -> dict:
    w, h = size
    boxes = [[5 + 7 * i % (w - 40), 5 + 5 * i % (h - 40), 30, 25] for i in range(n_boxes)]
    # Scores deliberately out of order: the viewer must sort them, as the original did.
    scores = [float((i * 7) % n_boxes) for i in range(n_boxes)]
    captions = [f"{name} region {i}" for i in range(n_boxes)]
    return {"img_name": name, "boxes": boxes, "scores": scores, "captions": captions}


@pytest.fixture
def vis_dir(tmp_path: Path) -> Path:
    data = tmp_path / "vis"
    data.mkdir()
    specs = [("first.jpg", 15, (320, 240)), ("second image.png", 4, (200, 300)), ("third.jpg", 12, (256, 256))]
    records = []
    for i, (name, n, size) in enumerate(specs):
        Image.new("RGB", size, (40 * i, 120, 200 - 40 * i)).save(data / name)
        records.append(_record(name, n, size))
    records[2]["captions"][0] = HOSTILE_CAPTION
    records[2]["scores"][0] = 100.0  # among the shown ones
    (data / "results.json").write_text(json.dumps({"results": records, "opt": {"image_size": 720}}))
    (tmp_path / "secret.txt").write_text("not for the web")
    return data


@pytest.fixture
def viewer_server(vis_dir: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "densecap_core.cli", "view", str(vis_dir), "--port", str(port),
                             "--quiet"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=20, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, b"", dict(err.headers)


# --- the server --------------------------------------------------------------------------------------------

def test_server_serves_viewer_and_data(viewer_server: str, vis_dir: Path):
    status, body, headers = _get(viewer_server + "/")
    assert status == 200 and b"viewer.js" in body
    status, body, headers = _get(viewer_server + "/data/results.json")
    assert status == 200 and json.loads(body)["results"][0]["img_name"] == "first.jpg"
    assert headers.get("Cache-Control") == "no-store"
    status, body, _ = _get(viewer_server + "/data/second%20image.png")
    assert status == 200 and body == (vis_dir / "second image.png").read_bytes()


@pytest.mark.parametrize("path", ["/data/../secret.txt", "/data/%2e%2e/secret.txt", "/data/..%2fsecret.txt",
                                  "/../secret.txt", "/data/%2e%2e%5csecret.txt", "/data/"])
def test_server_refuses_paths_outside_the_folders(viewer_server: str, path: str):
    status, body, _ = _get(viewer_server + path)
    assert status in (403, 404)
    assert b"not for the web" not in body


def test_server_refuses_symlinks_leading_out(viewer_server: str, vis_dir: Path):
    (vis_dir / "escape.txt").symlink_to(vis_dir.parent / "secret.txt")
    status, body, _ = _get(viewer_server + "/data/escape.txt")
    assert status == 403 and b"not for the web" not in body


def test_resolve_inside(tmp_path: Path):
    root = tmp_path.resolve()
    (root / "a").mkdir()
    assert resolve_inside(root, "a/b.jpg") == root / "a" / "b.jpg"
    assert resolve_inside(root, "") == root
    assert resolve_inside(root, "a/%2e%2e/%2e%2e/x") == root / "x"  # normalised at the root, never above it
    assert resolve_inside(root, "a\\..\\..\\x") is None
    assert resolve_inside(root, "x%00.jpg") is None


def test_view_rejects_a_missing_folder(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "densecap_core.cli", "view", str(tmp_path / "nope")],
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not a folder" in proc.stderr


# --- the page in Chromium ----------------------------------------------------------------------------------

@pytest.fixture
def page(viewer_server: str):
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs /usr/bin/chromium (scripts/setup installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(15_000)
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(viewer_server + "/")
            _wait_drawn(tab, 0)
            yield tab
            assert not errors, errors
        finally:
            browser.close()


def _wait_drawn(tab, index: int, shown: int | None = None) -> None:
    selector = f'#canvas[data-index="{index}"]'
    if shown is not None:
        selector += f'[data-shown="{shown}"]'
    tab.wait_for_selector(selector, state="attached")


def _boxes(tab) -> int:
    return tab.locator("#canvas rect.box").count()


@pytest.mark.browser
def test_first_image_shows_top_ten_boxes(page):
    assert _boxes(page) == 10
    assert page.locator("#counter").inner_text() == "image 1/3"
    assert page.locator("#canvas image").count() == 1
    assert page.locator("#canvas").get_attribute("viewBox") == "0 0 320 240"
    items = page.locator("#captions li.caption")
    assert items.count() == 10
    # Best score first (score 14 is region 2, since scores are (7 i) mod 15), in the palette's first colour.
    assert items.nth(0).inner_text().startswith("first.jpg region 2")
    assert items.nth(0).evaluate("e => getComputedStyle(e).color") == "rgb(173, 35, 25)"
    best = page.locator('#canvas rect.box[data-rank="0"]')
    assert best.get_attribute("stroke") == "rgb(173, 35, 25)"
    assert best.get_attribute("x") == str(5 + 7 * 2 % 280)


@pytest.mark.browser
def test_w_and_s_change_the_number_of_boxes(page):
    page.keyboard.press("w")
    _wait_drawn(page, 0, 11)
    assert _boxes(page) == 11 and page.locator("#captions li").count() == 11
    page.keyboard.press("s")
    page.keyboard.press("s")
    _wait_drawn(page, 0, 9)
    assert _boxes(page) == 9
    for _ in range(20):  # never more than the image has
        page.keyboard.press("w")
    _wait_drawn(page, 0, 15)
    assert _boxes(page) == 15
    page.click("#fewer")
    _wait_drawn(page, 0, 14)
    assert _boxes(page) == 14


@pytest.mark.browser
def test_d_and_a_move_between_images(page):
    page.keyboard.press("d")
    _wait_drawn(page, 1)
    assert page.locator("#canvas").get_attribute("data-image") == "second image.png"
    assert page.locator("#counter").inner_text() == "image 2/3"
    assert _boxes(page) == 4  # the image has only four
    assert page.locator("#canvas").get_attribute("viewBox") == "0 0 200 300"
    page.keyboard.press("a")
    page.keyboard.press("a")  # wraps around to the last image
    _wait_drawn(page, 2)
    assert page.locator("#counter").inner_text() == "image 3/3"
    page.click("#next")
    _wait_drawn(page, 0)
    assert page.locator("#counter").inner_text() == "image 1/3"


@pytest.mark.browser
def test_t_toggles_captions_on_the_image_and_r_picks_another(page):
    assert page.locator("#canvas g.label").count() == 0
    page.keyboard.press("t")
    page.wait_for_function("document.querySelectorAll('#canvas g.label').length === 10")
    label = page.locator("#canvas g.label text").last  # drawn last = the best region, on top
    assert label.text_content() == "first.jpg region 2"
    page.keyboard.press("t")
    page.wait_for_function("document.querySelectorAll('#canvas g.label').length === 0")
    page.keyboard.press("r")
    page.wait_for_function("document.querySelector('#canvas').dataset.index !== '0'")


@pytest.mark.browser
def test_captions_are_text_not_html(page):
    page.keyboard.press("a")
    _wait_drawn(page, 2)
    page.keyboard.press("t")
    page.wait_for_function("document.querySelectorAll('#canvas g.label').length === 10")
    assert page.locator("#injected").count() == 0
    assert page.evaluate("window.injected === undefined")
    assert HOSTILE_CAPTION in page.locator("#captions").inner_text()


@pytest.mark.browser
def test_missing_results_json_is_explained(page, viewer_server: str):
    page.goto(viewer_server + "/?data_dir=nowhere")
    page.wait_for_selector("#message:not([hidden])")
    assert "results.json" in page.locator("#message").inner_text()
    assert "densecap caption" in page.locator("#message").inner_text()


# --- end to end: `densecap caption --output-vis-dir` output in the viewer ---------------------------------

@pytest.fixture
def captioned_dir(tmp_path: Path, elephant_path: Path) -> Path:
    from densecap_core.checkpoint import make_random_checkpoint

    checkpoint = make_random_checkpoint(tmp_path / "random.pt", config="tiny", seed=1)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(elephant_path).save(images / "elephant.jpg")
    Image.open(elephant_path).rotate(90, expand=True).save(images / "standing.png")
    vis = tmp_path / "vis"
    proc = subprocess.run([sys.executable, "-m", "densecap_core.cli", "caption", "--input-dir", str(images),
                           "--checkpoint", str(checkpoint), "--image-size", "256", "--device", "cpu",
                           "--output-vis-dir", str(vis)], env=child_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    return vis


@pytest.mark.browser
def test_viewer_shows_what_densecap_caption_wrote(captioned_dir: Path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs /usr/bin/chromium (scripts/setup installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    records = json.loads((captioned_dir / "results.json").read_text())["results"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "densecap_core.cli", "view", str(captioned_dir), "--port",
                               str(port), "--quiet"], env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=20, proc=server)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                tab = browser.new_page()
                tab.set_default_timeout(15_000)
                tab.goto(f"http://127.0.0.1:{port}/")
                for index, record in enumerate(records):
                    _wait_drawn(tab, index)
                    assert tab.locator("#canvas").get_attribute("data-image") == record["img_name"]
                    assert _boxes(tab) == min(10, len(record["boxes"]))
                    width, height = Image.open(captioned_dir / record["img_name"]).size
                    assert tab.locator("#canvas").get_attribute("viewBox") == f"0 0 {width} {height}"
                    tab.keyboard.press("d")
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(10)
