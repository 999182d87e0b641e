"""The labeling web app: a page for people and a JSON API for it and for scripts.

    vqa-rlhf label --db runs/default/labels/labels.db [--host 127.0.0.1] [--port 8765] [--token T]

Open http://127.0.0.1:8765/ (with a token: http://HOST:PORT/?token=T) and type a
name. Keys: c or 1 = correct, x or 2 = incorrect, u or 3 = unsure, z or Backspace
= undo the last label, g = show / hide the ground-truth answers. Pairwise mode
(http://127.0.0.1:8765/?mode=pairs): two answers to the same image and question;
a = A better, b = B better, r = both right, w = both wrong.

API (JSON; with --token every request needs it: `Authorization: Bearer T`, or the
cookie the page gets from /?token=T; without it: 401):
  GET  /api/next?labeler=NAME   -> 200 {"sample_id", "question", "answer", "image_url", "progress"}, or 204 when
                                   nothing is left for NAME. The item is leased to NAME for --lease seconds,
                                   so several labelers at once get different items.
  POST /api/labels {"sample_id", "label", "labeler"}  -> 201 {"label_id", ...} once stored durably
  POST /api/undo {"labeler"}    -> 200 the withdrawn sample (leased to NAME again), or 409 if nothing to undo
  GET  /api/stats               -> per-labeler counts, Cohen's kappa between labelers, auto-vs-human agreement
  GET  /api/next-pair?labeler=NAME -> 200 {"question", "image_url", "a": {"sample_id", "answer"}, "b": {...},
                                   "progress": {"pairs_by_you"}}: two answers to one question NAME has not
                                   compared yet, or 204 when none is left
  POST /api/comparisons {"sample_a", "sample_b", "verdict", "labeler"} (verdict: a | b | both_right |
                                   both_wrong) -> 201 {"comparison_id", ...} once stored durably
  GET  /images/SAMPLE_ID        -> that sample's image (only images of samples in the store)
A full disk answers 507 (nothing stored; submit again once there is space).

Security: binds 127.0.0.1 unless told otherwise, and refuses any other address
without --token. Without a token, requests must name a loopback Host (DNS
rebinding). POST bodies must be application/json (no cross-site form posts) and
at most 16 KiB.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import mimetypes
import os
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from vlm.files import is_disk_full
from rewards.label_store import LabelStore, StoreError, UnknownSample, check_labeler

PAGE = Path(__file__).with_name("label_page.html")
MAX_BODY = 16 * 1024
COOKIE = "vqa_label_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Leases:
    """Which labeler holds which item, in memory: a lease is a hint that spreads labelers over
    items, not data; after a restart labelers simply get new items."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._held: dict[str, tuple[int, float]] = {}  # labeler -> (sample_id, expires)
        self.lock = threading.Lock()

    def held_by_others(self, labeler: str, now: float) -> set[int]:
        return {sid for name, (sid, expires) in self._held.items() if name != labeler and expires > now}

    def mine(self, labeler: str, now: float) -> int | None:
        held = self._held.get(labeler)
        return held[0] if held and held[1] > now else None

    def give(self, labeler: str, sample_id: int, now: float) -> None:
        self._held[labeler] = (sample_id, now + self.seconds)

    def release(self, labeler: str, sample_id: int) -> None:
        with self.lock:
            if self._held.get(labeler, (None,))[0] == sample_id:
                del self._held[labeler]


