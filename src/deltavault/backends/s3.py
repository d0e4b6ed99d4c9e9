"""S3 backend: a repository under a prefix of a bucket on any S3-compatible object store.

Built on botocore (the AWS SDK's core): the standard credentials chain, SigV4 signing,
region configuration and connection pooling. Its own retries are off: backends.retry retries
whole operations with exponential backoff and jitter, so attempts never multiply.

Atomicity comes from the store: a PUT, or the completion of a multipart upload, makes the
whole object visible at once, and a killed upload leaves no object (an incomplete multipart
upload, invisible to listings, which prune aborts after an hour). Names of packs, index
files, snapshots and keys are hashes of their bytes, so a retried upload writes the same
bytes under the same name. Lock records are created with ``If-None-Match: *`` where the
server honours it (docs/design.md, "Repositories on S3"). ``put_file`` uploads a spooled
pack from its file (filerange.py), never whole in memory.
"""

from __future__ import annotations

import builtins
import hashlib
import mmap
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from deltavault.backends.base import TEMP_PREFIX, ObjectInfo, check_object_name, read_fd
from deltavault.backends.filerange import FileRange
from deltavault.backends.retention import ObjectRetention, Retention, protected
from deltavault.backends.s3body import read_answer, read_mapped
from deltavault.backends.s3bucket import prepare_bucket, require_object_lock
from deltavault.backends.s3errors import (
    BucketNotFound,
    ObjectRetained,
    error_code,
    stored,
    translate,
)
from deltavault.backends.s3listing import checked_page, listed_name, pages, versions
from deltavault.backends.s3location import S3Location, S3Options
from deltavault.errors import AccessRefused, BackendError, ObjectNotFound, UsageError

T = TypeVar("T")
_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")
Body = Callable[[int, int], Any]  # (start, length) -> a request body for that range of the object


def _botocore() -> Any:
    try:
        import botocore.config
        import botocore.session
    except ImportError as exc:
        raise UsageError("the s3 backend needs botocore: pip install 'deltavault[s3]'") from exc
    return botocore


