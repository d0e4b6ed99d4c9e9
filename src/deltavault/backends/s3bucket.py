"""The bucket of an S3 repository at init: made when missing (with Object Lock when asked),
or checked to have Object Lock when immutable backups are asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltavault.backends.s3errors import BucketNotFound
from deltavault.errors import AccessRefused, BackendError, ClockSkew, Unreachable, UsageError

Call = Callable[[str, Callable[[Any], Any]], Any]  # S3Backend._call: (what, fn(client)) -> fn's result


def prepare_bucket(call: Call, bucket: str, region: str, *, object_lock: bool) -> str | None:
    """Returns what it did, if anything."""
    try:  # a GET, not HEAD: a refusal then says why
        call(bucket, lambda c: c.list_objects_v2(Bucket=bucket, MaxKeys=1))
    except BucketNotFound:
        args: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        if object_lock:
            args["ObjectLockEnabledForBucket"] = True
        try:
            call(bucket, lambda c: c.create_bucket(**args))
        except BackendError as exc:
            if "BucketAlreadyOwnedByYou" not in exc.message:
                # the same type: refused credentials keep their exit code (errors.ExitCode)
                raise type(exc)(f"bucket {bucket} does not exist and could not be created: {exc.message}",
                                retryable=exc.retryable) from exc
        return f"created bucket {bucket}" + (" with Object Lock" if object_lock else "")
    if object_lock:
        require_object_lock(call, bucket)
    return None


def require_object_lock(call: Call, bucket: str) -> None:
    try:
        cfg = call(bucket, lambda c: c.get_object_lock_configuration(Bucket=bucket))
        enabled = cfg.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
    except BackendError as exc:
        if exc.retryable or isinstance(exc, (AccessRefused, ClockSkew, Unreachable)):
            raise
        enabled = False  # ObjectLockConfigurationNotFoundError, or a server without Object Lock
    if not enabled:
        raise UsageError(f"bucket {bucket} has no Object Lock, so immutable backups cannot be kept there: "
                         "use a new bucket (init --immutable creates it with Object Lock) or enable "
                         "Object Lock on this one. Nothing was written")
