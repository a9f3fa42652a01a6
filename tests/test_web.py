"""`brainscan web` driven in a real headless Chromium against a real gateway on loopback.

Debian's chromium (make system-deps) through Playwright's Python API; nothing is
mocked. The page runs as `brainscan web` in its own process, exactly as a user starts it.
A screenshot of the first result lands in runs/web/ (not committed) for a reviewer.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import DISCLAIMER, Client
from brainscan.overlay import render_overlay
from brainscan_web.screenshot import CHROMIUM, launch
from brainscan.pictures import decode_frames
from tests.conftest import PROJECT_ROOT, GatewayProcess, png_bytes, start_gateway, stop_gateway, synthetic_slice
from tests.dicom_factory import dicom_bytes

TOKEN = "web-page-test-token"
MAX_REQUEST_MB = "1"  # gateway and page share it; a 1.5 MB file is then too big
SCREENSHOT_DIR = PROJECT_ROOT / "runs" / "web"


@dataclass
class WebProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_web(
    server: str, token_file: Path, log_dir: Path, *, extra: list[str] | None = None, timeout_s: float = 30.0
) -> WebProcess:
    """`brainscan web --port 0`; waits for its "page on" line and a first answer."""
    log_path = log_dir / f"web-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "brainscan.cli", "web", "--server", server, "--token-file", str(token_file),
         "--host", "127.0.0.1", "--port", "0", "--timeout", "20", *(extra or [])],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "BRAINSCAN_MAX_REQUEST_MB": MAX_REQUEST_MB},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"brainscan web exited with {process.returncode}:\n{log_path.read_text()}")
        found = re.search(r"page on (http://\S+/)", log_path.read_text())
        if found:
            try:
                urllib.request.urlopen(found.group(1) + "api/config", timeout=2).read()
                return WebProcess(process, found.group(1), log_path)
            except OSError:
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"brainscan web did not start within {timeout_s} s:\n{log_path.read_text()}")


def stop_web(web: WebProcess) -> None:
    web.process.terminate()
    try:
        web.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        web.process.kill()
        web.process.wait()


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("web-auth")
    (folder / "right.txt").write_text(f"{TOKEN}\n")
    (folder / "wrong.txt").write_text("not-the-token\n")
    return {name: folder / f"{name}.txt" for name in ("right", "wrong")}


@pytest.fixture(scope="module")
def web_gateway(tiny_repository: Path, token_files, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Its own gateway: the last test stops it."""
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("web-logs"),
        extra=["--auth-token-file", str(token_files["right"])], env={"BRAINSCAN_MAX_REQUEST_MB": MAX_REQUEST_MB},
    )
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def web(web_gateway: GatewayProcess, token_files, tmp_path_factory) -> Iterator[WebProcess]:
    page = start_web(web_gateway.address, token_files["right"], tmp_path_factory.mktemp("web-logs"))
    yield page
    stop_web(page)


@pytest.fixture(scope="module")
def sdk(web_gateway: GatewayProcess) -> Iterator[Client]:
    with Client(web_gateway.address, token=TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: `make system-deps` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = launch(
            playwright, tmp_path_factory.mktemp("chromium-profile"), viewport={"width": 1280, "height": 900},
            accept_downloads=True, bypass_csp=True,  # Playwright's own waits evaluate strings; the page fixture checks the header itself
        )
        yield context
        context.close()


@pytest.fixture
def page(browser_context, web: WebProcess):
    """A fresh tab on the page; every request it makes must stay on the page's own origin."""
    tab = browser_context.new_page()
    foreign: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith((web.url, "data:", "blob:")) else foreign.append(r.url))
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    response = tab.goto(web.url)
    assert response is not None and "default-src 'self'" in response.headers["content-security-policy"]
    tab.wait_for_function("!document.querySelector('#gateway-status').textContent.startsWith('Checking')")
    yield tab
    tab.close()
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    assert not errors, f"JavaScript errors: {errors}"


def real_slice(data_root: Path) -> Path:
    return sorted((data_root / "sartaj-classification" / "Testing" / "glioma_tumor").glob("*.jpg"))[0]


