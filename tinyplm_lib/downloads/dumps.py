"""Find Wikimedia CirrusSearch dumps: the newest complete one, or the URL of a pinned date.

Old dumps leave the mirror after a few weeks, so a pinned URL goes dead; `latest_cirrussearch_dump`
reads the index's HTML listing for the newest ``YYYYMMDD/`` folder that already holds
``jawiki-YYYYMMDD-cirrussearch-content.json.gz`` (a folder appears while its dump is still written).
"""

from __future__ import annotations

import datetime as dt
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser

from tinyplm_lib.errors import ConfigError, TinyPLMError

CIRRUSSEARCH_INDEX_URL = "https://dumps.wikimedia.org/other/cirrussearch/"
_USER_AGENT = "tinyplm-dump-finder/0.1"
_DATE = re.compile(r"\d{8}")
# A listing page is a few kB; anything far larger is not a directory listing.
_MAX_LISTING_BYTES = 4 << 20


class DumpIndexError(TinyPLMError):
    """The dump index could not be read, or holds no usable dump. The message names the URL."""


@dataclass(frozen=True)
class CirrusDump:
    """One dump file: its date (``YYYYMMDD``) and full URL."""

    date: str
    url: str


def cirrussearch_file_name(wiki: str, date: str) -> str:
    """``jawiki``, ``20240701`` → ``jawiki-20240701-cirrussearch-content.json.gz``."""
    return f"{wiki}-{date}-cirrussearch-content.json.gz"


def dump_date_from_url(url: str) -> str | None:
    """The ``YYYYMMDD`` in a ``…-YYYYMMDD-cirrussearch-content.json.gz`` URL; None for other names."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    match = re.fullmatch(r"[^/]+-(\d{8})-cirrussearch-content\.json\.gz", name)
    return match.group(1) if match else None


def parse_dump_date(value: str, setting: str = "dump_date") -> str:
    """A ``YYYYMMDD`` string that is a real calendar date; ConfigError naming ``setting`` otherwise."""
    if not _DATE.fullmatch(value or ""):
        raise ConfigError(setting, f"{value!r} is neither 'latest' nor a YYYYMMDD date")
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ConfigError(setting, f"{value!r} is not a calendar date (YYYYMMDD)") from None
    return value


def resolve_cirrussearch_dump(
    dump_date: str, index_url: str = CIRRUSSEARCH_INDEX_URL, wiki: str = "jawiki", *, timeout: float = 30.0
) -> CirrusDump:
    """``dump_date`` "latest" → the newest complete dump in ``index_url``; ``YYYYMMDD`` → its URL.

    A pinned date is not looked up: the download itself reports a missing file with its URL.
    """
    index_url = _directory_url(index_url)
    if dump_date.strip().lower() == "latest":
        return latest_cirrussearch_dump(index_url, wiki, timeout=timeout)
    date = parse_dump_date(dump_date.strip())
    return CirrusDump(date, _child_url(_child_url(index_url, date + "/"), cirrussearch_file_name(wiki, date)))


def latest_cirrussearch_dump(
    index_url: str = CIRRUSSEARCH_INDEX_URL, wiki: str = "jawiki", *, timeout: float = 30.0
) -> CirrusDump:
    """The newest dated folder of ``index_url`` whose listing holds ``wiki``'s content dump.

    Folders are tried newest first; one without the file (still being written, or that wiki
    skipped that week) or gone since the index was read (HTTP 404) is passed over.
    """
    index_url = _directory_url(index_url)
    dates = dated_folders(fetch_listing(index_url, timeout=timeout), index_url)
    if not dates:
        raise DumpIndexError(f"{index_url}: no dated YYYYMMDD/ folders in the listing")
    checked = []
    for date in sorted(dates, reverse=True):
        folder_url = _child_url(index_url, date + "/")
        name = cirrussearch_file_name(wiki, date)
        try:
            listing = fetch_listing(folder_url, timeout=timeout)
        except _NotFound:
            checked.append(f"{date} (HTTP 404)")
            continue
        if name in listed_files(listing, folder_url):
            return CirrusDump(date, _child_url(folder_url, name))
        checked.append(date)
    raise DumpIndexError(
        f"{index_url}: no folder holds {cirrussearch_file_name(wiki, 'YYYYMMDD')}; "
        f"checked {', '.join(checked)}"
    )


def listing_links(html: str) -> list[str]:
    """Every ``<a href>`` of an HTML page, in order (Apache, nginx and lighttpd listings alike)."""
    parser = _LinkParser()
    parser.feed(html)
    parser.close()
    return parser.links


def dated_folders(html: str, index_url: str) -> set[str]:
    """``YYYYMMDD`` of every link to a direct sub-folder of ``index_url`` named by a real date.

    Links are resolved against ``index_url``, so ``20261116/``, ``/other/cirrussearch/20261116/``
    and absolute URLs all count; ``current/``, ``../``, sort links (``?C=M;O=D``) and files do not.
    """
    dates = set()
    for target in _children(html, index_url):
        if target.endswith("/") and _DATE.fullmatch(target[:-1]):
            try:
                dates.add(parse_dump_date(target[:-1]))
            except ConfigError:
                continue  # 20241399/ is not a dump folder
    return dates


def listed_files(html: str, folder_url: str) -> set[str]:
    """Names of the files (not folders) that a listing of ``folder_url`` links to."""
    return {target for target in _children(html, folder_url) if not target.endswith("/")}


def fetch_listing(url: str, *, timeout: float = 30.0, attempts: int = 3, backoff: float = 1.0) -> str:
    """The text of one listing page; retried on network errors and 5xx answers, 404 raised apart."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError("index_url", f"{url}: the dump index must be an http:// or https:// URL")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(_MAX_LISTING_BYTES + 1)
                charset = response.headers.get_content_charset() or "utf-8"
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound(url) from exc
            problem = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500:
                break  # 403 and the like will not change on a retry
            continue
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets; ValueError: a malformed URL
            problem = str(getattr(exc, "reason", None) or exc)
            continue
        if len(body) > _MAX_LISTING_BYTES:
            raise DumpIndexError(f"{url}: more than {_MAX_LISTING_BYTES} bytes; not a directory listing")
        return body.decode(charset, errors="replace")
    raise DumpIndexError(f"{url}: cannot read the dump index: {problem}")


class _NotFound(DumpIndexError):
    def __init__(self, url: str) -> None:
        super().__init__(f"{url}: HTTP 404 Not Found")


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.extend(value for name, value in attrs if name == "href" and value)


def _children(html: str, base_url: str) -> list[str]:
    """Links of ``html`` that point directly inside ``base_url``: ``name`` or ``name/``, decoded."""
    base = urllib.parse.urlsplit(base_url)
    children = []
    for link in listing_links(html):
        target = urllib.parse.urlsplit(urllib.parse.urljoin(base_url, link.strip()))
        if target.query or (target.scheme, target.netloc) != (base.scheme, base.netloc):
            continue
        if not target.path.startswith(base.path) or target.path == base.path:
            continue
        rest = urllib.parse.unquote(target.path[len(base.path):])
        if rest.rstrip("/") and "/" not in rest.rstrip("/"):
            children.append(rest)
    return children


def _directory_url(url: str) -> str:
    # Relative links resolve against the last "/", so the index URL must end with one.
    url = url.strip()
    return url if url.endswith("/") else url + "/"


def _child_url(folder_url: str, name: str) -> str:
    return urllib.parse.urljoin(folder_url, urllib.parse.quote(name))
