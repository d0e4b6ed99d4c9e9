"""Listings from an S3 server that may lie (docs/design.md, "Repositories on S3").

A listing is paged: each answer says whether more follow (IsTruncated) and how to ask for
them (NextContinuationToken). A server that answers a token it gave before, or a page that
starts where an earlier one started, would have the listing go round for ever (and every
caller collect it for ever): that ends it with an error. Keys are used as object names,
which become requests and local cache paths: a key outside the prefix asked for, with an
empty, ``.`` or ``..`` component, a temporary name, or longer than S3 allows, is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from deltavault.backends.base import TEMP_PREFIX, check_object_name
from deltavault.errors import BackendError

MAX_KEY = 1024  # bytes of UTF-8: S3's own limit on a key
# Pages in a row that hold no key: S3 may send an empty page before more keys (rarely, and
# not many in a row); a server that sends only these, each with a fresh token, never ends.
MAX_EMPTY = 100


def pages(bucket: str, root: str, where: str, prefix: str,
          request: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The objects of every page of the listing of ``root``+``prefix`` in ``bucket`` (the
    repository at ``where``), each key once and under that prefix; ``request`` sends one
    ListObjectsV2 with the arguments it is given."""
    if prefix:
        check_object_name(prefix)
    want = root + prefix
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": want}
    seen: set[tuple[str, str]] = set()  # tokens and first keys of the pages so far: a few bytes per 1,000 keys
    last = ""  # the last key of the page before: a page never repeats it
    empty = 0
    while True:
        page = checked_page(request(dict(args)), where, prefix)
        contents = page.get("Contents") or []
        keys: set[str] = set()
        for o in contents:
            key = o.get("Key") if isinstance(o, dict) else None
            if isinstance(key, str) and key.startswith(want) and key != last and key not in keys:
                keys.add(key)
                yield o
        ends = [o.get("Key") for o in (contents[0], contents[-1]) if isinstance(o, dict)] if contents else []
        if len(ends) == 2 and isinstance(ends[0], str) and isinstance(ends[1], str):
            if ("key", ends[0]) in seen:
                _endless(where, prefix, f"a page starting at {ends[0]!r} again")
            seen.add(("key", ends[0]))
            last = ends[1]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        empty = 0 if keys else empty + 1
        if empty > MAX_EMPTY:
            _endless(where, prefix, f"{empty} pages in a row without a key")
        if ("token", str(token)) in seen:
            _endless(where, prefix, f"the continuation token {token!r} again")
        seen.add(("token", str(token)))
        args["ContinuationToken"] = token


def versions(bucket: str, key: str, where: str, name: str,
             request: Callable[[dict[str, Any]], dict[str, Any]]) -> list[str]:
    """The version ids of ``key`` (the object ``name`` at ``where``), from ListObjectVersions
    sent by ``request``; markers answered before would have the listing go round for ever."""
    out: list[str] = []
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    seen: set[tuple[str, str]] = set()
    while True:
        page = checked_page(request(dict(args)), where, name)
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            if v.get("Key") == key:
                out.append(v.get("VersionId") or "null")
        if not page.get("IsTruncated"):
            return out
        marker = (str(page.get("NextKeyMarker")), str(page.get("NextVersionIdMarker")))
        if marker in seen:
            raise BackendError(f"{name}: the S3 server's list of versions would never end", retryable=False)
        seen.add(marker)
        for arg, field in (("KeyMarker", "NextKeyMarker"), ("VersionIdMarker", "NextVersionIdMarker")):
            args.pop(arg, None)
            if page.get(field):  # botocore refuses a None: a server may leave either out
                args[arg] = page[field]


def checked_page(page: dict[str, Any], where: str, prefix: str) -> dict[str, Any]:
    """``page``, a ListObjectsV2 answer, if it is one: botocore parses a 200 that is not
    S3's XML (a proxy's HTML error page) into an empty answer, which read as an empty
    listing, every object of the repository missing."""
    if "IsTruncated" not in page:
        raise BackendError(f"list {prefix or '/'}: the S3 server at {where} answered something that is not a "
                           "listing (no IsTruncated)", retryable=True)
    return page


def _endless(where: str, prefix: str, what: str) -> None:
    raise BackendError(f"list {prefix or '/'}: the S3 server at {where} answered {what}: its listing would "
                       "never end", retryable=False)


def listed_name(root: str, o: dict[str, Any]) -> str | None:
    """The object name of a listed object, or None for a key that is not one of ours."""
    key = o.get("Key")
    if not isinstance(key, str) or not key.startswith(root) or len(key.encode("utf-8", "replace")) > MAX_KEY:
        return None
    name = key[len(root):]
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or parts[-1].startswith(TEMP_PREFIX):
        return None  # folder markers of other tools, temporary names, names that would climb out
    if any(ord(ch) < 0x20 for ch in name):
        return None
    try:
        check_object_name(name)
        size = int(o.get("Size", 0))
    except (BackendError, TypeError, ValueError):
        return None
    return name if size >= 0 else None
