"""A moto S3 server on 127.0.0.1 for the tests, which logs the requests it serves and can refuse
chosen ones; and ``Store``, one place a dataset lives (a local folder or an S3 prefix), for the
tests that run the same steps on both.

s3fs speaks HTTP through aiobotocore, which moto's in-process ``mock_aws`` does not intercept, so
the tests talk to a real server. A module starts one with a module-scoped fixture::

    @pytest.fixture(scope="module")
    def s3() -> Iterator[MotoS3]:
        with moto_s3() as server:
            yield server

The request log is what the server saw, not what the code says it does: ``s3.since(mark)`` lists
the requests (``S3Request.op``: PUT, GET, HEAD, LIST, COPY, DELETE, DELETE_MANY, ...) after
``mark = s3.mark()``. The tests' own look at the bucket (``objects``, ``reader_fs``) is sent with
a user agent the log leaves out.
"""

from __future__ import annotations

import html
import io
import logging
import os
import posixpath
import re
import tempfile
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote

import boto3
import pytest
import s3fs
from botocore.config import Config
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from storysync_dist.io.storage import resolve

BUCKET = "bucket"
# The user agent of the tests' own requests (listing the bucket, readers): not logged.
INSPECT = "storysync-test-inspect"
_LIST_QUERY = {"list-type", "prefix", "delimiter", "max-keys", "continuation-token", "start-after",
               "encoding-type", "fetch-owner", "marker"}


@dataclass(frozen=True)
class S3Request:
    """One request the server answered. ``key`` is the object key (the listed prefix for a LIST);
    ``keys`` the keys of a DeleteObjects; ``conditional`` an ``If-None-Match: *`` PUT."""

    op: str
    key: str = ""
    keys: tuple[str, ...] = ()
    source: str = ""  # COPY: the copied key
    conditional: bool = False
    status: int = 0


def _classify(method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> S3Request:
    key = path.lstrip("/").partition("/")[2]
    if not key:
        if method == "GET" and set(query) <= _LIST_QUERY:
            return S3Request("LIST", key=query.get("prefix", [""])[0])
        if method == "POST" and "delete" in query:
            return S3Request("DELETE_MANY")
        return S3Request(f"{method} bucket")
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            source = headers["x-amz-copy-source"].lstrip("/").partition("/")[2].partition("?")[0]
            return S3Request("COPY", key=key, source=unquote(source))
        if "partNumber" in query:
            return S3Request("UPLOAD_PART", key=key)
        return S3Request("PUT", key=key, conditional=headers.get("if-none-match") == "*")
    if method == "POST":
        return S3Request("MULTIPART", key=key)
    return S3Request(method, key=key)


def _body(environ: dict[str, Any]) -> bytes:
    """Read a request's body, and leave a copy for moto."""
    length = environ.get("CONTENT_LENGTH")
    body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
    environ["wsgi.input"] = io.BytesIO(body)
    return body


class _LoggingServer(ThreadedMotoServer):
    """moto's threaded server with a WSGI layer in front that logs and refuses requests."""

    def __init__(self, owner: MotoS3) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.owner = owner

    def _server_entry(self) -> None:  # as ThreadedMotoServer's, with the app wrapped
        app = self.owner.wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoS3:
    """A running moto S3 server (see the module docstring); ``BUCKET`` exists."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[S3Request] = []
        self._refuse: Callable[[S3Request], bool] | None = None
        self._lock = threading.Lock()

    # -- the server --------------------------------------------------------------------------------
    def wrap(self, app: Any) -> Any:
        def logged(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if INSPECT in environ.get("HTTP_USER_AGENT", "") or path.startswith("/moto-api"):
                return app(environ, start_response)
            headers = {name[5:].replace("_", "-").lower(): value
                       for name, value in environ.items() if name.startswith("HTTP_")}
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            request = _classify(environ["REQUEST_METHOD"], path, query, headers)
            if request.op == "DELETE_MANY":
                keys = re.findall(rb"<Key>(.*?)</Key>", _body(environ))
                request = replace(request, keys=tuple(html.unescape(k.decode()) for k in keys))
            if self._refuse is not None and self._refuse(request):
                _body(environ)  # read, so that the connection stays usable
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                self._log(replace(request, status=403))
                return [b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                        b"<Message>refused by the test</Message><RequestId>0</RequestId></Error>"]
            status: list[int] = []

            def recording_start_response(code: str, *args: Any) -> Any:
                status.append(int(code.split()[0]))
                return start_response(code, *args)

            response = app(environ, recording_start_response)
            self._log(replace(request, status=status[0] if status else 0))
            return response

        return logged

    def _log(self, request: S3Request) -> None:
        with self._lock:
            self.requests.append(request)

    # -- the request log ---------------------------------------------------------------------------
    def mark(self) -> int:
        """A point in the log (``since`` lists what came after it)."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int, under: str = "") -> list[S3Request]:
        """The requests after ``mark`` whose key (or listed prefix, or a deleted key) is under ``under``
        (an ``s3://`` URL or a key prefix)."""
        prefix = key_of(under)
        with self._lock:
            found = self.requests[mark:]
        return [r for r in found if r.key.startswith(prefix) or any(k.startswith(prefix) for k in r.keys)
                or (r.op == "LIST" and prefix.startswith(r.key))]

    def ops(self, mark: int, under: str = "") -> Counter:
        """How many requests of each kind came after ``mark`` (under ``under``)."""
        return Counter(r.op for r in self.since(mark, under))

    @contextmanager
    def refusing(self, which: Callable[[S3Request], bool]) -> Iterator[None]:
        """Answer the requests ``which`` picks with 403 AccessDenied (s3fs raises PermissionError)."""
        self._refuse = which
        try:
            yield
        finally:
            self._refuse = None

    # -- clients -----------------------------------------------------------------------------------
    @property
    def storage_options(self) -> dict[str, Any]:
        """For sinks, leases and jobs; in one process they share one s3fs instance, as a job does."""
        return {"client_kwargs": {"endpoint_url": self.url}, "key": "testing", "secret": "testing"}

    def fresh_options(self) -> dict[str, Any]:
        """Like ``storage_options`` with an s3fs instance of its own: a sink as another process has it
        (no listing cache shared with this one)."""
        return {**self.storage_options, "skip_instance_cache": True}

    def reader_options(self) -> dict[str, Any]:
        """For the tests' readers (pyarrow, Ray, ``datasets``): their requests are not logged."""
        return {**self.storage_options, "config_kwargs": {"user_agent_extra": INSPECT}}

    def reader_fs(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(**self.reader_options(), skip_instance_cache=True)

    def arrow_fs(self) -> Any:
        """pyarrow's own S3 client (no listing cache), for readers in other processes (Ray tasks):
        an fsspec filesystem there is a cached instance per worker process, listings included."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                       endpoint_override=self.url, scheme="http")

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            config=Config(user_agent_extra=INSPECT))

    def root(self, name: str) -> str:
        """A new, empty ``s3://`` prefix for one test."""
        return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:12]}"

    def objects(self, under: str = "") -> dict[str, tuple[int, str, float]]:
        """Every object under ``under`` (hidden names included): key relative to it -> (size,
        ETag, LastModified)."""
        prefix = key_of(under)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix):]] = (obj["Size"], obj["ETag"], obj["LastModified"].timestamp())
        return found


