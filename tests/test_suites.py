"""Named prompt suites (``--suite NAME``, ``storysync_dist.io.suites``) and benchmark sets whose
concept token is not a phrase of the prompt.

A small suite of the ConsiStory+ shape is written here and served by an HTTP server on 127.0.0.1
that counts the requests it answers; a test registers it under a name with its real sha256 (or a
wrong one) by patching ``SUITES``, and points ``STORYSYNC_SUITES_MIRROR`` at the server. Nothing
is fetched from the internet and no test reads a file outside the repository.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from storysync_dist.cli import main
from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.io import suites
from storysync_dist.io.suites import MIRROR_ENV, SuiteEntry, resolve_suite, suite_cache_path
from storysync_dist.models.info import load_model_info
from storysync_dist.story import load_benchmark, validate_for_model
from storysync_dist.story.benchmark import subject_tokens

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--steps", "2", "--height", "64", "--width", "64"]

# Two sets whose multi-word concept token is not a contiguous phrase of the subject (short prompts
# written for this test), and one whose concept token the prompts do not contain at all.
LOAF = {"concept_token": "loaf of bread", "subject": "A crusty loaf of warm bread", "style": "A painting of",
        "settings": ["on a wooden board", "beside a jar of honey"]}
MIST = {"concept_token": "waterfall mist", "subject": "Mist from a waterfall", "style": "A photo of",
        "settings": ["at dawn", "over mossy rocks"]}
BROKEN = {"concept_token": "dragon", "subject": "A winged lizard", "style": "A drawing of",
          "settings": ["in a cave", "over a castle"]}
SUITE = {"foods": [LOAF], "nature": [MIST], "myths": [BROKEN]}
SUITE_BYTES = yaml.safe_dump(SUITE, sort_keys=False).encode("utf-8")


class _Server:
    """An HTTP server on 127.0.0.1 in a thread: serves ``files`` (path -> bytes), 404 otherwise,
    and counts every request by path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[_Server]:
    served = _Server()
    yield served
    served.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def register(monkeypatch: pytest.MonkeyPatch, name: str, content: bytes, *, sha256: str | None = None) -> SuiteEntry:
    """Add a suite ``name`` to the registry, pinned to ``content``'s hash (or ``sha256``)."""
    entry = SuiteEntry(name=name, url=f"https://example.invalid/{name}.yaml",
                       sha256=sha256 or hashlib.sha256(content).hexdigest(), size=len(content),
                       source="a suite written by tests/test_suites.py", licence="none")
    monkeypatch.setitem(suites.SUITES, name, entry)
    return entry


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of the test's own (only for tests that load no model preset)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STORYSYNC_CACHE", str(root))
    return root


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("storysync: error: ")
    return err


# ---- download, cache, hash ------------------------------------------------------------------------


def test_a_named_suite_is_downloaded_once_then_read_from_the_cache(server: _Server, cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES)
    server.files["/tiny-suite.yaml"] = SUITE_BYTES
    monkeypatch.setenv(MIRROR_ENV, server.url + "/")
    path = resolve_suite("tiny-suite")
    assert Path(path) == cache / "suites" / "tiny-suite.yaml" == suite_cache_path(entry)
    assert Path(path).read_bytes() == SUITE_BYTES
    assert server.requests == {"/tiny-suite.yaml": 1}
    # Again: the cached file has the pinned hash, so there is no request.
    assert resolve_suite("tiny-suite") == path
    assert server.requests == {"/tiny-suite.yaml": 1}
    assert [story.category for story in load_benchmark(path)] == list(SUITE)
    # Nothing but the file is left in the cache folder (pooch downloads to a temporary name).
    assert [p.name for p in (cache / "suites").iterdir()] == ["tiny-suite.yaml"]


def test_a_file_placed_by_hand_is_used_without_network(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES)
    monkeypatch.setenv(MIRROR_ENV, closed_port_url())
    suite_cache_path(entry).parent.mkdir(parents=True)
    suite_cache_path(entry).write_bytes(SUITE_BYTES)
    assert resolve_suite("tiny-suite") == str(suite_cache_path(entry))


def test_a_wrong_hash_is_refused_and_not_kept(server: _Server, cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pinned = hashlib.sha256(b"another file").hexdigest()
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES, sha256=pinned)
    server.files["/tiny-suite.yaml"] = SUITE_BYTES
    monkeypatch.setenv(MIRROR_ENV, server.url)
    out = tmp_path / "out"
    assert main(["bench", "--suite", "tiny-suite", "--model", "tiny-sdxl", "--out", str(out), *SIZE]) == 2
    err = one_line_error(capsys)
    assert f"{server.url}/tiny-suite.yaml" in err and f"pinned sha256 {pinned}" in err and "refused" in err
    assert server.requests == {"/tiny-suite.yaml": 1}
    assert not suite_cache_path(entry).exists()
    assert list(suite_cache_path(entry).parent.iterdir()) == []  # no partial or temporary file either
    assert not out.exists()
    # The API says the same.
    with pytest.raises(StorySyncUserError, match="does not have the pinned sha256"):
        resolve_suite("tiny-suite")


