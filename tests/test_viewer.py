"""``GET /viewer`` in a real headless Chromium: choose a scan, move the slider, toggle an overlay."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from live_server import live_server
from PIL import Image
from test_server_predictions import WITH_PREDICTION, served  # noqa: F401  (the fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, device_scale_factor=1
        )
        try:
            yield context
        finally:
            context.close()


PIXELS_JS = """() => {
  const img = document.getElementById('preview');
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return {w: canvas.width, h: canvas.height, data: Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)};
}"""


def shown(page):
    """The preview the page shows: the decoded pixels of its <img>, read back through a canvas."""
    page.wait_for_function("document.getElementById('preview').dataset.loading === 'false'")
    got = page.evaluate(PIXELS_JS)
    return np.asarray(got["data"], dtype=int).reshape(got["h"], got["w"], 4)[..., :3]


def coloured(pixels):
    """How many pixels are not grey (an overlay colours some; a plain slice has none)."""
    return int(np.count_nonzero((pixels.max(-1) - pixels.min(-1)) > 30))


def test_viewer_lists_scans_moves_the_slider_and_draws_overlays(served, browser):  # noqa: F811
    url, _, _ = served
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/viewer")
    page.wait_for_selector("#scans li")
    assert page.locator("#scans li").count() == 4

    page.check("input[name=has_prediction]")  # the REST filter
    page.click("#filters button")
    page.wait_for_function("document.querySelectorAll('#scans li').length === 2")
    assert page.locator("#scans li .id").all_inner_texts() == WITH_PREDICTION
    assert "Dice" in page.locator("#scans li .meta").first.inner_text()

    page.click(f"#scans li[data-scan-id='{WITH_PREDICTION[0]}']")
    page.wait_for_selector("#view:not([hidden])")
    first = shown(page)
    assert first.shape[:2] == (80, 72)  # 40 x 36 at the default zoom 2
    assert coloured(first) == 0
    assert page.locator("#dice tbody tr").count() == 4

    slider = page.locator("#slice")
    slider.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    assert page.locator("#slice-value").inner_text() == "9"
    moved = shown(page)
    assert not np.array_equal(moved, first)

    page.check("input[name=overlay][value=prediction]")
    with_prediction = shown(page)
    assert coloured(with_prediction) > 50
    served_png = httpx.get(
        f"{url}/scans/{WITH_PREDICTION[0]}/preview.png", params={"z": 9, "overlay": "prediction", "scale": 2}
    )
    expected = np.asarray(Image.open(io.BytesIO(served_png.content)).convert("RGB")).astype(int)
    np.testing.assert_array_equal(with_prediction, expected)  # the page shows the served slice 9
    page.check("input[name=overlay][value=mask]")
    with_mask = shown(page)
    assert coloured(with_mask) > 50 and not np.array_equal(with_mask, with_prediction)

    page.select_option("#axis", "x")
    side = shown(page)
    assert side.shape[:2] == (80, 24)  # (y, z) = 40 x 12 at zoom 2
    assert page.locator("#error").inner_text() == ""
    assert errors == []
    page.close()


def test_viewer_sends_the_token(small_store, browser):
    root, _ = small_store
    with live_server(root, token="t0ken") as url:
        page = browser.new_page()
        page.goto(f"{url}/viewer")
        page.wait_for_function("document.getElementById('error').textContent.includes('bearer token')")
        page.fill("#token", "t0ken")
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#scans li")
        assert page.locator("#scans li").count() == 4
        page.close()
