"""Named prompt suites: ``--suite consistory-plus`` instead of a path only some machines have.

A name maps to a pinned URL and the SHA-256 and size of the file there (``SUITES``).
``resolve_suite`` turns a ``--suite`` value into a local file:

- a known name: the file in the cache, ``<cache root>/suites/<name>.yaml`` (the cache root is
  ``$STORYSYNC_CACHE``, else ``~/.cache/storysync``; ``storysync_dist.cache``). A file there
  with the pinned hash is used without any network; otherwise it is downloaded once with pooch
  (``HTTPDownloader`` with a short timeout) and kept only if its hash is the pinned one;
- a generated suite (``GENERATED``: ``toyworld``, ``toyworld-tune``, the quality instrument's
  stories, ``toyworld.stories``): written into the same cache folder from the world's grammar,
  no network;
- else an existing file, as given (any file of the same shape);
- else a one-line ``StorySyncUserError`` (exit 2) listing the names.

A failed download (offline, a proxy, a 404) is one line naming the URL and the exact path to place
the file at by hand; a wrong hash is refused and the download is not kept. Both exit 2.
``STORYSYNC_SUITES_MIRROR`` replaces the pinned URLs with ``<mirror>/<name>.yaml`` (a base URL:
``https://host/path``, ``file://`` is not supported by the downloader), for a site mirror
or a test server; the hash check is the same. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

from ..cache import cache_root
from ..errors import StorySyncUserError, one_line

__all__ = [
    "DOWNLOAD_TIMEOUT_S", "GENERATED", "MIRROR_ENV", "SUITES", "SuiteEntry", "format_suites", "resolve_suite", "suite_cache_path",
    "suite_url",
]

MIRROR_ENV = "STORYSYNC_SUITES_MIRROR"
# Seconds to wait for the server to answer (and between bytes): a machine that is offline fails at
# once (no route, no DNS), one behind a firewall that drops packets within this.
DOWNLOAD_TIMEOUT_S = 15.0

_log = logging.getLogger("storysync")


@dataclass(frozen=True)
class SuiteEntry:
    """One named suite: where it is published, pinned to a commit, and what it is."""

    name: str
    url: str
    sha256: str
    size: int  # bytes
    source: str  # what it is and where it comes from, for --list-suites and the docs
    licence: str


SUITES: dict[str, SuiteEntry] = {
    entry.name: entry
    for entry in (
        SuiteEntry(
            name="consistory-plus",
            url="https://raw.githubusercontent.com/byliutao/1Prompt1Story/"
            "34e22ac9f52e6b215c51bf4dd362177824c2bc11/resource/consistory%2B.yaml",
            sha256="1ad7f5f539403cd8c118d27dacb07b973918212bb23d2045c0caf310db63cc1b",
            size=59399,
            source="ConsiStory+ (8 categories, 192 subject sets), as published with 1Prompt1Story: "
            "github.com/byliutao/1Prompt1Story resource/consistory+.yaml at commit 34e22ac9",
            licence="MIT (Copyright (c) 2024 FoundationVision)",
        ),
    )
}


# Suites made by the program itself: name -> what --list-suites says of it.
GENERATED = {
    "toyworld": "toyworld's test split: 24 one-subject stories x 5 frames for the quality instrument "
                "(--model toyworld), generated from the world's grammar (docs/quality.md)",
    "toyworld-tune": "toyworld's tuning split: 24 more stories with other seeds; choose constants on this one",
}


def suite_cache_path(entry: SuiteEntry) -> pathlib.Path:
    """Where the suite's file is kept: ``<cache root>/suites/<name>.yaml``."""
    return cache_root() / "suites" / f"{entry.name}.yaml"