def wait_done(page) -> None:
    page.wait_for_selector("#progress:has-text('Done')", timeout=60_000)


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def fixed(value: float, digits: int) -> str:
    """JavaScript's toFixed: the exact binary value rounded, ties up (Python's format rounds ties to even)."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def shown(value: float) -> str:
    """A probability or score as the page prints it: the JSON's 6 decimals, then toFixed(3)."""
    return fixed(round(value, 6), 3)


def area_text(result) -> str:
    """What the page prints as the mask area ("not run ..." has a reason after it)."""
    if result.mask is None:
        return "0 px: the mask is empty" if result.segmentation_ran else "not run"
    if result.segmentation_area_mm2 is None:
        return f"{result.segmentation_area_px} px (no pixel spacing in the file, so no mm²)"
    return f"{result.segmentation_area_px} px ({fixed(result.segmentation_area_mm2, 1)} mm²)"


def scope_text(result) -> str | None:
    """The page's Scope line, or None where this SDK has no scope verdict (the row is then left out)."""
    scope = getattr(result, "scope", None)
    if scope is None:
        return None
    if not scope.assessed:
        return f"Could not judge: {scope.detail or scope.reason}"
    p = scope.in_scope_probability
    return "Assessed" if p is None else f"Assessed (p(in scope) = {shown(p)})"


def test_a_real_slice_shows_what_the_sdk_answers(page, sdk, data_root: Path):
    path = real_slice(data_root)
    expected = sdk.analyze(path)
    page.set_input_files("#file-input", str(path))
    wait_done(page)
    card = page.locator("article.result")
    assert card.count() == 1
    assert card.locator(".result-title").inner_text() == path.name
    assert card.locator(".label").inner_text() == expected.label.replace("_", " ")
    yes_no = "Yes" if expected.tumor_detected else "No"
    assert card.locator(".tumor").inner_text() == f"{yes_no}, p(tumor) = {shown(expected.tumor_probability)}"
    scope = scope_text(expected)
    assert scope is None or scope.startswith("Assessed"), scope  # a real MRI slice
    assert (card.locator(".scope").inner_text() if card.locator(".scope").count() else None) == scope
    assert card.locator(".mask-area").inner_text().startswith(area_text(expected))

    rows = card.locator(".probabilities tbody tr")
    bars = {rows.nth(i).locator("th").inner_text(): rows.nth(i).locator("td.number").inner_text() for i in range(rows.count())}
    assert bars == {k.replace("_", " "): shown(v) for k, v in expected.probabilities.items()}
    meters = card.locator(".probabilities meter")
    assert [float(meters.nth(i).get_attribute("value")) for i in range(meters.count())] == pytest.approx(
        [expected.probabilities[k] for k in sorted(expected.probabilities)], abs=1e-6
    )

    instance_rows = card.locator(".instances tbody tr")
    if expected.instances:
        assert instance_rows.count() == len(expected.instances)
        for row, instance in zip((instance_rows.nth(i) for i in range(instance_rows.count())), expected.instances):
            cells = row.locator("td").all_inner_texts()
            assert cells[2:4] == [shown(instance.score), str(instance.area_px)]
    else:
        assert instance_rows.inner_text() == ("none found" if expected.detection_ran else "not run")

    # The overlay is the SDK's own drawing of the SDK's answer on the decoded slice, pixel for pixel.
    gray = decode_frames(path.read_bytes())[0]
    overlay = data_url_image(card.locator("img.overlay").get_attribute("src"))
    np.testing.assert_array_equal(overlay, np.asarray(render_overlay(gray, expected)))
    original = data_url_image(card.locator("img.original").get_attribute("src"))
    assert original.shape == expected.image_size

    with page.expect_download() as download:
        card.locator(".download-json").click()
    saved = json.loads(Path(download.value.path()).read_text())
    wanted = expected.to_json_dict()
    assert saved["image"] == path.name
    for key in ("label", "probabilities", "tumor_probability", "tumor_detected", "segmentation", "instances", "image_size"):
        assert saved[key] == wanted[key], key
    with page.expect_download() as download:
        card.locator(".download-overlay").click()
    assert download.value.suggested_filename == f"{path.stem}.overlay.png"
    np.testing.assert_array_equal(np.asarray(Image.open(download.value.path())), overlay)

    # The disclaimer stays on screen at the bottom of the page too.
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    disclaimer = page.locator("#disclaimer")
    assert disclaimer.inner_text() == DISCLAIMER
    box = disclaimer.bounding_box()
    assert box is not None and 0 <= box["y"] < 900
    page.evaluate("window.scrollTo(0, 0)")
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "test_web-result.png"), full_page=True)


