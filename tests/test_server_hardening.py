"""Hardening of ``scancache serve``: preview memory (exact pixels, an honest in-flight cost, a cap
on the magnified raster), ``X-Content-Type-Options`` and the viewer's Content-Security-Policy,
and a refused ``Content-Encoding`` on ``POST /batch``. Against a real uvicorn server."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import build_store
from live_server import live_server
from PIL import Image

from service import preview
from service.server.routes_viewer import VIEWER_CSP
from store.ome import CLASS_COLORS

WIDE = "0000031_V00-Aug00"  # 520 x 520: a scale-8 preview is 4160 x 4160, over the 4096 x 4096 cap
WIDE_CLASSES = 3
ENCODING_REFUSED = {
    "detail": "body: Content-Encoding 'gzip' is not accepted; send plain JSON",
    "error": "InvalidParameter",
    "param": "body",
}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide") / "store"
    truth = build_store(
        root,
        scans=[
            (WIDE, (520, 520, 3), WIDE_CLASSES, "train", 31, 0, 0, np.float32),
            ("0000032_V00-Aug00", (40, 36, 5), 2, "train", 32, 0, 0, np.int16),
        ],
        image_only=(),
    )
    with live_server(root) as url:
        yield url, root, truth


def reference_rgb(plane, window, classes=None):
    """The preview, independently: float64 grey levels, float32 blends of each class in turn."""
    lo, hi = window
    grey = np.clip(np.rint((plane.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    for k in range(0 if classes is None else classes.shape[-1]):
        where = classes[..., k] != 0
        rgb[where] = 0.5 * rgb[where] + 0.5 * np.asarray(CLASS_COLORS[k], np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def reference_png(rgb, scale):
    """What the renderer sent before it worked in strips: the whole magnified raster, encoded."""
    big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


# -- previews -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "overlay"),
    [
        ({"z": 1, "window": "50,150", "scale": 7}, False),  # many strips
        ({"z": 2, "window": "0,1", "scale": 2}, False),
        ({"z": 0, "window": "60,140", "overlay": "mask", "scale": 3}, True),
        ({"z": 1, "window": "-1000,3000", "overlay": "mask"}, True),
        ({"z": 200, "axis": "x", "window": "50,150", "overlay": "mask", "scale": 5}, True),
    ],
)
def test_preview_bytes_are_those_of_the_whole_raster_encoded(wide, params, overlay):
    url, _, truth = wide
    image, mask = truth[WIDE]
    axis = params.get("axis", "z")
    index = [slice(None)] * 3
    index[preview.AXES[axis]] = params["z"]
    lo, hi = (float(v) for v in params["window"].split(","))
    rgb = reference_rgb(image[tuple(index)], (lo, hi), mask[tuple(index)] if overlay else None)
    got = httpx.get(f"{url}/scans/{WIDE}/preview.png", params=params, timeout=60)
    assert got.status_code == 200, got.text
    assert got.content == reference_png(rgb, params.get("scale", 1))


def test_render_png_in_strips_is_the_whole_raster_encoded(monkeypatch):
    rng = np.random.default_rng(7)
    plane = rng.normal(0, 400, (61, 47)).astype(np.int16)
    classes = rng.random((61, 47, 4)) > 0.7
    monkeypatch.setattr(preview, "STRIP_BYTES", 1)  # one row a strip
    for scale in (1, 2, 8):
        for cl in (None, classes):
            expected = reference_png(reference_rgb(plane, (-300.0, 500.0), cl), scale)
            assert preview.render_png(plane, (-300.0, 500.0), cl, scale) == expected, scale


def test_a_magnified_preview_over_the_raster_cap_is_413_naming_scale(wide):
    url, _, _ = wide
    got = httpx.get(f"{url}/scans/{WIDE}/preview.png", params={"scale": 8})
    assert got.status_code == 413
    assert got.json() == {
        "detail": "scale: a 8x preview of this 520x520 slice is 4160x4160 pixels, over the server's limit"
        " of 4096x4096 (16777216) pixels; ask a smaller scale",
        "error": "RequestTooLarge",
        "param": None,
    }
    assert got.headers["cache-control"] == "no-store"
    # 7x is 3640 x 3640: served
    assert httpx.get(f"{url}/scans/{WIDE}/preview.png", params={"scale": 7}).status_code == 200


def test_the_preview_holds_its_measured_peak_in_flight(wide):
    from fastapi.testclient import TestClient

    from service.server import Settings, create_app

    _, root, _ = wide
    app = create_app(Settings(store=root))
    budget = app.state.scancache.inflight
    held: list[int] = []
    acquire = budget.acquire

    async def recording(cost: int):  # type: ignore[no-untyped-def]
        held.append(cost)
        return await acquire(cost)

    budget.acquire = recording
    with TestClient(app) as client:
        assert (
            client.get(f"/scans/{WIDE}/preview.png", params={"scale": 4, "overlay": "mask"}).status_code
            == 200
        )
        assert client.get(f"/scans/{WIDE}/preview.png", params={"axis": "y"}).status_code == 200
    assert held == [
        preview.render_peak_bytes(520, 520, 4, 2 * WIDE_CLASSES + 2, 4),
        preview.render_peak_bytes(520, 3, 4, 0, 1),
    ]
    assert budget.used == 0


MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from service import preview

    def status(key):  # this process's own memory (VmHWM: its peak), in bytes
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    rows, cols, classes, scale = (int(a) for a in sys.argv[1:])
    rng = np.random.default_rng(0)
    plane = rng.standard_normal((rows, cols), dtype=np.float32)
    masks = rng.integers(0, 2, (rows, cols, classes), dtype=np.uint8) if classes else None
    preview.render_png(plane[:8, :8], (-2.0, 2.0), None if masks is None else masks[:8, :8], 2)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    png = preview.render_png(plane, (-2.0, 2.0), masks, scale)
    print(json.dumps({"used": status("VmHWM") - before, "png": len(png)}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize(("rows", "cols", "classes", "scale"), [(1024, 1024, 4, 4), (1536, 1536, 2, 1)])
def test_render_peak_bytes_bounds_the_measured_peak(rows, cols, classes, scale):
    """Peak RSS of a fresh process over one render of a noise slice (the worst case for the PNG):
    what the budget counts covers it, and is not far above it."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(rows), str(cols), str(classes), str(scale)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    used = json.loads(out.stdout)["used"]
    counted = preview.render_peak_bytes(rows, cols, 4, classes, scale) - rows * cols * (2 * 4 + classes)
    assert used <= counted, (used, counted)
    assert used >= 0.4 * counted, (used, counted)
    assert used >= 4 * rows * cols * scale * scale  # the raster, once: no other full-size copy


