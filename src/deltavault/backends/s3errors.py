"""botocore's errors as deltavault's typed errors, with the right retryability.

Retried (by backends.retry, never by botocore itself, so attempts do not multiply): throttling
(503 SlowDown and friends), 5xx, request timeouts, dropped and refused connections. Not
retried: refused credentials, a missing bucket or object, clock skew, access denied.

Bad input has an exit code of its own (errors.ExitCode): refused credentials or access 19
(AccessRefused), an endpoint that cannot be reached or whose certificate is not trusted 20
(Unreachable), clock skew 21 (ClockSkew), a missing bucket 10; 15 stays for a store that
fails after the retries or answers what a store does not.
"""

from __future__ import annotations

from typing import Any

from deltavault.errors import (
    AccessRefused,
    BackendError,
    ClockSkew,
    DeltavaultError,
    ObjectNotFound,
    RepositoryNotFound,
    Unreachable,
    UsageError,
)

_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "TooManyRequestsException", "ServiceUnavailable", "RequestThrottled", "503"}
_TRANSIENT = {"InternalError", "RequestTimeout", "RequestTimeoutException", "OperationAborted",
              "PriorRequestNotComplete"}
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                "InvalidSecurity", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
_SKEW = {"RequestTimeTooSkewed", "RequestExpired"}


class BucketNotFound(RepositoryNotFound, BackendError):
    """The bucket does not exist: no repository there (exit 10), not a failing store."""

    exit_code = RepositoryNotFound.exit_code
    retryable = False


class ObjectRetained(BackendError):
    """A delete refused: the object is under S3 Object Lock retention until ``until``."""

    retryable = False

    def __init__(self, message: str, until: str = "") -> None:
        super().__init__(message, retryable=False)
        self.until = until


def stored(name: str, response: dict[str, Any], what: str = "upload") -> dict[str, Any]:
    """``response`` to a PUT, an uploaded part, a completed upload or a HEAD (``what``), if
    it is the store's: S3 answers each with the object's ETag. A 200 without one (a proxy's
    or a load balancer's own page, which botocore parses into an empty answer) is not: after
    an upload the object may be missing (and a pack indexed after it would be); a HEAD's
    length is the page's."""
    if not str(response.get("ETag") or "").strip('"'):
        raise BackendError(f"{name}: the S3 server's answer to the {what} has no ETag: not the store's answer "
                           "(an upload may not be stored)")
    return response


def error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError; ('', 0) for anything else."""
    resp: Any = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return "", 0
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def translate(exc: BaseException, what: str, where: str) -> DeltavaultError:
    """The typed error for a botocore exception raised while doing ``what`` (an object name
    or an operation) at ``where`` (the repository location)."""
    from botocore import exceptions as be

    if isinstance(exc, DeltavaultError):
        return exc
    if isinstance(exc, be.ClientError):
        code, status = error_code(exc)
        msg = str(exc.response.get("Error", {}).get("Message") or code or status)
        if code in ("NoSuchKey", "NotFound") or (code == "404" and status == 404):
            return ObjectNotFound(f"{what}: not found")
        if code == "NoSuchBucket":
            return BucketNotFound(f"no repository at {where}: the bucket does not exist "
                                  "(deltavault init creates it)")
        if code in _CREDENTIALS:
            return AccessRefused(f"{what}: the S3 server at {where} refused the credentials ({code}): check "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                 "~/.aws/credentials")
        if code in _SKEW:
            return ClockSkew(f"{what}: the S3 server at {where} says this machine's clock is wrong ({code}: "
                             f"{msg}); set the time (NTP) and try again")
        if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
            return AccessRefused(f"{what}: access denied by the S3 server at {where} ({code or status}): the "
                                 "credentials lack permission for this bucket or operation")
        if code in _THROTTLED or status in (429, 503):
            return BackendError(f"{what}: the S3 server at {where} is throttling ({code or status}: {msg})")
        if code in _TRANSIENT or status >= 500:
            return BackendError(f"{what}: the S3 server at {where} failed ({code or status}: {msg})")
        if code in ("QuotaExceeded", "XMinioStorageFull", "StorageFull", "EntityTooLarge"):
            from deltavault.errors import NoSpace

            return NoSpace(f"{what}: the S3 server at {where} has no room ({code}: {msg})")
        return BackendError(f"{what}: the S3 server at {where} said {code or status}: {msg}", retryable=False)
    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
        return UsageError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "AWS_PROFILE, or ~/.aws/credentials")
    if isinstance(exc, (be.ProfileNotFound, be.ConfigParseError, be.InvalidConfigError)):
        return UsageError(f"the AWS configuration is unusable: {exc}")
    if isinstance(exc, be.SSLError):
        return Unreachable(f"{what}: TLS with the S3 server at {where} failed: {exc}; for a private CA use "
                           "--s3-ca-bundle or DELTAVAULT_S3_CA_BUNDLE", retryable=False)
    if isinstance(exc, be.ConnectTimeoutError):  # no answer to the connect: unreachable, as refused
        return Unreachable(f"{what}: cannot connect to the S3 server at {where}: timed out: {exc}")
    if isinstance(exc, be.EndpointConnectionError):
        return Unreachable(f"{what}: cannot connect to the S3 server at {where}: {_cause(exc)}")
    if isinstance(exc, be.ReadTimeoutError):
        return BackendError(f"{what}: the S3 server at {where} timed out: {exc}")
    if isinstance(exc, (be.HTTPClientError, be.ConnectionError, be.IncompleteReadError)):
        return BackendError(f"{what}: connection to the S3 server at {where} lost: {exc}")
    if isinstance(exc, be.ParamValidationError):
        return BackendError(f"{what}: invalid S3 request: {exc}", retryable=False)
    if isinstance(exc, be.BotoCoreError):
        return BackendError(f"{what}: S3 client error at {where}: {exc}", retryable=False)
    if isinstance(exc, OSError):
        return BackendError(f"{what}: connection to the S3 server at {where} lost: {exc}")
    raise exc


def _cause(exc: BaseException) -> str:
    inner = exc.__context__ or exc.__cause__
    while inner is not None and (inner.__context__ or inner.__cause__) is not None:
        nxt = inner.__context__ or inner.__cause__
        if nxt is None:
            break
        inner = nxt
    text = getattr(inner, "strerror", None) or (str(inner) if inner else "")
    return text or str(exc)
