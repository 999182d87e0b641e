"""The labeling API under property-based fuzzing (hypothesis): whatever a client sends, it gets an
answer, 2xx or 4xx, never a 5xx, a dropped connection or a hang, and the label store stays sound.

Bounded for CI: 600 requests, each with a 10 s timeout (a hang fails the test), about
10-20 s in all on two cores.
"""
import http.client
import json
import sqlite3
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_label_app import Server, make_dataset

ROUTES = ["/", "/index.html", "/api/next", "/api/stats", "/api/labels", "/api/undo", "/images/0", "/images/3"]
LABELS = ["correct", "incorrect", "unsure"]

# JSON values of every kind, nested a little: what a confused or hostile client might put in a field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
# Mostly well-formed fields with odd values, sometimes anything at all.
fields = st.fixed_dictionaries({}, optional={
    "sample_id": st.integers(min_value=-3, max_value=25) | json_values,
    "label": st.sampled_from(LABELS) | json_values,
    "labeler": st.sampled_from(["ann", "bob", " ann ", "auto", ""]) | st.text(max_size=80) | json_values,
    "truth": json_values,
}) | st.dictionaries(st.text(max_size=12), json_values, max_size=4)
# Label submissions that are right in shape, with ids anywhere in (and beyond) SQLite's integers.
label_posts = st.fixed_dictionaries({
    "sample_id": st.integers(min_value=-3, max_value=25) | st.integers(min_value=2**62, max_value=2**80)
    | st.integers(min_value=-2**80, max_value=-2**62),
    "label": st.sampled_from(LABELS),
    "labeler": st.sampled_from(["ann", "bob", "auto"]) | st.text(min_size=1, max_size=70),
})
bodies = (label_posts.map(lambda d: json.dumps(d).encode())
          | fields.map(lambda d: json.dumps(d).encode())
          | json_values.map(lambda v: json.dumps(v).encode())
          | st.binary(max_size=64))
queries = st.dictionaries(st.sampled_from(["labeler", "truth", "token", "x"]) | st.text(max_size=6),
                          st.text(max_size=30), max_size=3)
paths = st.sampled_from(ROUTES) | st.text(max_size=30).map(lambda t: "/" + quote(t)) \
    | st.text(max_size=20).map(lambda t: "/images/" + quote(t))

# Anything at all in every part of the request ...
anything = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
    | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=8),
    "path": paths,
    "query": queries,
    "body": st.none() | bodies,
    "content_type": st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                     "application/x-www-form-urlencoded", None]),
    "host": st.sampled_from(["127.0.0.1", "localhost", "[::1]", "evil.example", None]),
})
# ... and requests a real client would send, right in method, route and headers, odd in their content:
# these reach the store, where a crash would hurt.
posts = st.fixed_dictionaries({
    "method": st.just("POST"), "path": st.sampled_from(["/api/labels", "/api/undo"]), "query": queries,
    "body": bodies, "content_type": st.just("application/json"), "host": st.just("127.0.0.1"),
})
gets = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "HEAD"]), "path": st.sampled_from(ROUTES) | paths, "query": queries,
    "body": st.none(), "content_type": st.none(), "host": st.just("localhost"),
})
requests = anything | posts | gets


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from rewards.label_store import LabelStore

    path = tmp_path_factory.mktemp("fuzz")
    with LabelStore(path / "labels.db", create=True) as store:
        store.add_samples(path / "data", make_dataset(path / "data", 20))
    server = Server(path / "labels.db")
    yield server, path / "labels.db"
    server.close()


def send(port: int, request: dict) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    target = request["path"] + ("?" + urlencode(request["query"]) if request["query"] else "")
    connection.putrequest(request["method"], target, skip_host=True, skip_accept_encoding=True)
    if request["host"] is not None:
        connection.putheader("Host", request["host"])
    if request["content_type"] is not None:
        connection.putheader("Content-Type", request["content_type"])
    body = request["body"]
    if body is not None:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    try:
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=requests)
def test_every_request_gets_a_2xx_or_4xx_answer(fuzz_server, request):
    server, _ = fuzz_server
    status = send(server.port, request)
    assert 200 <= status < 500, f"{status} for {request}"


def test_after_the_fuzzing_the_store_passes_its_integrity_check_and_still_labels(fuzz_server):
    server, path = fuzz_server
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    status, data = server.request("POST", "/api/labels", {"sample_id": 1, "label": "correct", "labeler": "zed"})
    assert status == 201, data