# -- headers --------------------------------------------------------------------------------


def test_every_response_says_nosniff(wide, tmp_path):
    url, root, _ = wide
    with httpx.Client(base_url=url, timeout=30) as client:
        image = client.get(f"/scans/{WIDE}/image", params={"roi": "0:4,0:4,0"})
        answers = {
            "health": client.get("/health"),
            "listing": client.get("/scans"),
            "image": image,
            "304": client.get(
                f"/scans/{WIDE}/image",
                params={"roi": "0:4,0:4,0"},
                headers={"If-None-Match": image.headers["etag"]},
            ),
            "head": client.head(f"/scans/{WIDE}/image", params={"roi": "0:4,0:4,0"}),
            "batch": client.post("/batch", json={"regions": [{"scan_id": WIDE, "roi": "0:2,0:2,0"}]}),
            "preview": client.get(f"/scans/{WIDE}/preview.png"),
            "zarr": client.get("/zarr/zarr.json"),
            "viewer": client.get("/viewer"),
            "viewer.js": client.get("/viewer/static/viewer.js"),
            "docs": client.get("/docs"),
            "metrics": client.get("/metrics"),
            "404": client.get("/scans/0009999_V00-Aug00"),
            "422": client.get(f"/scans/{WIDE}/image", params={"roi": "0:9999"}),
            "400 path": client.get("/zarr/a%2Fb"),
            "unknown route": client.get("/nowhere"),
            "413 body": client.post("/batch", content=b"x" * (5 << 20)),
            "415": client.post("/batch", json={"regions": []}, headers={"Content-Encoding": "gzip"}),
        }
    assert answers["304"].status_code == 304 and answers["404"].status_code == 404
    assert answers["413 body"].status_code == 413 and answers["400 path"].status_code == 400
    for name, answer in answers.items():
        assert answer.headers.get_list("x-content-type-options") == ["nosniff"], name
    with live_server(root, token="t0k", cors_origins=("https://viewer.example",)) as secured:
        refused = httpx.get(f"{secured}/scans")
        preflight = httpx.options(
            f"{secured}/scans",
            headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"},
        )
    assert refused.status_code == 401 and refused.headers["x-content-type-options"] == "nosniff"
    assert preflight.status_code == 200 and preflight.headers["x-content-type-options"] == "nosniff"


def test_the_viewer_page_has_a_content_security_policy_of_what_it_uses(wide):
    url, _, _ = wide
    page = httpx.get(f"{url}/viewer")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    assert page.headers["content-security-policy"] == VIEWER_CSP
    # what the policy relies on: no inline script or style, no event-handler attributes
    html = page.text
    assert "<style" not in html and re.search(r"\s(style|on[a-z]+)\s*=", html) is None
    assert [tag for tag in html.split("<script")[1:] if "src=" not in tag.split(">")[0]] == []
    for other in ("/scans", "/viewer/static/viewer.js", f"/scans/{WIDE}/preview.png"):
        assert "content-security-policy" not in httpx.get(f"{url}{other}").headers, other


# -- Content-Encoding on POST /batch ------------------------------------------------------------


def test_batch_with_a_content_encoding_is_415(wide):
    url, _, _ = wide
    body = json.dumps({"regions": [{"scan_id": WIDE, "roi": "0:2,0:2,0"}]}).encode()
    plain = {"Content-Type": "application/json"}
    for encoding, named in (
        ("gzip", "gzip"),
        ("br", "br"),
        ("GZIP", "GZIP"),
        ("identity, gzip", "identity, gzip"),
    ):
        got = httpx.post(f"{url}/batch", content=body, headers={**plain, "Content-Encoding": encoding})
        assert got.status_code == 415, (encoding, got.text)
        assert got.json() == {
            **ENCODING_REFUSED,
            "detail": ENCODING_REFUSED["detail"].replace("'gzip'", repr(named)),
        }
        assert got.headers["cache-control"] == "no-store"
    # refused before the body's fields are checked: the encoding is what is wrong
    bad = httpx.post(f"{url}/batch", json={"regions": [{"scan_id": 5}]}, headers={"Content-Encoding": "gzip"})
    assert bad.status_code == 415 and bad.json() == ENCODING_REFUSED
    for fine in ({}, {"Content-Encoding": "identity"}, {"Content-Encoding": ""}):
        assert httpx.post(f"{url}/batch", content=body, headers={**plain, **fine}).status_code == 200, fine
    # a body that is really compressed (it does not decode as JSON) is refused alike
    packed = httpx.post(
        f"{url}/batch", content=gzip.compress(body), headers={**plain, "Content-Encoding": "gzip"}
    )
    assert packed.status_code == 415 and packed.json() == ENCODING_REFUSED
    documented = httpx.get(f"{url}/openapi.json").json()["paths"]["/batch"]["post"]["responses"]
    assert "415" in documented
