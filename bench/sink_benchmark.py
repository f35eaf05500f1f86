"""Write cost of the frame sink as the dataset grows: local disk, and S3 (a moto server on 127.0.0.1).

Writes synthetic frames (a ~1 KB PNG each) straight into the sink of ONE dataset, in stories of
``--story-frames`` frames, the way jobs do: each story gets a new writing sink (a job), which looks
at what the story holds (``existing``, the plan), writes its frames one at a time (one staged file
each) and calls ``commit_story`` at the end. Reported per size, over the LAST 10% of the frames (so
the cost at 10^5 frames can be compared with the cost at 10^3):

- ``write_ms``: mean time of one ``sink.write`` (one frame);
- ``frame_ms``: everything of the job divided by its frames (sink creation, listing, plan look-up,
  writes, compaction);
- ``files``: files under ``data/`` at the end;
- on S3, requests per frame that reached the server: LIST, GET, HEAD, PUT, DELETE (counted in the
  server's WSGI app, so they are real HTTP requests).

    python bench/sink_benchmark.py --frames 1000 10000 100000 --s3-frames 1000 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from storysync_dist.io import FrameRecord, ParquetFrameSink, png_bytes

BUCKET = "bench"


def synthetic_pngs(count: int = 16, side: int = 18) -> list[bytes]:
    rng = random.Random(0)
    return [png_bytes(Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))) for _ in range(count)]


def record(story: str, index: int, png: bytes) -> FrameRecord:
    return FrameRecord(
        story_id=story, frame_id=f"frame-{index:03d}", frame_index=index, prompt=f"{story} scene {index}",
        seed=index, image_png=png, width=18, height=18, model="bench", method="storysync",
        config='{"steps": 2}', fingerprint=f"{story}-{index}",
    )


def run(root: str, frames: int, story_frames: int, storage_options: dict | None,
        counter: Callable[[], Counter] | None, count_files: Callable[[], int]) -> dict[str, Any]:
    pngs = synthetic_pngs()
    stories = -(-frames // story_frames)
    last_from = frames - max(1, frames // 10)
    write_seconds: list[float] = []
    tail_job_seconds = 0.0
    tail_frames = 0
    requests_before: Counter | None = None
    done = 0
    start = time.perf_counter()
    for s in range(stories):
        story = f"s{s:06d}"
        n = min(story_frames, frames - done)
        in_tail = done + n > last_from
        if in_tail and requests_before is None and counter is not None:
            requests_before = counter().copy()
        job_start = time.perf_counter()
        sink = ParquetFrameSink(root, storage_options=storage_options)
        sink.existing(story)  # what a job's plan reads
        for i in range(n):
            rec = record(story, i, pngs[(done + i) % len(pngs)])
            t0 = time.perf_counter()
            sink.write([rec])
            elapsed = time.perf_counter() - t0
            if done + i >= last_from:
                write_seconds.append(elapsed)
        sink.commit_story(story, current={f"frame-{i:03d}": f"{story}-{i}" for i in range(n)})
        if in_tail:
            tail_job_seconds += time.perf_counter() - job_start
            tail_frames += n
        done += n
    total = time.perf_counter() - start
    result: dict[str, Any] = {
        "frames": frames, "stories": stories, "seconds": round(total, 1),
        "write_ms": round(1000 * sum(write_seconds) / len(write_seconds), 3),
        "frame_ms": round(1000 * tail_job_seconds / tail_frames, 3),
        "files": count_files(),
    }
    if counter is not None and requests_before is not None:
        delta = counter() - requests_before
        result["requests_per_frame"] = {k: round(delta.get(k, 0) / tail_frames, 3)
                                        for k in ("LIST", "GET", "HEAD", "PUT", "DELETE")}
    return result


def local(frames: int, story_frames: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="sink-bench-")
    root = os.path.join(folder, "out")
    try:
        def count_files() -> int:
            return sum(len(names) for _, _, names in os.walk(os.path.join(root, "data")))

        return run(root, frames, story_frames, None, None, count_files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RequestCounter:
    """Counts the HTTP requests a WSGI app (the moto server) serves, by S3 operation."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "").strip("/")
        query = environ.get("QUERY_STRING", "")
        has_key = "/" in path
        if method == "GET" and not has_key:
            kind = "LIST" if ("list-type" in query or "prefix" in query or "delimiter" in query or not query) \
                else "GET-BUCKET"
        elif method == "POST" and "delete" in query:
            kind = "DELETE"
        else:
            kind = method
        with self.lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.counts)


def s3(frames: int, story_frames: int) -> dict[str, Any]:
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        os.environ[name] = value
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        assert server._server is not None
        counter = RequestCounter(server._server.app)
        server._server.app = counter  # werkzeug looks the app up per request
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing",
                   "skip_instance_cache": True}
        root = f"s3://{BUCKET}/bench-{frames}"

        def count_files() -> int:
            fs = fsspec.filesystem("s3", **options)
            return len(fs.find(f"{BUCKET}/bench-{frames}/data"))

        return run(root, frames, story_frames, options, counter.snapshot, count_files)
    finally:
        server.stop()


def table(results: list[dict[str, Any]], where: str) -> str:
    lines = []
    has_requests = any("requests_per_frame" in r for r in results)
    head = "| frames | stories | files | write ms/frame (last 10%) | job ms/frame (last 10%) | total s |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if has_requests:
        head += " LIST/frame | GET/frame | HEAD/frame | PUT/frame | DELETE/frame |"
        rule += "---:|---:|---:|---:|---:|"
    lines += [f"**{where}**", "", head, rule]
    for r in results:
        line = (f"| {r['frames']} | {r['stories']} | {r['files']} | {r['write_ms']} | {r['frame_ms']} "
                f"| {r['seconds']} |")
        if has_requests:
            q = r["requests_per_frame"]
            line += f" {q['LIST']} | {q['GET']} | {q['HEAD']} | {q['PUT']} | {q['DELETE']} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--s3-frames", type=int, nargs="*", default=[])
    parser.add_argument("--story-frames", type=int, default=30)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()},
                               "story_frames": args.story_frames, "local": [], "s3": []}
    for frames in args.frames:
        results["local"].append(local(frames, args.story_frames))
        print(json.dumps({"local": results["local"][-1]}), flush=True)
    for frames in args.s3_frames:
        results["s3"].append(s3(frames, args.story_frames))
        print(json.dumps({"s3": results["s3"][-1]}), flush=True)
    for where in ("local", "s3"):
        rows = results[where]
        if rows:
            print()
            print(table(rows, "local disk" if where == "local" else "S3 (moto server on 127.0.0.1)"))
            if len(rows) > 1:
                ratio = rows[-1]["write_ms"] / rows[0]["write_ms"]
                print(f"\nwrite cost {rows[-1]['frames']} vs {rows[0]['frames']} frames: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
