"""The OpenAPI document tells the truth and /docs, /redoc work without the internet."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from http_support import PROBLEM, in_process_app


@pytest.fixture(scope="module")
def client(tiny_run, tmp_path_factory):
    replica, app = in_process_app(tiny_run, tmp_path_factory.mktemp("docs"))
    with TestClient(app) as c:
        yield c
    replica.close()


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_app_itself(client, page):
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and not [a for a in assets if a.startswith("http")], assets
    for url in assets:
        resp = client.get(url)
        assert resp.status_code == 200 and len(resp.content) > 1000, url
    assert "cdn" not in html and "fonts.googleapis" not in html


def test_every_operation_has_a_tag_summary_description_and_problem_responses(doc):
    tags = {t["name"] for t in doc["tags"]}
    assert tags == {"recommendations", "events", "marketing", "admin"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("tags") and set(op["tags"]) <= tags, where
            assert op.get("summary") and op.get("description"), where
            assert "500" in op["responses"], where
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(resp["content"]) == [PROBLEM], where
                    assert resp["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
            if "requestBody" in op:
                content = op["requestBody"]["content"]["application/json"]
                schema = content["schema"]
                if "$ref" in schema:
                    schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
                assert content.get("examples") or schema.get("examples"), where
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_writes_declare_the_bearer_scheme_and_their_401_403(doc):
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    for path in ("/events", "/feedback", "/audiences", "/admin/reload"):
        op = doc["paths"][path]["post"]
        assert op["security"] == [{"bearerAuth": []}], path
        assert {"401", "403", "413", "415", "422"} <= set(op["responses"]), path
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_batch_endpoints_document_their_item_schemas(doc):
    for path, item in (("/events", "Event"), ("/feedback", "Feedback")):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "array" and schema["items"] == {"$ref": f"#/components/schemas/{item}"}
        assert schema["maxItems"] == 10_000
        assert doc["components"]["schemas"][item]["additionalProperties"] is False
    ts = doc["components"]["schemas"]["Event"]["properties"]["timestamp"]
    assert "date-time" in str(ts) and "4102444800" in str(ts)
    k = doc["components"]["schemas"]["RecommendRequest"]["properties"]["k"]
    assert k["type"] == "integer" and k["maximum"] == 200
