"""Labeling app benchmark: label submissions per second with concurrent clients, and next-item latency.

    vqa-rlhf bench labels [--clients 8] [--seconds 10] [--samples 5000]

Builds a throwaway label store of --samples candidate answers, starts the app
(`vqa-rlhf label`) as its own process, and runs --clients client processes that
label as a person would through the API, as fast as they can: GET /api/next,
then POST /api/labels for that item, on one keep-alive connection each. Prints
the sustained rate of acknowledged (201, durably stored) labels and the median
and 95th percentile latency of GET /api/next. The baseline, measured first in
the same run, is the store alone: LabelStore.add_label in one thread, no HTTP,
the ceiling the app's durable commits allow. Targets (issue 4): >= 200 labels/s
with 8 clients, next item < 50 ms at the median.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewards.label_store import LabelStore

REPO = Path(__file__).resolve().parent.parent


def build_store(path: Path, samples: int) -> None:
    with LabelStore(path, create=True) as store:
        rows = [{"question_id": f"q{i}", "image": f"images/{i % 100}.png", "question": f"How many shapes? ({i})",
                 "answer": str(i), "gt_answers": [str(i)] * 10} for i in range(samples)]
        store.add_samples(path.parent, rows)


def store_baseline(path: Path, seconds: float) -> float:
    """Durable add_label calls per second, one thread, no HTTP."""
    with LabelStore(path) as store:
        total = store.count_samples()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            store.add_label(1 + count % total, "baseline", "correct")
            count += 1
        return count / (time.perf_counter() - started)


def client(port: int, name: str, seconds: float, queue) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    next_latencies, labels, errors = [], 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        connection.request("GET", f"/api/next?labeler={name}")
        response = connection.getresponse()
        data = response.read()
        next_latencies.append(time.perf_counter() - t0)
        if response.status == 204:
            break
        sample_id = json.loads(data)["sample_id"]
        body = json.dumps({"sample_id": sample_id, "label": "correct", "labeler": name})
        connection.request("POST", "/api/labels", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status == 201:
            labels += 1
        else:
            errors += 1
    queue.put((labels, errors, next_latencies, time.perf_counter() - started))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the clients label (default 10)")
    parser.add_argument("--samples", type=int, default=30000, help="candidate answers in the store (default 30000)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "labels.db"
        build_store(db, args.samples)
        baseline = store_baseline(Path(tmp) / "labels.db", min(3.0, args.seconds))
        build_store(Path(tmp) / "http" / "labels.db", args.samples)
        server = subprocess.Popen([sys.executable, "-m", "rewards.label_app", "--db", str(Path(tmp) / "http" / "labels.db"),
                                   "--port", "0", "--lease", "60"], stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            port = int(server.stdout.readline().split("http://127.0.0.1:")[1].split("/")[0])
            queue = multiprocessing.get_context("fork").Queue()
            processes = [multiprocessing.get_context("fork").Process(target=client, args=(port, f"c{i}", args.seconds, queue))
                         for i in range(args.clients)]
            for process in processes:
                process.start()
            results = [queue.get() for _ in processes]
            for process in processes:
                process.join()
        finally:
            server.terminate()
            server.wait()
        with LabelStore(Path(tmp) / "http" / "labels.db") as store:
            stored = len(store.all_labels())

    labels = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    elapsed = max(r[3] for r in results)
    median = statistics.median(latencies) * 1000
    p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000
    print(f"baseline: the store alone, 1 thread (one fsync per label, no group commit possible): "
          f"{baseline:,.0f} labels/s")
    print(f"app, {args.clients} clients (next + label each), {elapsed:.1f} s, {args.samples} samples:")
    print(f"  labels acknowledged: {labels} ({labels / elapsed:,.0f} labels/s; target >= 200), "
          f"stored: {stored}, errors: {errors}")
    print(f"  GET /api/next: median {median:.1f} ms, p95 {p95:.1f} ms over {len(latencies)} requests "
          f"(target: median < 50 ms)")
    if stored != labels:
        print("  MISMATCH: stored labels differ from acknowledged ones", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