def test_offline_is_one_line_naming_the_url_and_where_to_put_the_file(cache: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys) -> None:
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES)
    mirror = closed_port_url()
    monkeypatch.setenv(MIRROR_ENV, mirror)
    out = tmp_path / "out"
    assert main(["bench", "--suite", "tiny-suite", "--model", "tiny-sdxl", "--out", str(out), *SIZE]) == 2
    err = one_line_error(capsys)
    assert f"cannot download {mirror}/tiny-suite.yaml" in err
    # The exact path to place the file at, and what it must be; with a mirror, also the pinned URL.
    assert f"place it at {suite_cache_path(entry)} (sha256 {entry.sha256}" in err
    assert entry.url in err
    assert not suite_cache_path(entry).exists() and not out.exists()

    # A wrong file placed by hand: the message says so.
    suite_cache_path(entry).parent.mkdir(parents=True, exist_ok=True)
    suite_cache_path(entry).write_bytes(b"animals: []\n")
    with pytest.raises(StorySyncUserError) as info:
        resolve_suite("tiny-suite")
    assert f"the file there now has sha256 {hashlib.sha256(b'animals: []' + bytes([10])).hexdigest()}" in str(info.value)


def test_a_missing_file_on_the_server_is_one_line(server: _Server, cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "tiny-suite", SUITE_BYTES)
    monkeypatch.setenv(MIRROR_ENV, server.url)
    with pytest.raises(StorySyncUserError) as info:
        resolve_suite("tiny-suite")
    assert "HTTP 404" in str(info.value) and "\n" not in str(info.value)
    assert server.requests == {"/tiny-suite.yaml": 1}


# ---- names, paths and --list-suites ---------------------------------------------------------------


