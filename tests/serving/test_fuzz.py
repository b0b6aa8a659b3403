"""A property-based fuzz of the OpenAPI document (schemathesis over the in-process ASGI app).

Each operation gets ``CASES`` valid and ``CASES`` invalid requests generated from its schema with a
fixed seed (``derandomize``), so a failure repeats on every run. Properties: no 5xx, every 4xx a
problem+json body with its status, and with a token configured every write endpoint answers 401 to
a request without one. The whole module stays well under 90 s on two shared cores.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from http_support import PROBLEM, TOKEN, in_process_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

CASES = 20  # per operation and mode: ~13 operations x 2 modes x 20, about 10 s here
WRITES = {("POST", "/events"), ("POST", "/feedback"), ("POST", "/audiences"), ("POST", "/admin/reload")}


@pytest.fixture(scope="module")
def secured(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "token").write_text(TOKEN)
    replica, app = in_process_app(tiny_run, tmp, api_token_file=str(tmp / "token"))
    yield app
    replica.close()


def check(resp, where: str) -> None:
    assert resp.status_code < 500, f"{where}: {resp.status_code} {resp.text[:500]}"
    if resp.status_code >= 400:
        ctype = resp.headers.get("content-type") or resp.headers.get("Content-Type") or [""]
        ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps every value of a header
        assert ctype.startswith(PROBLEM), f"{where}: {ctype}"
        body = resp.json()
        assert body["status"] == resp.status_code and body["title"] and body["detail"], where


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_generated_request_gets_a_5xx_and_every_4xx_is_a_problem(secured):
    auth = {"authorization": f"Bearer {TOKEN}"}
    calls = 0
    for op in operations(secured):
        if (op.method.upper(), op.path) == ("POST", "/admin/reload"):
            continue  # a reload loads a model per case: covered by its own tests, too slow to fuzz
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            where = f"{op.method.upper()} {op.path} ({mode.value})"

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=CASES, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                nonlocal calls
                calls += 1
                check(case.call(headers=auth), where)

            try:
                run()
            except Unsatisfiable:  # nothing in it can be invalid (GET /segments has no inputs)
                assert mode == GenerationMode.NEGATIVE, where
    assert calls > 100


def test_every_write_endpoint_answers_401_without_a_token(secured):
    ops = {(op.method.upper(), op.path): op for op in operations(secured)}
    assert WRITES <= set(ops)
    with TestClient(secured) as c:
        for method, path in sorted(WRITES):
            op = ops[(method, path)]

            @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
            @settings(max_examples=5, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                case.headers = headers  # the generator fills in a made-up token for secured operations
                resp = case.call()
                assert resp.status_code in (401, 413, 415, 422), f"{method} {path}: {resp.status_code}"
                check(resp, f"{method} {path}")

            run()
            assert c.post(path, json={}).status_code == 401