class LabelApp:
    def __init__(self, store: LabelStore, token: str | None = None, lease_seconds: float = 120.0,
                 per_item: int = 1):
        self.store = store
        self.token = token
        self.per_item = per_item
        self.leases = Leases(lease_seconds)
        self.page = PAGE.read_bytes()

    def item(self, sample: dict, labeler: str, truth: bool) -> dict:
        item = {"sample_id": sample["sample_id"], "question": sample["question"], "answer": sample["answer"],
                "image_url": f"/images/{sample['sample_id']}",
                "progress": self.store.progress(labeler, self.per_item)}
        if truth:
            item["gt_answers"] = sample["gt_answers"]
        return item

    def next_item(self, labeler: str, truth: bool) -> dict | None:
        with self.leases.lock:  # pick + lease atomically: two labelers never get the same item
            now = time.time()
            held = self.leases.mine(labeler, now)
            sample = None
            if held is not None and not self.store.has_label(held, labeler):
                sample = self.store.sample(held)  # a reload shows the same item again
            if sample is None:
                sample = self.store.next_sample(labeler, self.per_item, self.leases.held_by_others(labeler, now))
            if sample is None:
                return None
            self.leases.give(labeler, sample["sample_id"], now)
        return self.item(sample, labeler, truth)

    def undo(self, labeler: str, truth: bool) -> dict | None:
        undone = self.store.undo(labeler)
        if undone is None:
            return None
        with self.leases.lock:
            self.leases.give(labeler, undone["sample_id"], time.time())
        return {"undone_label_id": undone["label_id"], **self.item(self.store.sample(undone["sample_id"]),
                                                                   labeler, truth)}


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class LabelHandler(BaseHTTPRequestHandler):
    """The labeling app's HTTP API and page; make_handler binds it to one LabelApp."""
    app: LabelApp
    log_requests = False  # the stock per-request log line (--log)
    protocol_version = "HTTP/1.1"  # keep-alive: scripts and the page reuse one connection
    # Headers and body go out as two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK (40 ms per request on Linux).
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection gives its thread back after this many seconds
    server_version = "vqa-rlhf-label"
    sys_version = ""

    def log_message(self, format, *args):
        if self.log_requests:
            super().log_message(format, *args)

    # -- plumbing -----------------------------------------------------------

    def _send(self, status: HTTPStatus, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data) -> None:
        self._send(status, json.dumps(data).encode())

    def _authorized(self, query: dict) -> bool:
        if self.app.token is None:
            return True
        offered = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        offered += query.get("token", [])
        return any(hmac.compare_digest(t.encode(), self.app.token.encode()) for t in offered)

    def _body(self) -> dict:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        try:
            length = int(length)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length > MAX_BODY or length < 0:
            self.close_connection = True  # do not read an oversized body
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        try:
            data = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return data

    def _handle(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if self.app.token is None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0] if self.headers.get("Host") else ""
                if not is_loopback(host):
                    raise HttpError(HTTPStatus.FORBIDDEN, "Host must be a loopback name (or start with --token)")
            if not self._authorized(query):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
            name = _route_name(url.path)
            route = getattr(self, f"{method}_{name}", None)
            if route is None:
                raise HttpError(HTTPStatus.NOT_FOUND if name == "other" else HTTPStatus.METHOD_NOT_ALLOWED,
                                "not found" if name == "other" else "method not allowed")
            route(url.path, query)
        except HttpError as exc:
            if method == "post":
                self.close_connection = True  # an unread body must not be taken for the next request
            self._json(exc.status, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001  every request gets an answer, never a dropped connection
            self.close_connection = True
            if is_disk_full(exc):  # the label was not stored (its transaction rolled back): say so, 507
                self._json(HTTPStatus.INSUFFICIENT_STORAGE,
                           {"error": f"the label store's disk is full ({exc}); nothing was stored, "
                                     f"submit again once there is space"})
            else:
                traceback.print_exc()
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}"})

    def do_GET(self):
        self._handle("get")

    def do_HEAD(self):
        self._handle("get")

    def do_POST(self):
        self._handle("post")

    def do_PUT(self):
        self._method_not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def __getattr__(self, name):
        # Any other method (OPTIONS, TRACE, made-up ones) is a client error here, 405, not the
        # stock handler's 501: the API has a fixed set of methods and says which.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self):
        self.close_connection = True
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})

    # -- routes -------------------------------------------------------------

    def get_page(self, path, query):
        headers = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                              "style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'"}
        if self.app.token is not None and query.get("token"):
            headers["Set-Cookie"] = f"{COOKIE}={self.app.token}; HttpOnly; SameSite=Strict; Path=/"
        self._send(HTTPStatus.OK, self.app.page, "text/html; charset=utf-8", headers)

    def get_next(self, path, query):
        try:
            labeler = check_labeler((query.get("labeler") or [None])[0])
        except StoreError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        item = self.app.next_item(labeler, truth=(query.get("truth") or ["0"])[0] == "1")
        if item is None:
            self._send(HTTPStatus.NO_CONTENT, b"")
        else:
            self._json(HTTPStatus.OK, item)

    def get_stats(self, path, query):
        stats = self.app.store.stats()
        stats["progress"] = self.app.store.progress(None, self.app.per_item)
        self._json(HTTPStatus.OK, stats)

    def get_image(self, path, query):
        # /images/<sample id>: the URL names a sample, never a path, so there is nothing to traverse;
        # the store still checks that the sample's file resolves inside its image root.
        name = path[len("/images/"):]
        if not name.isascii() or not name.isdigit() or len(name) > 18:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such image")
        image = self.app.store.image_path(int(name))
        content_type = mimetypes.guess_type(image.name)[0] if image else None
        if image is None or not (content_type or "").startswith("image/"):
            raise HttpError(HTTPStatus.NOT_FOUND, "no such image")
        self._send(HTTPStatus.OK, image.read_bytes(), content_type,
                   {"Cache-Control": "private, max-age=3600"})

    def post_labels(self, path, query):
        data = self._body()
        unknown = set(data) - {"sample_id", "label", "labeler"}
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {sorted(unknown)}")
        try:
            label_id = self.app.store.add_label(data.get("sample_id"), data.get("labeler"), data.get("label"))
        except UnknownSample as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None
        except StoreError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self.app.leases.release(data["labeler"].strip(), data["sample_id"])
        self._json(HTTPStatus.CREATED, {"label_id": label_id, "sample_id": data["sample_id"],
                                        "label": data["label"], "labeler": data["labeler"].strip()})

    def get_next_pair(self, path, query):
        try:
            labeler = check_labeler((query.get("labeler") or [None])[0])
        except StoreError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        pair = self.app.store.next_pair(labeler)
        if pair is None:
            self._send(HTTPStatus.NO_CONTENT, b"")
            return
        a, b = pair
        item = {"question": a["question"], "image_url": f"/images/{a['sample_id']}",
                "a": {"sample_id": a["sample_id"], "answer": a["answer"]},
                "b": {"sample_id": b["sample_id"], "answer": b["answer"]},
                "progress": {"pairs_by_you": self.app.store.comparisons_by(labeler)}}
        if (query.get("truth") or ["0"])[0] == "1":
            item["gt_answers"] = a["gt_answers"]
        self._json(HTTPStatus.OK, item)

    def post_comparisons(self, path, query):
        data = self._body()
        unknown = set(data) - {"sample_a", "sample_b", "verdict", "labeler"}
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {sorted(unknown)}")
        try:
            comparison_id = self.app.store.add_comparison(data.get("sample_a"), data.get("sample_b"),
                                                     data.get("labeler"), data.get("verdict"))
        except UnknownSample as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None
        except StoreError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self._json(HTTPStatus.CREATED, {"comparison_id": comparison_id, "sample_a": data["sample_a"],
                                        "sample_b": data["sample_b"], "verdict": data["verdict"],
                                        "labeler": data["labeler"].strip()})

    def post_undo(self, path, query):
        data = self._body()
        try:
            undone = self.app.undo(data.get("labeler"), truth=bool(data.get("truth")))
        except StoreError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        if undone is None:
            raise HttpError(HTTPStatus.CONFLICT, "nothing to undo")
        self._json(HTTPStatus.OK, undone)