class S3Backend:
    def __init__(self, loc: S3Location, options: S3Options | None = None) -> None:
        self.loc = loc
        self.opts = options or S3Options.from_env()
        self._client_lock = threading.Lock()
        self._c: Any = None
        self.region = ""
        self.retention: Retention | None = None
        self._conditional = True  # If-None-Match on lock records, until the server says it cannot

    # --- connection -----------------------------------------------------------------------

    def location(self) -> str:
        return str(self.loc)

    def _client(self) -> Any:
        if self._c is None:
            with self._client_lock:
                if self._c is None:
                    self._c = self._make_client()
        return self._c

    def _make_client(self) -> Any:
        bc = _botocore()
        from deltavault.backends.s3session import new_session  # botocore's, after _botocore's check
        try:
            session = new_session()
            self.region = session.get_config_variable("region") or "us-east-1"
        except Exception as exc:
            raise translate(exc, "AWS configuration", str(self.loc)) from exc
        addressing = self.opts.addressing
        if addressing == "auto" and self.loc.endpoint:
            addressing = "path"  # self-hosted stores rarely have a DNS name per bucket
        cfg = bc.config.Config(
            region_name=self.region, signature_version="s3v4", s3={"addressing_style": addressing},
            connect_timeout=self.opts.connect_timeout, read_timeout=self.opts.read_timeout,
            retries={"total_max_attempts": 1},  # backends.retry retries: once, with backoff and jitter
            max_pool_connections=32, tcp_keepalive=True)
        try:
            return session.create_client("s3", endpoint_url=self.loc.endpoint, config=cfg,
                                         verify=self.opts.ca_bundle)
        except Exception as exc:
            raise translate(exc, "S3 client", str(self.loc)) from exc

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        client = self._client()
        try:
            return fn(client)
        except Exception as exc:
            raise translate(exc, what, str(self.loc)) from exc

    def _key(self, name: str) -> str:
        check_object_name(name)
        return self.loc.root + name

    # --- the Backend protocol ---------------------------------------------------------------

    def exists(self) -> bool:
        try:
            r = checked_page(self._call("list", lambda c: c.list_objects_v2(
                Bucket=self.loc.bucket, Prefix=self.loc.root, MaxKeys=1)), str(self.loc), "")
        except ObjectNotFound:
            return False
        except BackendError as exc:
            if isinstance(exc, BucketNotFound):
                return False
            raise
        return bool(r.get("KeyCount") or r.get("Contents"))

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under root+prefix, one page (1,000 keys) per request."""
        return pages(self.loc.bucket, self.loc.root, str(self.loc), prefix,
                     lambda a: self._call(f"list {prefix or '/'}", lambda c: c.list_objects_v2(**a)))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for o in self._objects(prefix):
            name = listed_name(self.loc.root, o)
            if name is not None:
                yield ObjectInfo(name, int(o.get("Size", 0)))

    def get_sized(self, name: str, offset: int, length: int, reserve: Callable[[int], None]) -> bytes | mmap.mmap:
        """A range for backends/readahead.py, ``reserve``d before its body is read (s3body.py)."""
        key, rng = self._key(name), f"bytes={offset}-{offset + length - 1}"
        get = lambda c: read_mapped(name, c.get_object(Bucket=self.loc.bucket, Key=key, Range=rng),  # noqa: E731
                                    reserve, offset, length)
        try:
            return self._call(name, get)
        except BackendError as exc:
            if "InvalidRange" not in exc.message:
                raise
            reserve(0)
            return b""  # from at or past the end, as a file read gives

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if length == 0:
            return b""
        rng = None
        if offset < 0:
            rng = f"bytes={offset}"
        elif offset or length is not None:
            rng = f"bytes={offset}-{'' if length is None else offset + length - 1}"

        def read(c: Any) -> tuple[bytes, str]:
            args: dict[str, Any] = {"Bucket": self.loc.bucket, "Key": key}
            if rng:
                args["Range"] = rng
            r = c.get_object(**args)
            return read_answer(name, r, offset, length, ranged=bool(rng)), str(r.get("ContentRange", ""))

        try:
            data, crange = self._call(name, read)
        except BackendError as exc:
            if rng and "InvalidRange" in exc.message:
                return b""  # from at or past the end, as a file read gives
            raise
        if offset < 0:
            total = int(crange.rpartition("/")[2]) if "/" in crange else len(data)
            if total < -offset:
                raise ObjectNotFound(f"{name}: shorter than {-offset} bytes")
            if length is not None:
                data = data[:length]
        return data

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        args = self._lock_args(name)
        if len(data) >= self.opts.multipart_threshold:
            self._put_multipart(name, key, len(data), lambda start, n: data[start:start + n], args)
            return
        if name.startswith("locks/") and self._conditional:
            self._put_new(name, key, data, args)
            return
        self._call(name, lambda c: stored(name, c.put_object(Bucket=self.loc.bucket, Key=key, Body=data, **args)))

    def put_file(self, name: str, fd: int, size: int) -> None:
        """``put`` of the first ``size`` bytes of the file open as ``fd`` (a spooled pack),
        streamed from the file (FileRange): no copy of the object in memory."""
        key = self._key(name)
        if name.startswith("locks/"):
            self.put(name, read_fd(fd, size))  # a lock record is a few hundred bytes
            return
        args = self._lock_args(name)
        if size >= self.opts.multipart_threshold:
            self._put_multipart(name, key, size, lambda start, n: FileRange(fd, start, n), args)
            return
        self._call(name, lambda c: stored(name, c.put_object(Bucket=self.loc.bucket, Key=key,
                                                             Body=FileRange(fd, 0, size), **args)))

    def _put_new(self, name: str, key: str, data: bytes, args: dict[str, Any]) -> None:
        """Create-only (If-None-Match: *): a lock record is never replaced in place."""
        bc = _botocore()
        client = self._client()
        try:
            stored(name, client.put_object(Bucket=self.loc.bucket, Key=key, Body=data, IfNoneMatch="*", **args))
            return
        except bc.exceptions.ClientError as exc:
            code, status = error_code(exc)
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                # Our own earlier attempt landed (its reply was lost), or a name collision.
                head = self._call(name, lambda c: c.head_object(Bucket=self.loc.bucket, Key=key))
                if head.get("ETag", "").strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest():
                    return
                raise BackendError(f"{name}: another object already has this name", retryable=False) from exc
            if status in (400, 501) or code in ("NotImplemented", "InvalidArgument"):
                self._conditional = False  # documented fallback: plain PUT of a random name
            else:
                raise translate(exc, name, str(self.loc)) from exc
        except Exception as exc:
            raise translate(exc, name, str(self.loc)) from exc
        self._call(name, lambda c: stored(name, c.put_object(Bucket=self.loc.bucket, Key=key, Body=data, **args)))

    def _put_multipart(self, name: str, key: str, total: int, body: Body, args: dict[str, Any]) -> None:
        """Parts of ``part_size`` uploaded ``parallel_parts`` at a time; each worker makes
        its own part's body (a slice of the bytes, or a FileRange of the file). The object
        appears when the upload completes; a failure aborts the upload."""
        b = self.loc.bucket
        uid = self._call(name, lambda c: c.create_multipart_upload(Bucket=b, Key=key, **args))["UploadId"]
        size = self.opts.part_size
        count = (total + size - 1) // size
        parts: builtins.list[dict[str, Any]] = [{} for _ in range(count)]

        def send(i: int) -> None:
            chunk = body(i * size, min(size, total - i * size))
            r = self._call(name, lambda c: stored(name, c.upload_part(Bucket=b, Key=key, UploadId=uid,
                                                                      PartNumber=i + 1, Body=chunk)))
            parts[i] = {"ETag": r["ETag"], "PartNumber": i + 1, **{k: r[k] for k in _CHECKSUMS if k in r}}

        try:
            with ThreadPoolExecutor(max_workers=min(self.opts.parallel_parts, count),
                                    thread_name_prefix="dv-s3-part") as pool:
                for _ in pool.map(send, range(count)):
                    pass
            self._call(name, lambda c: stored(name, c.complete_multipart_upload(
                Bucket=b, Key=key, UploadId=uid, MultipartUpload={"Parts": parts})))
        except BaseException:
            try:
                self._client().abort_multipart_upload(Bucket=b, Key=key, UploadId=uid)
            except Exception:
                pass  # prune aborts what is left after an hour
            raise

    def _lock_args(self, name: str) -> dict[str, Any]:
        r = self.retention
        if r is None or not protected(name):
            return {}
        return {"ObjectLockMode": r.mode.upper(),
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=r.days)}

    def delete(self, name: str) -> None:
        key = self._key(name)
        if self.retention is None:
            self._call(name, lambda c: c.delete_object(Bucket=self.loc.bucket, Key=key))
            return
        # An Object Lock bucket keeps versions: a plain DELETE would only hide the object
        # behind a delete marker. Remove every version, unless one is still retained.
        if protected(name):
            r = self.retention_of([name]).get(name)
            if r is not None and r.until is not None and r.until > datetime.now(UTC):
                raise ObjectRetained(f"{name} is under retention until {r.until:%Y-%m-%d %H:%M} UTC",
                                     until=r.until.isoformat())
        for vid in self._versions(name, key):
            try:
                self._call(name, lambda c, v=vid: c.delete_object(Bucket=self.loc.bucket, Key=key, VersionId=v))  # type: ignore[misc]
            except BackendError as exc:
                if isinstance(exc, AccessRefused) and "access denied" in exc.message:
                    raise ObjectRetained(f"{name}: a version of it is still under retention") from exc
                raise

    def _versions(self, name: str, key: str) -> builtins.list[str]:
        return versions(self.loc.bucket, key, str(self.loc), name,
                        lambda a: self._call(name, lambda c: c.list_object_versions(**a)))

    def stat(self, name: str) -> ObjectInfo:
        key = self._key(name)
        try:
            r = self._call(name, lambda c: stored(name, c.head_object(Bucket=self.loc.bucket, Key=key), "HEAD"))
        except BackendError as exc:
            self._explain(exc)
            raise
        return ObjectInfo(name, int(r.get("ContentLength", 0)))

    def _explain(self, exc: BackendError) -> None:
        """A HEAD answer has no body, so a refusal arrives as a bare 403 or 400: ask again
        with a GET, whose error names the cause (wrong key, clock skew, no bucket)."""
        if exc.retryable or isinstance(exc, ObjectNotFound) or not ("(403)" in exc.message or "400" in exc.message):
            return
        self._call(self.loc.bucket, lambda c: c.list_objects_v2(Bucket=self.loc.bucket, Prefix=self.loc.root,
                                                                 MaxKeys=1))

    # --- housekeeping (prune) -----------------------------------------------------------------

    def remove_temp_files(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Abort multipart uploads started more than ``older_than`` seconds ago (killed
        writers; a stalled one only loses its put) and remove temporary-named objects as old.
        Returns (count, bytes)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        b = self.loc.bucket
        count = size = 0
        args: dict[str, Any] = {"Bucket": b, "Prefix": self.loc.root}
        while True:
            page = self._call("list uploads", lambda c, a=dict(args): c.list_multipart_uploads(**a))  # type: ignore[misc]
            for up in page.get("Uploads", []):
                started = up.get("Initiated")
                if not isinstance(started, datetime) or started >= cutoff:
                    continue
                key, uid = up["Key"], up["UploadId"]
                try:
                    parts = self._call(key, lambda c, k=key, u=uid: c.list_parts(Bucket=b, Key=k, UploadId=u))  # type: ignore[misc]
                    size += sum(int(p.get("Size", 0)) for p in parts.get("Parts", []))
                    if not dry_run:
                        self._call(key, lambda c, k=key, u=uid: c.abort_multipart_upload(Bucket=b, Key=k, UploadId=u))  # type: ignore[misc]
                except ObjectNotFound:
                    continue
                except BackendError as exc:
                    if "NoSuchUpload" not in exc.message:
                        raise
                    continue  # finished or aborted meanwhile
                count += 1
            if not page.get("IsTruncated"):
                break
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker")
        n = len(self.loc.root)
        for o in self._objects(""):
            name = o["Key"][n:]
            if name.rpartition("/")[2].startswith(TEMP_PREFIX) and o.get("LastModified", cutoff) < cutoff:
                if not dry_run:
                    self.delete(name)
                count += 1
                size += int(o.get("Size", 0))
        return count, size

    # --- buckets and Object Lock ----------------------------------------------------------------

    def prepare_bucket(self, *, object_lock: bool) -> str | None:
        """For init: create the bucket if it is missing (with Object Lock when asked), or
        check that an existing one has Object Lock when asked. Returns what it did."""
        self._client()  # sets the region
        return prepare_bucket(self._call, self.loc.bucket, self.region, object_lock=object_lock)

    def enable_retention(self, retention: Retention, *, verify: bool) -> None:
        if verify:
            require_object_lock(self._call, self.loc.bucket)
        self.retention = retention

    def retention_of(self, names: Iterable[str]) -> dict[str, ObjectRetention]:
        """One HEAD per object, eight at a time."""
        def head(name: str) -> ObjectRetention | None:
            key = self._key(name)
            for attempt in range(4):  # these calls bypass backends.retry
                try:
                    r = self._call(name, lambda c: c.head_object(Bucket=self.loc.bucket, Key=key))
                    break
                except ObjectNotFound:
                    return None
                except BackendError as exc:
                    if not exc.retryable or attempt == 3:
                        raise
                    time.sleep(0.2 * 2**attempt * random.uniform(0.5, 1.0))
            until = r.get("ObjectLockRetainUntilDate")
            mode = r.get("ObjectLockMode")
            return ObjectRetention(name, r.get("LastModified") or datetime.now(UTC),
                                   str(mode).lower() if mode else None,
                                   until.astimezone(UTC) if isinstance(until, datetime) else None)

        todo = list(dict.fromkeys(names))
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dv-s3-head") as pool:
            found = list(pool.map(head, todo))
        return {r.name: r for r in found if r is not None}