def key_of(url: str) -> str:
    """The bucket key of an ``s3://bucket/key`` URL (a bare key is returned as it is)."""
    return url.removeprefix(f"s3://{BUCKET}/").removeprefix(f"{BUCKET}/") if url else ""


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """A moto S3 server on a free loopback port with ``BUCKET`` created, and an environment in
    which every S3 client of this process goes to it with fake credentials (nothing from the
    user's ~/.aws, no instance-metadata lookup)."""
    s3 = MotoS3()
    with tempfile.TemporaryDirectory(prefix="aws-") as home, pytest.MonkeyPatch.context() as mp:
        server = _LoggingServer(s3)
        server.start()
        host, port = server.get_host_and_port()
        s3.url = f"http://{host}:{port}"
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "credentials"),
            "AWS_CONFIG_FILE": os.path.join(home, "config"), "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            # s3fs with no storage options (a plain "s3://..." URL) comes here too.
            "AWS_ENDPOINT_URL_S3": s3.url,
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        # werkzeug logs every request at INFO: thousands of lines in a failing test's report.
        mp.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)
        try:
            # moto's state belongs to the process, not to a server: start from an empty one.
            urllib.request.urlopen(urllib.request.Request(f"{s3.url}/moto-api/reset", method="POST")).close()
            s3.client().create_bucket(Bucket=BUCKET)
            s3fs.S3FileSystem.clear_instance_cache()
            yield s3
        finally:
            server.stop()
            # Cached s3fs instances point at this server's port: no later module may reuse them.
            s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class Store:
    """Where a test's dataset lives: a local folder, or a prefix of the moto bucket (``s3`` set)."""

    root: str
    storage_options: dict[str, Any] | None = None
    s3: MotoS3 | None = None

    @classmethod
    def local(cls, folder: str) -> Store:
        return cls(str(folder))

    @classmethod
    def on_s3(cls, s3: MotoS3, name: str) -> Store:
        return cls(s3.root(name), s3.storage_options, s3)

    @property
    def fs(self) -> Any:
        return resolve(self.root, self.storage_options)[0]

    def path(self, relpath: str = "") -> str:
        """A path under the root, for ``reader_fs`` (a local path, or ``bucket/key``)."""
        base = key_of(self.root) if self.s3 is not None else self.root
        full = posixpath.join(base, relpath) if relpath else base
        return f"{BUCKET}/{full}" if self.s3 is not None else full

    def reader_fs(self) -> Any:
        """The filesystem the tests' readers use (None: pyarrow's local one)."""
        return self.s3.reader_fs() if self.s3 is not None else None

    def reader_options(self) -> dict[str, Any] | None:
        return self.s3.reader_options() if self.s3 is not None else None

    def arrow_fs(self) -> Any:
        """pyarrow's S3 filesystem for the bucket (None: pyarrow's local one)."""
        return self.s3.arrow_fs() if self.s3 is not None else None

    def files(self) -> dict[str, tuple[Any, ...]]:
        """Every file under the root (hidden ones included) -> a stamp that changes when the file is
        written again: (size, mtime_ns, inode) locally, (size, ETag, LastModified) on S3."""
        if self.s3 is not None:
            return dict(self.s3.objects(self.root))
        found = {}
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                info = os.stat(path)
                found[os.path.relpath(path, self.root)] = (info.st_size, info.st_mtime_ns, info.st_ino)
        return found