def test_a_path_still_works_and_an_unknown_value_lists_the_names(tmp_path: Path, cache: Path, capsys) -> None:
    path = tmp_path / "mine.yaml"
    path.write_bytes(SUITE_BYTES)
    assert resolve_suite(path) == str(path)
    assert main(["bench", "--suite", str(tmp_path / "nothing.yaml"), "--model", "tiny-sdxl",
                 "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert f"--suite {tmp_path / 'nothing.yaml'}: not a file and not a known suite name" in err
    assert f"known: {', '.join(sorted([*suites.SUITES, *suites.GENERATED]))}" in err
    assert not (cache / "suites").exists()


def test_list_suites_needs_no_other_option(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES)
    assert main(["bench", "--list-suites"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # The downloaded suites, then the generated ones (toyworld's), each with what it is.
    assert [line.split()[0] for line in lines] == [*sorted(suites.SUITES), *suites.GENERATED]
    for line, listed in zip(lines, sorted(suites.SUITES.values(), key=lambda e: e.name)):
        assert f"{listed.size:,} bytes" in line and listed.source in line and listed.licence in line
    for line, (name, what) in zip(lines[len(suites.SUITES):], suites.GENERATED.items(), strict=True):
        assert line.startswith(f"{name} ") and "generated" in line and what in line
    assert any(line.startswith(f"{entry.name} ") for line in lines)

    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import benchmark

    assert benchmark.main(["--list-suites"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_a_bench_run_still_needs_suite_model_and_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    assert main(["bench", "--model", "tiny-sdxl"]) == 2
    err = one_line_error(capsys)
    assert "required: --suite, --out" in err
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import benchmark

    assert benchmark.main(["--suite", "x.yaml", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "benchmark: error: the following arguments are required: --model (or --list-suites alone)"


def test_make_dataset_takes_a_suite_name(server: _Server, cache: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    entry = register(monkeypatch, "tiny-suite", SUITE_BYTES)
    server.files["/tiny-suite.yaml"] = SUITE_BYTES
    monkeypatch.setenv(MIRROR_ENV, server.url)
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import make_dataset

    # An unknown category: the error is load_benchmark's on the fetched file, nothing is rendered.
    out = tmp_path / "out"
    assert make_dataset.main(["tiny-suite", "--model", "tiny-sdxl", "--out", str(out), "--categories", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"make_dataset: error: {suite_cache_path(entry)}: unknown category 'nosuch' "
                   f"(the file has: {', '.join(SUITE)})")
    assert server.requests == {"/tiny-suite.yaml": 1} and not out.exists()
    assert make_dataset.main(["no-such-suite", "--model", "tiny-sdxl", "--out", str(out)]) == 2
    assert "benchmark no-such-suite: not a file and not a known suite name" in capsys.readouterr().err


# ---- concept tokens that are not a phrase of the prompt -------------------------------------------


@pytest.mark.parametrize(
    ("concept", "subject", "tokens"),
    [
        ("fox", "A red fox", ["fox"]),  # found as written: unchanged
        ("bowl of soup", "A bowl of soup with bread", ["bowl of soup"]),
        ("Snow Leopard", "A snow leopard on a rock", ["snow leopard"]),  # as the subject spells it
        ("loaf of bread", "A crusty loaf of warm bread", ["loaf", "bread"]),
        ("waterfall mist", "Mist from a waterfall", ["waterfall", "Mist"]),
        ("macaron", "A plate of delicate macarons", ["macarons"]),  # only the plural is there
        ("peach", "A basket of peaches", ["peaches"]),
        ("dragon", "A winged lizard", ["dragon"]),  # missing: left for validate_for_model to refuse
        ("of the", "A cup of the best tea", ["of the"]),
        ("the of", "A cup of tea", ["the", "of"]),  # stop words only: kept
    ],
)
def test_subject_tokens(concept: str, subject: str, tokens: list[str]) -> None:
    assert subject_tokens(concept, subject) == tokens


def words_at(tokenizer, ids: list[int], positions: list[int]) -> set[str]:
    """The words that the runs of consecutive ``positions`` spell (a word may be several tokens),
    lowercased, without the tokenizers' word marks (CLIP: ``</w>``, T5: ``▁``)."""
    runs: list[list[int]] = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return {"".join(pieces[i] for i in run).replace("</w>", "").replace("\u2581", "").lower() for run in runs}


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-kandinsky3", "tiny-flux"])
def test_multi_word_concept_tokens_fit_the_model(tmp_path: Path, model: str) -> None:
    path = tmp_path / "suite.yaml"
    path.write_bytes(SUITE_BYTES)
    loaf, mist, broken = load_benchmark(path)
    info = load_model_info(model)
    tokenizer = info.tokenizer
    for story, words in ((loaf, {"loaf", "bread"}), (mist, {"mist", "waterfall"})):
        positions = validate_for_model(story, tokenizer, info.size_factor)
        for frame, (found,) in zip(story.frames, positions, strict=True):
            ids = tokenizer(frame.prompt, truncation=False).input_ids
            # The mask tokens are exactly the concept's words, not "of", "from" or "a".
            assert words_at(tokenizer, ids, found) == words, (model, frame.prompt)
    with pytest.raises(StorySpecError, match=r"myths\[0\]: frame 's00' .* token 'dragon' does not occur"):
        validate_for_model(broken, tokenizer, info.size_factor)


def test_bench_skips_a_set_that_does_not_fit_and_goes_on(tmp_path: Path, capsys, caplog) -> None:
    """The two multi-word sets render; the broken one is left out with a one-line warning."""
    path = tmp_path / "suite.yaml"
    path.write_bytes(SUITE_BYTES)
    out = tmp_path / "table1"
    caplog.set_level("WARNING", logger="storysync")
    assert main(["bench", "--suite", str(path), "--model", "tiny-sdxl", "--out", str(out), *SIZE,
                 "--methods", "vanilla", "--encoders", "random-tiny", "--metrics", "clip-t", "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "storysync" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"warning: skipping {path}:myths[0]: frame 's00' (#0): subject 'subject' token 'dragon'")
    assert "skipped: 1 subject set(s) that do not fit the model" in capsys.readouterr().out
    [row] = list(csv.DictReader((out / "results.csv").open()))
    assert row["stories"] == "2" and row["frames"] == str(len(LOAF["settings"]) + len(MIST["settings"]))
    boards = sorted(p.stem.split("-")[0] for p in (out / "storyboards").glob("*.png"))
    assert boards == ["foods", "nature"]


def test_bench_with_no_set_that_fits_is_a_user_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"myths": [BROKEN]}), encoding="utf-8")
    out = tmp_path / "table1"
    assert main(["bench", "--suite", str(path), "--model", "tiny-sdxl", "--out", str(out), *SIZE,
                 "--methods", "vanilla", "--encoders", "random-tiny", "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"storysync: error: no subject set fits --model tiny-sdxl (1 checked); the first: "
                          f"{path}:myths[0]: frame 's00' (#0): subject 'subject' token 'dragon'")
    assert not out.exists()
