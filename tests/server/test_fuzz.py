"""Fuzzing the real server with hypothesis: whatever a client sends, never a 5xx and never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.server]

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "fp32", "", "FLOAT"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=30)
shapes = st.one_of(st.lists(st.integers(-3, 10), max_size=4), json_values)
numbers = st.lists(st.one_of(st.floats(allow_nan=False, width=32), st.integers(-5, 5)), max_size=40)
data = st.one_of(numbers, st.lists(numbers, max_size=5), json_values)
tensor = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["input", "in_a", "in_b", "x"]), st.text(max_size=5)),
     "shape": shapes, "datatype": st.one_of(st.sampled_from(DATATYPES), json_values), "data": data},
    optional={"parameters": st.one_of(st.dictionaries(st.sampled_from(["binary_data_size", "content_type", "x"]), json_values, max_size=2), json_values)},
)
requests_v2 = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor, max_size=3), json_values)},
    optional={"id": json_values, "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.text(max_size=6)}), max_size=3), json_values),
              "parameters": json_values},
)


def _check(resp: requests.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert "error" in resp.json(), resp.text[:300]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=requests_v2)
def test_v2_json_never_5xx(small_server: Any, two_io_server: Any, body: dict[str, Any]) -> None:
    for server in (small_server, two_io_server):
        _check(server.post(f"/v2/models/{server.name}/infer", data=json.dumps(body, allow_nan=True),
                           headers={"Content-Type": "application/json"}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=400), header_len=st.one_of(st.none(), st.integers(-5, 500), st.text(alphabet="0123456789abc-+.x", min_size=1, max_size=5)),
       content_type=st.sampled_from(["application/json", "application/octet-stream", "text/plain", "", "application/json; charset=latin-1"]))
def test_raw_bytes_and_binary_headers_never_5xx(small_server: Any, raw: bytes, header_len: Any, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    if header_len is not None:
        headers["Inference-Header-Content-Length"] = str(header_len)
    _check(small_server.post(f"/v2/models/{small_server.name}/infer", data=raw, headers=headers))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(instances=json_values, extra=st.dictionaries(st.text(max_size=6), json_values, max_size=2))
def test_v1_never_5xx(small_server: Any, instances: Any, extra: dict[str, Any]) -> None:
    _check(small_server.post(f"/v1/models/{small_server.name}:predict", data=json.dumps({"instances": instances, **extra}, allow_nan=True),
                             headers={"Content-Type": "application/json"}))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="#?"), max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
def test_any_route_never_5xx(small_server: Any, path: str, method: str) -> None:
    resp = requests.request(method, f"{small_server.url}/{path}", timeout=10)
    assert resp.status_code < 500, (method, path, resp.status_code)


def test_server_survived_the_fuzzing(small_server: Any, two_io_server: Any) -> None:
    for server in (small_server, two_io_server):
        assert server.proc.poll() is None
        assert server.get("/v2/health/ready").status_code == 200
        assert server.get(f"/v2/models/{server.name}").json()["name"] == server.name
