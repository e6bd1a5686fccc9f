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


# Predicates are functions ("() => ..."): Playwright evaluates a bare expression with eval(),
# which the viewer's Content-Security-Policy (no 'unsafe-eval') refuses.


def shown(page):
    """The preview the page shows: the decoded pixels of its <img>, read back through a canvas."""
    page.wait_for_function("() => document.getElementById('preview').dataset.loading === 'false'")
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
    # the page runs under its Content-Security-Policy: nothing it does may be refused
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{url}/viewer")
    page.wait_for_selector("#scans li")
    assert page.locator("#scans li").count() == 4

    page.check("input[name=has_prediction]")  # the REST filter
    page.click("#filters button")
    page.wait_for_function("() => document.querySelectorAll('#scans li').length === 2")
    assert page.locator("#scans li .id").all_inner_texts() == WITH_PREDICTION
    assert "Dice" in page.locator("#scans li .meta").first.inner_text()

    # from the keyboard: Tab reaches the scans, Enter opens one (as a click does)
    page.focus(f"#scans li[data-scan-id='{WITH_PREDICTION[1]}']")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.getElementById('title').textContent === '{WITH_PREDICTION[1]}'")
    assert page.get_attribute(f"#scans li[data-scan-id='{WITH_PREDICTION[1]}']", "aria-pressed") == "true"
    assert page.get_attribute(f"#scans li[data-scan-id='{WITH_PREDICTION[1]}']", "tabindex") == "0"

    page.click(f"#scans li[data-scan-id='{WITH_PREDICTION[0]}']")
    page.wait_for_function(f"() => document.getElementById('title').textContent === '{WITH_PREDICTION[0]}'")
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
    assert refused == []
    page.close()


def test_viewer_shows_an_authentication_error_instead_of_an_empty_list(small_store, browser):
    root, _ = small_store
    with live_server(root, token="t0ken") as url:
        page = browser.new_page()
        page.goto(f"{url}/viewer")
        page.wait_for_selector("#auth:not([hidden])")
        assert page.locator("#auth").inner_text().startswith("This server needs a token")
        assert page.locator("#scans li").count() == 0 and page.locator("#count").inner_text() == ""
        assert page.get_attribute("#token", "aria-invalid") == "true"

        page.fill("#token", "wrong")
        page.dispatch_event("#token", "change")
        page.wait_for_function("() => document.getElementById('auth').textContent.includes('did not accept')")
        assert page.locator("#scans li").count() == 0

        page.fill("#token", "t0ken")
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#scans li")
        assert page.locator("#scans li").count() == 4
        assert page.locator("#auth").is_hidden() and page.get_attribute("#token", "aria-invalid") == "false"
        page.close()


SPACING = [0.365, 0.365, 0.7]  # mm along (y, x, z), as MedSegPy 3D files give it
NAMES = ["femoral cartilage", "tibial cartilage", "meniscus"]


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
    """A store of one scan with a spacing and class names, and one with neither."""
    from store.writer import write_scan

    root = tmp_path_factory.mktemp("viewer") / "store"
    rng = np.random.default_rng(11)
    image = rng.normal(100, 30, size=(30, 26, 10)).astype(np.float32)
    labels = rng.integers(-1, 3, size=image.shape)
    mask = np.stack([labels == k for k in range(3)], axis=-1).astype(np.uint8)
    write_scan(
        root, "0000020_V00-Aug00", image, mask, {"split": "train", "spacing": SPACING, "class_names": NAMES}
    )
    write_scan(root, "0000021_V00-Aug00", image[:, :, :4], mask[:, :, :4], {"split": "train"})
    with live_server(root) as url:
        yield url, image


def rendered_size(page):
    """The preview's size on the page in CSS pixels (height, width)."""
    box = page.evaluate(
        "() => { const r = document.getElementById('preview').getBoundingClientRect(); return [r.height, r.width]; }"
    )
    return tuple(box)


def assert_upright(page, png, stretch):
    """What the page shows is the PNG turned a quarter to the left (its last column, the
    highest z, on top), stretched to the slice thickness: every shown row is one of the turned
    PNG's rows, top to bottom in order, from its first row to its last."""
    from io import BytesIO

    from PIL import Image

    turned = np.rot90(png, 1)  # counter-clockwise: z from the top (highest) down
    shot = np.asarray(Image.open(BytesIO(page.locator("#preview").screenshot())).convert("RGB"), dtype=int)
    assert abs(shot.shape[1] - turned.shape[1]) <= 1
    assert abs(shot.shape[0] - turned.shape[0] * stretch) <= 2  # the screenshot rounds the box
    width = min(shot.shape[1], turned.shape[1])
    errors = np.array([[np.abs(row[:width] - t[:width]).max() for t in turned] for row in shot])
    exact = errors.min(axis=1) <= 8  # shown rows that are a row of the turned PNG
    assert exact.sum() >= turned.shape[0] * stretch - 3  # all but the rounded box's blank edges
    best = errors.argmin(axis=1)[exact]
    assert np.all(np.diff(best) >= 0) and best[0] <= 1 and best[-1] >= turned.shape[0] - 2