def suite_url(entry: SuiteEntry) -> str:
    """The pinned URL, or ``$STORYSYNC_SUITES_MIRROR/<name>.yaml`` when the mirror is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{entry.name}.yaml" if mirror else entry.url


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _known_names() -> str:
    return ", ".join(sorted([*SUITES, *GENERATED]))


def _generated(name: str) -> pathlib.Path:
    """The generated suite ``name`` in the cache, written (then renamed into place) when missing
    or different: the grammar is the truth, the file a copy for the loader and for the user."""
    import tempfile

    import yaml

    from ..toyworld.stories import suite_document

    text = yaml.safe_dump(suite_document(name), sort_keys=False)
    path = cache_root() / "suites" / f"{name}.yaml"
    if path.is_file() and path.read_text() == text:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{name}.", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as exc:
        raise StorySyncUserError(f"suite {name}: cannot write the cache folder {path.parent} ({one_line(exc)}); "
                                 "set STORYSYNC_CACHE to a writable folder") from None
    return path


def resolve_suite(value: str | os.PathLike[str], *, option: str = "--suite") -> str:
    """The local path of the suite ``value``: a name of ``SUITES`` (fetched into the cache when
    missing, see the module docstring) or an existing file. ``option`` names the argument in the
    one-line errors (``StorySyncUserError``)."""
    text = os.fspath(value)
    if text in GENERATED:
        return str(_generated(text))
    entry = SUITES.get(text)
    if entry is None:
        if os.path.exists(text):
            return text
        raise StorySyncUserError(
            f"{option} {text}: not a file and not a known suite name (known: {_known_names()}; "
            "storysync bench --list-suites)"
        )
    return str(_fetch(entry))


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs every download at INFO to stderr; storysync's own -v line says it instead."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fetch(entry: SuiteEntry) -> pathlib.Path:
    path = suite_cache_path(entry)
    there = None
    if path.is_file():
        there = _sha256(path)
        if there == entry.sha256:
            return path  # no network
    url = suite_url(entry)
    source = "it" if url == entry.url else entry.url
    by_hand = (f"download {source} by hand and place it at {path} (sha256 {entry.sha256}, {entry.size} bytes)"
               + (f"; the file there now has sha256 {there}" if there else ""))
    import pooch
    import requests

    _log.info("downloading suite %s (%d bytes) from %s to %s", entry.name, entry.size, url, path)
    try:
        with _quiet_pooch():
            pooch.retrieve(
                url, known_hash=f"sha256:{entry.sha256}", fname=path.name, path=path.parent,
                downloader=pooch.HTTPDownloader(timeout=DOWNLOAD_TIMEOUT_S, progressbar=False),
            )
    except requests.exceptions.RequestException as exc:  # before ValueError: a bad URL is both
        raise StorySyncUserError(f"suite {entry.name}: cannot download {url} ({_reason(exc)}); {by_hand}") from None
    except ValueError:  # pooch: the download's hash is not the pinned one; it kept nothing
        raise StorySyncUserError(
            f"suite {entry.name}: the file downloaded from {url} does not have the pinned sha256 {entry.sha256}; "
            f"refused, nothing was kept (a wrong mirror, a proxy's error page, or a changed file?); {by_hand}"
        ) from None
    except OSError as exc:
        raise StorySyncUserError(
            f"suite {entry.name}: cannot write the cache folder {path.parent} ({one_line(exc)}); set STORYSYNC_CACHE "
            f"to a writable folder, or pass --suite PATH with a copy of {url}"
        ) from None
    return path


def _reason(exc: Exception) -> str:
    """A short cause of a failed request (requests' messages repeat the URL and nest the cause)."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.exceptions.HTTPError) and response is not None:
        return f"HTTP {response.status_code}"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {DOWNLOAD_TIMEOUT_S:g}s"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "no connection: offline, or the server refused it"
    return type(exc).__name__


def format_suites() -> str:
    """What ``storysync bench --list-suites`` prints: one line per name with its size and source."""
    width = max(len(name) for name in [*SUITES, *GENERATED])
    return "\n".join(
        [f"{entry.name:{width}s}  {entry.size:,} bytes  {entry.source}; licence: {entry.licence}"
         for entry in sorted(SUITES.values(), key=lambda e: e.name)]
        + [f"{name:{width}s}  generated  {what}" for name, what in GENERATED.items()]
    )
