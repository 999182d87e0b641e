"""Labeling app: concurrency, durability under SIGKILL, bad requests, path traversal, token, leases."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from rewards.label_app import make_server
from rewards.label_store import LabelStore
from tests.conftest import REPO


def make_dataset(root, n):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / "images" / f"{i}.png")
    (root.parent / "secret.txt").write_text("outside the image root")
    return [{"question_id": f"q{i}", "image": f"images/{i}.png", "question": f"Question {i}?", "answer": "yes",
             "gt_answers": ["yes"] * 10} for i in range(n)]


@pytest.fixture
def db(tmp_path):
    root = tmp_path / "data"
    with LabelStore(tmp_path / "labels.db", create=True) as store:
        store.add_samples(root, make_dataset(root, 20))
    return tmp_path / "labels.db"


class Server:
    def __init__(self, db, **kwargs):
        self.store = LabelStore(db)
        self.httpd = make_server(self.store, "127.0.0.1", 0, **kwargs)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, raw=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = dict(headers or {})
        if body is not None:
            raw = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=raw, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.store.close()


@pytest.fixture
def server(db):
    server = Server(db)
    yield server
    server.close()


def post_label(server, sample_id, labeler="ann", label="correct"):
    return server.request("POST", "/api/labels", {"sample_id": sample_id, "label": label, "labeler": labeler})


def test_next_label_stats_round_trip(server):
    status, data = server.request("GET", "/api/next?labeler=ann")
    item = json.loads(data)
    assert status == 200 and set(item) == {"sample_id", "question", "answer", "image_url", "progress"}
    assert "gt_answers" not in item  # ground truth hidden by default
    status, data = server.request("GET", item["image_url"])
    assert status == 200 and data.startswith(b"\x89PNG")
    status, data = post_label(server, item["sample_id"])
    assert status == 201 and json.loads(data)["sample_id"] == item["sample_id"]
    stats = json.loads(server.request("GET", "/api/stats")[1])
    assert stats["per_labeler"]["ann"]["correct"] == 1 and stats["progress"]["done"] == 1
    truth = json.loads(server.request("GET", "/api/next?labeler=ann&truth=1")[1])
    assert truth["gt_answers"] == ["yes"] * 10 and truth["sample_id"] != item["sample_id"]
    status, data = server.request("GET", "/")
    assert status == 200 and b"Is the answer correct?" in data


def test_two_labelers_get_different_items_and_a_reload_gets_the_same(server):
    first = json.loads(server.request("GET", "/api/next?labeler=ann")[1])["sample_id"]
    second = json.loads(server.request("GET", "/api/next?labeler=bob")[1])["sample_id"]
    assert first != second
    assert json.loads(server.request("GET", "/api/next?labeler=ann")[1])["sample_id"] == first
    post_label(server, first)
    assert json.loads(server.request("GET", "/api/next?labeler=ann")[1])["sample_id"] not in (first, second)


def test_an_expired_lease_frees_the_item(db):
    server = Server(db, lease_seconds=0.3)
    try:
        assert json.loads(server.request("GET", "/api/next?labeler=ann")[1])["sample_id"] == 1
        assert json.loads(server.request("GET", "/api/next?labeler=bob")[1])["sample_id"] == 2
        time.sleep(0.4)  # ann walked away without labeling
        assert json.loads(server.request("GET", "/api/next?labeler=cy")[1])["sample_id"] == 1
    finally:
        server.close()


def test_204_when_nothing_is_left_and_undo_brings_the_item_back(server):
    for sample_id in range(1, 21):
        assert post_label(server, sample_id, label="incorrect")[0] == 201
    assert server.request("GET", "/api/next?labeler=ann")[0] == 204
    status, data = server.request("POST", "/api/undo", {"labeler": "ann"})
    assert status == 200 and json.loads(data)["sample_id"] == 20
    assert json.loads(server.request("GET", "/api/next?labeler=ann")[1])["sample_id"] == 20
    assert len(server.store.all_labels()) == 20  # undo keeps the row
    assert server.request("POST", "/api/undo", {"labeler": "nobody"})[0] == 409


def test_eight_concurrent_clients_of_a_hundred_labels_store_exactly_800(server):
    def client(index):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # keep-alive
        ids = []
        for i in range(100):
            body = json.dumps({"sample_id": 1 + (index * 100 + i) % 20, "label": "correct", "labeler": f"c{index}"})
            connection.request("POST", "/api/labels", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 201
            ids.append(json.loads(response.read())["label_id"])
        connection.close()
        return ids

    with ThreadPoolExecutor(8) as pool:
        ids = [i for chunk in pool.map(client, range(8)) for i in chunk]
    assert len(ids) == len(set(ids)) == 800
    rows = server.store.all_labels()
    assert len(rows) == 800 and {r["id"] for r in rows} == set(ids)
    assert {r["labeler"] for r in rows} == {f"c{i}" for i in range(8)}


@pytest.mark.parametrize("body, raw, headers, status", [
    ({"sample_id": 999, "label": "correct", "labeler": "ann"}, None, {}, 404),
    ({"sample_id": 1, "label": "great", "labeler": "ann"}, None, {}, 400),
    ({"sample_id": "1", "label": "correct", "labeler": "ann"}, None, {}, 400),
    ({"sample_id": 1, "label": "correct"}, None, {}, 400),
    ({"sample_id": 1, "label": "correct", "labeler": "auto"}, None, {}, 400),
    ({"sample_id": 1, "label": "correct", "labeler": "ann", "admin": True}, None, {}, 400),
    (None, b"{not json", {"Content-Type": "application/json"}, 400),
    (None, b"[1, 2]", {"Content-Type": "application/json"}, 400),
    (None, b"\xff\xfe", {"Content-Type": "application/json"}, 400),
    (None, b'{"sample_id": 1, "label": "correct", "labeler": "' + b"a" * 20000 + b'"}',
     {"Content-Type": "application/json"}, 413),
    (None, b'{"sample_id": 1, "label": "correct", "labeler": "ann"}', {"Content-Type": "text/plain"}, 415),
])
def test_bad_requests_get_4xx_and_change_nothing(server, body, raw, headers, status):
    got, data = server.request("POST", "/api/labels", body=body, raw=raw, headers=headers)
    assert got == status and "error" in json.loads(data)
    assert server.store.all_labels() == []


def test_other_bad_requests(server):
    assert server.request("GET", "/api/next")[0] == 400  # no labeler
    assert server.request("GET", "/api/next?labeler=" + "x" * 100)[0] == 400
    assert server.request("GET", "/api/nope")[0] == 404
    assert server.request("PUT", "/api/labels", raw=b"{}")[0] == 405
    assert server.request("POST", "/api/stats", body={})[0] == 405
    assert server.request("GET", "/api/next?labeler=ann", headers={"Host": "evil.example:80"})[0] == 403
    assert server.store.all_labels() == []


@pytest.mark.parametrize("path", [
    "/images/../../secret.txt", "/images/..%2F..%2Fsecret.txt", "/images/%2e%2e/%2e%2e/secret.txt",
    "/images//etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/1/../../secret.txt", "/images/-1", "/images/0",
    "/images/999", "/images/1%00", "/images/images/1.png", "/../secret.txt", "/%2e%2e/secret.txt",
    "/images/\u0661",  # an Arabic-Indic digit: isdigit() but not a sample id
])
def test_traversal_never_serves_a_file_outside_the_store_images(server, path):
    # A raw socket: the path goes out byte for byte, as an attacker would send it (no client normalizing).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.split(b"\r\n")[0].split(b" ")[1] == b"404"
    assert b"outside the image root" not in data and b"root:" not in data


def test_a_sample_whose_image_path_escapes_the_root_is_not_served(db, tmp_path):
    with LabelStore(db) as store:
        store.add_samples(tmp_path / "data", [{"question_id": "evil", "image": "../secret.txt", "question": "?",
                                               "answer": "blue"},
                                              {"question_id": "abs", "image": str(tmp_path / "secret.txt"),
                                               "question": "?", "answer": "blue"}])
    server = Server(db)
    try:
        assert server.request("GET", "/images/21")[0] == 404
        assert server.request("GET", "/images/22")[0] == 404
        assert server.request("GET", "/images/1")[0] == 200
    finally:
        server.close()


def test_token_is_required_on_every_request(db):
    server = Server(db, token="s3cret")
    try:
        for method, path in [("GET", "/"), ("GET", "/api/next?labeler=ann"), ("GET", "/api/stats"),
                             ("GET", "/images/1")]:
            assert server.request(method, path)[0] == 401
        assert post_label(server, 1)[0] == 401
        assert server.request("GET", "/api/stats", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert server.store.all_labels() == []
        auth = {"Authorization": "Bearer s3cret"}
        assert server.request("GET", "/api/stats", headers=auth)[0] == 200
        assert server.request("POST", "/api/labels", {"sample_id": 1, "label": "correct", "labeler": "ann"},
                              headers=auth)[0] == 201
        assert server.request("GET", "/images/1", headers={"Cookie": "vqa_label_token=s3cret"})[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/?token=s3cret")
        response = connection.getresponse()
        response.read()
        assert response.status == 200 and "HttpOnly" in response.getheader("Set-Cookie")
    finally:
        server.close()


def test_refuses_a_non_loopback_bind_without_token(db):
    store = LabelStore(db)
    with pytest.raises(SystemExit, match="without --token"):
        make_server(store, "0.0.0.0", 0)
    result = subprocess.run([sys.executable, "-m", "stages.cli", "label", "--db", str(db), "--host", "0.0.0.0"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0 and "refusing to bind 0.0.0.0 without --token" in result.stderr
    store.close()


def test_sigkill_mid_burst_loses_no_acknowledged_label(db):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rewards.label_app", "--db", str(db), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    port = int(process.stdout.readline().split("http://127.0.0.1:")[1].split("/")[0])
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def client(index):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        i = 0
        while not stop.is_set():
            body = json.dumps({"sample_id": 1 + i % 20, "label": "correct", "labeler": f"c{index}"})
            try:
                connection.request("POST", "/api/labels", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                return  # the server is gone
            if response.status == 201:
                with lock:
                    acknowledged.append(json.loads(data)["label_id"])
            i += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 20
    while len(acknowledged) < 300 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-burst: the clients are still posting
    process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    assert len(acknowledged) >= 300

    with LabelStore(db) as store:  # opens cleanly: WAL recovery, schema check, integrity
        assert store.check_integrity() == "ok"
        stored = {r["id"] for r in store.all_labels()}
    assert set(acknowledged) <= stored
    assert len(stored) - len(acknowledged) <= 8  # at most one in flight per client went unacknowledged


def test_pairwise_mode_round_trip(tmp_path):
    root = tmp_path / "data"
    with LabelStore(tmp_path / "labels.db", create=True) as store:
        rows = make_dataset(root, 2)
        store.add_samples(root, rows + [{**rows[0], "answer": "no"}])  # samples 1 and 3 answer question 0
    server = Server(tmp_path / "labels.db")
    try:
        status, data = server.request("GET", "/api/next-pair?labeler=ann")
        pair = json.loads(data)
        assert status == 200 and (pair["a"], pair["b"]) == ({"sample_id": 1, "answer": "yes"},
                                                             {"sample_id": 3, "answer": "no"})
        assert pair["question"] == "Question 0?" and pair["progress"] == {"pairs_by_you": 0}
        assert server.request("GET", pair["image_url"])[0] == 200
        body = {"sample_a": 1, "sample_b": 3, "verdict": "b", "labeler": "ann"}
        status, data = server.request("POST", "/api/comparisons", body)
        assert status == 201 and json.loads(data)["verdict"] == "b"
        assert server.request("GET", "/api/next-pair?labeler=ann")[0] == 204
        assert server.request("GET", "/api/next-pair?labeler=bob")[0] == 200
        assert server.request("POST", "/api/comparisons", {**body, "verdict": "maybe"})[0] == 400
        assert server.request("POST", "/api/comparisons", {**body, "sample_b": 2})[0] == 400  # another question
        assert server.request("POST", "/api/comparisons", {**body, "sample_b": 42})[0] == 404
        assert server.request("POST", "/api/comparisons", {**body, "extra": 1})[0] == 400
        assert [(c["sample_a"], c["sample_b"], c["verdict"]) for c in server.store.all_comparisons()] == [(1, 3, "b")]
    finally:
        server.close()