def test_viewer_draws_every_plane_with_its_physical_aspect(anisotropic, browser):
    url, _ = anisotropic
    page = browser.new_page()
    page.goto(f"{url}/viewer")
    page.click("#scans li[data-scan-id='0000020_V00-Aug00']")
    page.wait_for_selector("#view:not([hidden])")
    assert shown(page).shape[:2] == (60, 52)  # (y, x) = 30 x 26 at zoom 2: square voxels
    assert rendered_size(page) == pytest.approx((60, 52), abs=0.5)

    stretch = SPACING[2] / SPACING[0]  # a slice is 0.7 mm thick, a pixel 0.365 mm wide
    # planes through x or y: the PNG keeps (y or x, z); the page turns it so that z runs upwards
    page.select_option("#axis", "x")
    png = shown(page)
    assert png.shape[:2] == (60, 20)  # the PNG: (y, z) = 30 x 10 at zoom 2
    assert rendered_size(page) == pytest.approx((20 * stretch, 60), abs=0.5)
    assert_upright(page, png, stretch)
    page.select_option("#axis", "y")
    png = shown(page)
    assert png.shape[:2] == (52, 20)  # (x, z)
    assert rendered_size(page) == pytest.approx((20 * stretch, 52), abs=0.5)
    assert_upright(page, png, stretch)
    assert "0.7 mm" in page.locator("#aspect").inner_text()
    assert "z upwards" in page.locator("#aspect").inner_text()

    page.click("#scans li[data-scan-id='0000021_V00-Aug00']")  # no spacing: 1 mm, no stretch
    page.wait_for_function("() => document.getElementById('title').textContent === '0000021_V00-Aug00'")
    shown(page)
    assert rendered_size(page) == pytest.approx((8, 52), abs=0.5)  # still through y: z upwards
    page.close()


def test_viewer_legend_names_the_classes_in_their_colours(anisotropic, browser):
    from store.ome import CLASS_COLORS

    url, _ = anisotropic
    page = browser.new_page()
    page.goto(f"{url}/viewer")
    page.click("#scans li[data-scan-id='0000020_V00-Aug00']")
    page.wait_for_selector("#view:not([hidden])")
    assert page.locator("#legend").is_hidden()  # no overlay, no legend
    page.check("input[name=overlay][value=mask]")
    shown(page)
    assert page.locator("#legend .name").all_inner_texts() == NAMES
    swatches = page.eval_on_selector_all(
        "#legend .swatch", "els => els.map(e => getComputedStyle(e).backgroundColor)"
    )
    assert swatches == [f"rgb({r}, {g}, {b})" for r, g, b in CLASS_COLORS[:3]]

    page.click("#scans li[data-scan-id='0000021_V00-Aug00']")  # no class names: "class k"
    page.wait_for_function("() => document.getElementById('title').textContent === '0000021_V00-Aug00'")
    shown(page)
    assert page.locator("#legend .name").all_inner_texts() == ["class 0", "class 1", "class 2"]
    page.close()


def set_range(page, selector, value):
    page.eval_on_selector(
        selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", value
    )


def test_viewer_window_level_control_sets_the_grey_levels(anisotropic, browser):
    url, image = anisotropic
    page = browser.new_page()
    page.goto(f"{url}/viewer")
    page.click("#scans li[data-scan-id='0000020_V00-Aug00']")
    page.wait_for_selector("#view:not([hidden])")
    auto = shown(page)
    assert "window" not in page.get_attribute("#preview", "data-shown")  # the server's default

    set_range(page, "#level", 110)
    set_range(page, "#width", 40)
    page.wait_for_function(
        "() => document.getElementById('preview').dataset.shown.includes('window=90%2C130')"
    )
    windowed = shown(page)
    # the same pixels as numpy's window: (v - 90) * 255 / 40, clipped, at zoom 2
    plane = image[:, :, 5].astype(np.float64)
    grey = np.clip(np.rint((plane - 90) * (255.0 / 40)), 0, 255).astype(int)
    expected = np.repeat(np.repeat(grey, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(windowed, np.repeat(expected[..., None], 3, axis=-1))
    assert not np.array_equal(windowed, auto)
    assert (
        page.locator("#level-value").inner_text() == "110"
        and page.locator("#width-value").inner_text() == "40.0"
    )

    page.click("#window-reset")
    page.wait_for_function("() => !document.getElementById('preview').dataset.shown.includes('window')")
    np.testing.assert_array_equal(shown(page), auto)
    page.close()
