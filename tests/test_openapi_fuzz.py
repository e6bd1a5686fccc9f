"""A fuzzer driven by ``/openapi.json`` (schemathesis) against a live server with predictions:
every status any route answers is one its operation documents, none is a 5xx the document does
not name, and error bodies are one line without paths. Routes behind a scan id get real ids
(scans with and without a prediction, an image-only scan) as well as invalid ones, so the
fuzzing reaches the routes' own checks, not only their 404s."""

from __future__ import annotations

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from live_server import live_server
from schemathesis import GenerationMode
from test_predictions import softmax_model

from loaders import Config, DatasetCatalog, build_loader, write_predictions

TOKEN = "fuzz-token-123"
WITH_PREDICTION = "0000001_V00-Aug00"
WITHOUT_PREDICTION = "0000002_V00-Aug00"
IMAGE_ONLY = "0000003_V00-Aug01"
REAL_IDS = [WITH_PREDICTION, WITHOUT_PREDICTION, IMAGE_ONLY]
ODD_IDS = ["no_such_scan", "..", "a b", "0000001_V00-Aug00.x", "x" * 300]
ZARR_PATHS = [
    "zarr.json",
    f"{WITH_PREDICTION}/zarr.json",
    f"{WITH_PREDICTION}/image/zarr.json",
    f"{WITH_PREDICTION}/image/c/0/0/0",
    f"{WITH_PREDICTION}/mask/c/0/0/0/0",
    f"{IMAGE_ONLY}/image/c/0/0/0",
    "../secret",
    f"{WITH_PREDICTION}/../../x",
    ".scan-versions/x/zarr.json",
]
EXAMPLES = 20


@pytest.fixture(scope="module")
def served(small_store, tmp_path_factory):
    root, _ = small_store
    pred = tmp_path_factory.mktemp("fuzz") / "pred"
    DatasetCatalog.remove("fuzz_one")
    DatasetCatalog.register("fuzz_one", str(root), split="train")
    try:
        cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)
        loader = build_loader(cfg, "fuzz_one", batch_size=4, is_test=True, shuffle=False, drop_last=False)
        write_predictions(loader, softmax_model, pred)  # the train split: 0000001_V00 and _V01
    finally:
        DatasetCatalog.remove("fuzz_one")
    with live_server(root, token=TOKEN, predictions=pred) as url:
        yield url, str(root), str(pred)


def _pin(case, scan_id: str, zarr_path: str, authorized: bool) -> None:
    params = case.path_parameters or {}
    if "scan_id" in params:
        params["scan_id"] = scan_id
    if "path" in params:
        params["path"] = zarr_path
    if "name" in params and authorized:  # the viewer's files: real names half of the time
        params["name"] = scan_id if scan_id in ODD_IDS else "viewer.js"
    if authorized:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}


def _fuzz(operation, mode, url, roots, statuses, problems) -> None:
    """Run ``EXAMPLES`` generated cases of one operation, recording statuses and problems."""
    name = f"{operation.method.upper()} {operation.path}"
    documented = {str(code) for code in operation.definition.raw["responses"]}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        case=operation.as_strategy(generation_mode=mode),
        scan_id=st.sampled_from(REAL_IDS * 3 + ODD_IDS),
        zarr_path=st.sampled_from(ZARR_PATHS),
        authorized=st.sampled_from([True, True, True, False]),
    )
    def run(case, scan_id, zarr_path, authorized):
        _pin(case, scan_id, zarr_path, authorized)
        response = case.call(base_url=url, timeout=30)
        code = response.status_code
        statuses[name][code] += 1
        where = f"{name} {case.formatted_path} query={case.query}"
        if str(code) not in documented:
            problems.append(f"{where}: undocumented {code} {response.text[:120]}")
        if code >= 500 and code != 503:
            problems.append(f"{where}: {code} {response.text[:200]}")
        if code >= 400 and response.headers.get("content-type") == "application/json":
            detail = response.json().get("detail")
            if not isinstance(detail, str) or "\n" in detail:
                problems.append(f"{where}: error detail is not one line: {detail!r}")
            if any(root in response.text for root in roots) or "/tmp/" in response.text:
                problems.append(f"{where}: error leaks a path: {response.text[:200]}")

    try:
        run()
    except Unsatisfiable:  # negative cases of an operation without parameters (GET /health)
        assert mode is GenerationMode.NEGATIVE, name


def test_every_status_is_documented_and_no_route_fails(served):
    url, *roots = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
    problems: list[str] = []
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, url, roots, statuses, problems)
    assert not problems, "\n".join(sorted(set(problems))[:40])
    # The fuzzing got past the 404s: every route behind a scan id answered 200 to some case.
    behind_ids = [f"{op.method.upper()} {op.path}" for op in operations if "{scan_id}" in op.path]
    assert len(behind_ids) >= 6
    for name in behind_ids:
        assert statuses[name][200] > 0, (name, dict(statuses[name]))
    for name in ("GET /zarr/{path}", "GET /predictions/zarr/{path}"):
        assert statuses[name][200] > 0, (name, dict(statuses[name]))


def test_the_reported_undocumented_400_is_documented(served):
    """The issue's reproduction: an encoded backslash in a viewer file name is refused by the path
    guard with 400, which the operation now documents (as every guarded status of every route)."""
    url, *_ = served
    response = httpx.get(f"{url}/viewer/static/a%5Cb")
    assert response.status_code == 400
    assert "encoded slashes" in response.json()["detail"]
    doc = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"400", "431"} <= codes, (method, path)
            assert "401" in codes or path in ("/health", "/viewer", "/viewer/static/{name}"), (method, path)
            assert method != "post" or "413" in codes, path