def make_handler(app: LabelApp, log: bool = False) -> type[LabelHandler]:
    return type("Handler", (LabelHandler,), {"app": app, "log_requests": log})


def _route_name(path: str) -> str:
    if path in ("/", "/index.html"):
        return "page"
    if path.startswith("/images/"):
        return "image"
    return {"/api/next": "next", "/api/stats": "stats", "/api/labels": "labels", "/api/undo": "undo",
            "/api/next-pair": "next_pair", "/api/comparisons": "comparisons"}.get(path, "other")


def make_server(store: LabelStore, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                lease_seconds: float = 120.0, per_item: int = 1, log: bool = False) -> ThreadingHTTPServer:
    if not is_loopback(host) and not token:
        raise SystemExit(f"error: refusing to bind {host} without --token: anyone who can reach it could "
                         f"read and write labels (bind 127.0.0.1, or pass --token)")
    app = LabelApp(store, token, lease_seconds, per_item)
    server = ThreadingHTTPServer((host, port), make_handler(app, log))
    server.daemon_threads = True
    server.app = app
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf label serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="label store (written by `vqa-rlhf sample`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; "
                                                            "another address needs --token)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port; default 8765)")
    parser.add_argument("--token", help="require this token on every request (needed to bind a non-loopback "
                                        "address); also read from $VQA_LABEL_TOKEN")
    parser.add_argument("--lease", type=float, default=120.0,
                        help="seconds an item stays reserved for the labeler it was shown to (default 120)")
    parser.add_argument("--per-item", type=int, default=1,
                        help="people wanted per item; 2 or more gives overlap for Cohen's kappa (default 1)")
    parser.add_argument("--log", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("VQA_LABEL_TOKEN") or None
    try:
        store = LabelStore(args.db)
    except (FileNotFoundError, StoreError) as exc:
        sys.exit(f"error: {exc}")
    integrity = store.check_integrity()
    if integrity != "ok":
        sys.exit(f"error: {args.db}: integrity check failed: {integrity}")
    server = make_server(store, args.host, args.port, token, args.lease, args.per_item, args.log)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    suffix = "/?token=<token>" if token else "/"
    print(f"labeling {store.count_samples()} samples of {args.db} at http://{shown}:{port}{suffix}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