def test_a_multi_frame_dicom_shows_a_strip_with_the_area_per_slice(page, sdk, tmp_path: Path):
    frames = np.stack([synthetic_slice(160, seed=seed, dtype=np.uint16) for seed in range(3)])
    path = tmp_path / "series.dcm"
    path.write_bytes(dicom_bytes(frames, spacing=(0.5, 0.5)))
    expected = list(sdk.analyze_many([path.read_bytes()]))
    page.set_input_files("#file-input", str(path))
    wait_done(page)
    assert page.locator("article.result").count() == 3
    strip = page.locator("#strip button")
    assert strip.count() == 3
    for index, result in enumerate(expected):
        button = strip.nth(index)
        assert button.locator(".slice-name").inner_text() == f"series.dcm, frame {index + 1}"
        if result.mask is not None:
            assert button.locator(".slice-area").inner_text() == f"{fixed(result.segmentation_area_mm2, 1)} mm²"
            assert page.locator("article.result .mask-area").nth(index).inner_text() == area_text(result)
        else:
            assert button.locator(".slice-area").inner_text() in ("no tumor", "tumor, no mask")
    strip.nth(2).click()
    assert page.evaluate("document.activeElement.id") == "slice-2"


def test_a_slice_that_cannot_be_judged_says_so(page, sdk, tmp_path: Path):
    """A blank frame: "could not judge" and why, never "no tumor"."""
    blank = tmp_path / "blank.png"
    blank.write_bytes(png_bytes(np.full((128, 128), 7, dtype=np.uint8)))
    expected = sdk.analyze(blank)
    if getattr(expected, "scope", None) is None:
        pytest.skip("this SDK's results carry no scope verdict yet")
    assert not expected.scope.assessed
    page.set_input_files("#file-input", str(blank))
    wait_done(page)
    assert page.locator(".scope").inner_text() == scope_text(expected)
    assert page.locator(".tumor").inner_text() == "Not judged (see Scope)"
    assert page.locator(".label").inner_text() == expected.label.replace("_", " ")


def unlabeled_controls(page) -> list[str]:
    """Controls, images and meters a screen reader could not name."""
    return page.evaluate(
        """() => [...document.querySelectorAll('input, button, a, img, meter, select, textarea')]
            .filter((el) => !el.closest('template') && el.offsetParent !== null)
            .filter((el) => {
              if (el.tagName === 'IMG') return !el.hasAttribute('alt') ||
                 (el.alt === '' && !el.closest('button'));  // only thumbnails inside named buttons may be silent
              const named = el.getAttribute('aria-label') || (el.labels && el.labels.length) ||
                            el.textContent.trim();
              return !named;
            })
            .map((el) => el.outerHTML.slice(0, 80))"""
    )


def test_keyboard_only_use_and_labels(page, data_root: Path):
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order[:4] == ["file-input", "opt-segment", "opt-detect", "opt-gate"], order
    page.focus("#opt-segment")
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    page.keyboard.press("Space")
    assert not page.is_checked("#opt-segment") and not page.is_checked("#opt-detect")
    page.focus("#file-input")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(real_slice(data_root)))
    wait_done(page)
    assert page.locator(".mask-area").inner_text().startswith("not run")
    assert page.locator(".instances tbody").inner_text() == "not run"
    assert unlabeled_controls(page) == []

    page.focus("#opt-segment")
    page.keyboard.press("Space")  # segmentation back on, then the re-run button by keyboard
    page.focus("#rerun")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => { const area = document.querySelector('.mask-area'); return area && !area.textContent.startsWith('not run'); }",
        timeout=60_000,
    )
    assert re.match(r"(\d+ px|0 px: the mask is empty)", page.locator(".mask-area").inner_text())


