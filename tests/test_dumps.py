"""Picking a JaWiki CirrusSearch dump from a dump index, served by a real HTTP server on 127.0.0.1.

The listings copy the format of https://dumps.wikimedia.org/other/cirrussearch/ (nginx autoindex:
one ``<a href="20261116/">`` line per dated folder, a ``current/`` link, long names cut short in the
link text), so the parser meets what the real index sends; then `jawiki_raw` is materialised
through Dagster with ``dump_date: latest`` against that server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tinyplm_lib.downloads.dumps import (
    DumpIndexError,
    dated_folders,
    dump_date_from_url,
    fetch_listing,
    latest_cirrussearch_dump,
    listed_files,
    resolve_cirrussearch_dump,
)
from tinyplm_lib.errors import ConfigError

from conftest import DEMO_DIR
from http_server import FileHTTPServer

INDEX_PATH = "other/cirrussearch"


def _nginx_listing(path: str, entries: list[tuple[str, str, str]]) -> str:
    """An nginx autoindex page: (href, modified, size) rows; names over 50 chars shown cut short."""
    rows = ['<a href="../">../</a>']
    for href, modified, size in entries:
        shown = href if len(href) <= 50 else href[:47] + "..&gt;"
        rows.append(f'<a href="{href}">{shown}</a>{" " * max(1, 51 - len(shown))}{modified} {size:>19}')
    return (f"<html>\r\n<head><title>Index of /{path}/</title></head>\r\n<body>\r\n"
            f"<h1>Index of /{path}/</h1><hr><pre>" + "\r\n".join(rows) + "\r\n</pre><hr></body>\r\n</html>\r\n")


def _content(wiki: str, date: str) -> str:
    return f"{wiki}-{date}-cirrussearch-content.json.gz"


def _write_index(root: Path, folders: dict[str, list[str] | None], extra_links: tuple[str, ...] = ()) -> Path:
    """The index page plus one listing per dated folder (None: listed in the index, but no folder)."""
    index = root / INDEX_PATH
    index.mkdir(parents=True)
    entries = [(f"{date}/", "17-Nov-2026 06:10", "-") for date in folders] + [("current/", "17-Nov-2026 06:10", "-")]
    entries += [(link, "01-Jan-2026 00:00", "-") for link in extra_links]
    (index / "index.html").write_text(_nginx_listing(INDEX_PATH, entries))
    for date, files in folders.items():
        if files is None:
            continue
        (index / date).mkdir()
        rows = [(name, "17-Nov-2026 05:59", "4046573404") for name in files]
        (index / date / "index.html").write_text(_nginx_listing(f"{INDEX_PATH}/{date}", rows))
    return index


def _served_paths(server: FileHTTPServer) -> list[str]:
    return [record.path for record in server.requests]


def test_latest_skips_a_newest_folder_whose_jawiki_dump_is_still_being_written(tmp_path):
    _write_index(tmp_path, {
        "20261102": [_content("jawiki", "20261102"), _content("enwiki", "20261102")],
        "20261109": [_content("jawiki", "20261109"), "jawiki-20261109-cirrussearch-general.json.gz"],
        # Newest: other wikis done, jawiki's general dump done, its content dump not yet written.
        "20261116": ["enwiki-20261116-cirrussearch-content.json.gz",
                     "jawiki-20261116-cirrussearch-general.json.gz",
                     "jawikibooks-20261116-cirrussearch-content.json.gz"],
    })
    with FileHTTPServer(tmp_path) as server:
        index_url = server.url(INDEX_PATH + "/")
        dump = latest_cirrussearch_dump(index_url, "jawiki")
        assert dump.date == "20261109"
        assert dump.url == f"{index_url}20261109/jawiki-20261109-cirrussearch-content.json.gz"
        # Newest first, and no further once a dump is found.
        assert _served_paths(server) == [f"/{INDEX_PATH}/", f"/{INDEX_PATH}/20261116/", f"/{INDEX_PATH}/20261109/"]
        # The index URL without its trailing slash works the same (relative links need the slash).
        assert latest_cirrussearch_dump(index_url.rstrip("/"), "jawiki") == dump
        assert latest_cirrussearch_dump(index_url, "enwiki").date == "20261116"


def test_a_folder_listed_in_the_index_but_gone_is_passed_over(tmp_path):
    _write_index(tmp_path, {"20261109": [_content("jawiki", "20261109")], "20261116": None})
    with FileHTTPServer(tmp_path) as server:
        assert latest_cirrussearch_dump(server.url(INDEX_PATH), "jawiki").date == "20261109"


def test_an_index_without_dated_folders_is_a_clear_error(tmp_path):
    _write_index(tmp_path, {}, extra_links=("README.txt", "20261116.txt", "20261399/", "?C=M;O=D"))
    with FileHTTPServer(tmp_path) as server:
        index_url = server.url(INDEX_PATH + "/")
        with pytest.raises(DumpIndexError, match="no dated YYYYMMDD/ folders") as caught:
            latest_cirrussearch_dump(index_url, "jawiki")
        assert index_url in str(caught.value)


def test_no_folder_holding_the_dump_names_the_folders_checked(tmp_path):
    _write_index(tmp_path, {"20261109": [_content("enwiki", "20261109")], "20261116": None})
    with FileHTTPServer(tmp_path) as server:
        index_url = server.url(INDEX_PATH + "/")
        with pytest.raises(DumpIndexError) as caught:
            latest_cirrussearch_dump(index_url, "jawiki")
    message = str(caught.value)
    assert index_url in message and "jawiki-YYYYMMDD-cirrussearch-content.json.gz" in message
    assert "20261116 (HTTP 404), 20261109" in message


def test_a_missing_index_and_a_failing_server_are_errors_naming_the_url(tmp_path):
    with FileHTTPServer(tmp_path) as server:
        with pytest.raises(DumpIndexError, match=r"/nowhere/: HTTP 404"):
            latest_cirrussearch_dump(server.url("nowhere/"))
        server.fail_next(3, status=503)
        with pytest.raises(DumpIndexError, match=r"cannot read the dump index: HTTP 503"):
            fetch_listing(server.url(""), timeout=5, attempts=3, backoff=0)
        assert len(server.requests) == 1 + 3  # 404 is not retried; 5xx is, up to `attempts`
    with pytest.raises(ConfigError, match="index_url"):
        latest_cirrussearch_dump("ftp://dumps.example.org/other/cirrussearch/")


def test_listing_parser_accepts_apache_and_absolute_links_and_ignores_the_rest():
    base = "https://dumps.example.org/other/cirrussearch/"
    apache = """<table><tr><th><a href="?C=N;O=D">Name</a></th></tr>
    <tr><td><a href="/other/">Parent Directory</a></td></tr>
    <tr><td><a href="20261102/">20261102/</a></td><td>2026-11-07 06:10</td></tr>
    <tr><td><a href='/other/cirrussearch/20261109/'>20261109/</a></td></tr>
    <tr><td><a href="https://dumps.example.org/other/cirrussearch/20261116/">x</a></td></tr>
    <tr><td><a href="https://mirror.example.net/other/cirrussearch/20261123/">elsewhere</a></td></tr>
    <tr><td><a href="20261109/jawiki-20261109-cirrussearch-content.json.gz">deeper</a></td></tr>
    <tr><td><a href="20260230/">not a date</a></td><td><a href="current/">current/</a></td></tr>
    <tr><td><A HREF="20261030/">upper case</A></td></tr></table>"""
    assert dated_folders(apache, base) == {"20261030", "20261102", "20261109", "20261116"}
    folder = base + "20261109/"
    files = listed_files('<a href="jawiki-20261109-cirrussearch-content.json.gz">jawiki-20261109-cirrussearch-co..&gt;'
                         '</a><a href="sub/">sub/</a><a href="../">../</a>', folder)
    assert files == {"jawiki-20261109-cirrussearch-content.json.gz"}


def test_a_pinned_date_gives_its_url_without_asking_the_index():
    dump = resolve_cirrussearch_dump("20240701", "http://127.0.0.1:9/other/cirrussearch")  # port 9: nothing listens
    assert dump.date == "20240701"
    assert dump.url == ("http://127.0.0.1:9/other/cirrussearch/20240701/"
                        "jawiki-20240701-cirrussearch-content.json.gz")
    assert dump_date_from_url(dump.url) == "20240701"
    assert dump_date_from_url("file:///data/demo/demo-jawiki-cirrussearch.json.gz") is None
    for bad, reason in [("2024-07-01", "neither 'latest' nor"), ("20240732", "not a calendar date"), ("", "neither")]:
        with pytest.raises(ConfigError, match=f"'dump_date'.*{reason}"):
            resolve_cirrussearch_dump(bad, "http://127.0.0.1:9/")


def test_a_pinned_url_wins_over_dump_date():
    from tinyplm_assets.assets.sources import _jawiki_source
    from tinyplm_assets.config import JawikiDownloadConfig

    url = "https://dumps.example.org/x/jawiki-20240701-cirrussearch-content.json.gz"
    config = JawikiDownloadConfig(url=url, dump_date="not even a date", index_url="http://127.0.0.1:9/")
    assert _jawiki_source(config) == (url, {"dump_selection": "pinned url", "dump_date": "20240701"})
    pinned = JawikiDownloadConfig(dump_date="20240701", index_url="http://127.0.0.1:9/")
    assert _jawiki_source(pinned)[1]["dump_selection"] == "pinned date"


def test_jawiki_raw_materialises_the_latest_dump_through_dagster(tmp_path):
    from dagster import materialize

    from tinyplm_assets.assets.sources import jawiki_raw
    from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage

    served = tmp_path / "served"
    index = _write_index(served, {"20261109": [_content("jawiki", "20261109")],
                                  "20261116": ["jawiki-20261116-cirrussearch-general.json.gz"]})
    payload = (DEMO_DIR / "demo-jawiki-cirrussearch.json.gz").read_bytes()
    shutil.copyfile(DEMO_DIR / "demo-jawiki-cirrussearch.json.gz", index / "20261109" / _content("jawiki", "20261109"))
    storage = ArtifactStorage(home=str(tmp_path / "home"))
    with FileHTTPServer(served) as server:
        index_url = server.url(INDEX_PATH + "/")
        result = materialize(
            [jawiki_raw],
            resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
            run_config={"ops": {"jawiki_raw": {"config": {"dump_date": "latest", "index_url": index_url,
                                                          "progress": False}}}},
        )
    assert result.success
    stored = tmp_path / "home" / "artifacts" / "jawiki_raw" / _content("jawiki", "20261109")
    assert stored.read_bytes() == payload
    (materialization,) = result.asset_materializations_for_node("jawiki_raw")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["url"] == f"{index_url}20261109/{_content('jawiki', '20261109')}"
    assert metadata["dump_date"] == "20261109"
    assert metadata["dump_selection"] == "latest in index"
    assert metadata["index_url"] == index_url
    assert metadata["size_bytes"] == len(payload)