def test_broken_and_oversized_files_get_messages_and_the_page_goes_on(page, web: WebProcess, data_root: Path, tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(1536 * 1024))
    page.set_input_files("#file-input", [str(broken), str(huge), str(real_slice(data_root))])
    wait_done(page)
    messages = page.locator("#messages .message")
    assert messages.count() == 2
    assert messages.nth(0).get_attribute("data-kind") == "bad_file"
    assert messages.nth(0).inner_text().startswith("broken.png: This file could not be analyzed: ")
    assert messages.nth(1).inner_text() == "huge.png: The file is 1.5 MB; the gateway accepts at most 1.0 MB per file."
    assert "Traceback" not in page.inner_text("body")
    assert page.locator("article.result").count() == 1  # the good file after them still went through
    assert page.locator("#progress").inner_text() == "Done: 1 slice analyzed, 2 files refused."

    # The page's server refuses an oversized body itself too (a client that skips the page's check).
    # The server may answer 413 and close before the client has written the whole body; a write that
    # then hits a closed socket is retried (the answer itself must still be the 413 JSON).
    refused = None
    for _ in range(5):
        request = urllib.request.Request(web.url + "api/analyze", data=huge.read_bytes(), method="POST")
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as error:
            refused = error
            break
        except urllib.error.URLError as error:
            assert isinstance(error.reason, (BrokenPipeError, ConnectionResetError)), error
        else:
            pytest.fail("the page's server accepted an oversized body")
    assert refused is not None, "every attempt lost the race with the server's early answer"
    assert refused.code == 413
    assert json.loads(refused.read())["error"]["kind"] == "too_big"


def test_a_file_the_gateway_finds_too_big_is_said_plainly(browser_context, web_gateway: GatewayProcess, token_files, tmp_path: Path):
    """A page started with a higher limit than its gateway's: the gateway's refusal reads as plainly."""
    lax = start_web(web_gateway.address, token_files["right"], tmp_path, extra=["--max-upload-mb", "4"])
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(1536 * 1024))
    try:
        tab = browser_context.new_page()
        tab.goto(lax.url)
        tab.set_input_files("#file-input", str(huge))
        wait_done(tab)
        message = tab.locator("#messages .message")
        assert message.get_attribute("data-kind") == "too_big"
        assert message.inner_text().startswith("huge.png: The gateway refused the file as too big (")
        tab.close()
    finally:
        stop_web(lax)


def test_a_file_chosen_before_the_page_has_its_config_waits_for_it(browser_context, web: WebProcess, data_root: Path):
    """The file input works from the first paint; /api/config is held back until a slice has been chosen."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    held: list = []
    tab.route("**/api/config", lambda route: held.append(route))
    try:
        tab.goto(web.url)
        for _ in range(100):
            if held:
                break
            tab.wait_for_timeout(50)
        assert held, "the page never asked for its config"
        tab.set_input_files("#file-input", str(real_slice(data_root)))
        tab.wait_for_timeout(300)  # the change handler has run by now, with no config yet
        held[0].continue_()
        wait_done(tab)
        assert tab.locator("article.result").count() == 1
        assert not errors, f"JavaScript errors: {errors}"
    finally:
        tab.close()


def test_a_refused_token_is_said_plainly(browser_context, web_gateway: GatewayProcess, token_files, tmp_path: Path):
    wrong = start_web(web_gateway.address, token_files["wrong"], tmp_path)
    try:
        tab = browser_context.new_page()
        tab.goto(wrong.url)
        tab.wait_for_selector("#gateway-status.down")
        assert "refused the access token" in tab.locator("#gateway-status").inner_text()
        tab.close()
    finally:
        stop_web(wrong)


def test_a_stopped_gateway_is_said_plainly(page, web_gateway: GatewayProcess, data_root: Path):
    """Last in this module: it stops the module's gateway."""
    stop_gateway(web_gateway)
    page.set_input_files("#file-input", str(real_slice(data_root)))
    wait_done(page)
    message = page.locator("#messages .message")
    assert message.get_attribute("data-kind") == "gateway_down"
    assert f"The gateway at {web_gateway.address} cannot be reached" in message.inner_text()
    assert "cannot be reached" in page.locator("#gateway-status").inner_text()
    page.reload()
    page.wait_for_selector("#gateway-status.down")
    assert "cannot be reached" in page.locator("#gateway-status").inner_text()
