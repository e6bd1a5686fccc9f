"""S3 URLs and errors, each said in one line naming the store and the cause: a missing bucket,
refused credentials, an unreachable endpoint, an endpoint that is no S3 API. No message shows
credentials (``without_secrets``); none go in a URL.
"""

from __future__ import annotations

import re

from store.errors import ScanCacheError
from store.storage import S3_SCHEME

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # fullmatch ("$" passes a final "\n")


# scancache writes under a prefix of a bucket it is given; making buckets (their region, policy,
# versioning, costs) is the owner's decision
_CREATE_IT = " (create it first, e.g. aws s3 mb s3://BUCKET; scancache does not make buckets)"


class StoreUnavailable(ScanCacheError, OSError):
    """The object store cannot be used: no bucket, refused credentials, unreachable endpoint.
    ``refused``: the store answered and said no (credentials, a missing bucket): retrying the
    same request does not help, where an endpoint that did not answer may answer later."""

    refused: bool = False


# A URL wherever it stands in a message: a scheme not glued to a word before it, then the rest
# up to whitespace or a quote.
_URL = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)([^\s`'\"]*)")


def _hidden(url: re.Match[str]) -> str:
    scheme, rest = url[1], url[2]
    # user information: up to the last "@" before the path (http(s) passwords may hold "/"
    # unescaped, so there up to the URL's last "@"; s3://bucket/key@v keeps its bucket)
    path = rest.find("/")
    end = len(rest) if scheme.lower() in ("http://", "https://") or path < 0 else path
    at = rest.rfind("@", 0, end)
    if at >= 0:
        rest = "***" + rest[at:]
    query = rest.find("?")
    if query >= 0:  # tokens and signatures
        rest = rest[:query] + "?***"
    return scheme + rest


def without_secrets(text: str) -> str:
    """A message or URL with each URL's user information and query hidden (``***``)."""
    return _URL.sub(_hidden, text)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at either end)."""
    if not url.startswith(S3_SCHEME):
        raise ValueError(f"{without_secrets(url)}: not an s3:// URL")
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    if "@" in bucket:
        raise ValueError(
            f"{without_secrets(url)}: credentials do not go in the URL (it is shown in logs and "
            "listings): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{url}: {bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url}: the prefix has empty, '.' or '..' components")
    return bucket, prefix


# Bare HTTP statuses (no S3 error code in the body) that an S3 API never answers with; other
# bare ones (403 to a HEAD, 412 to a conditional write, 5xx from a proxy) can be S3's own.
NOT_S3_STATUSES = ("400", "404", "405", "501")


def error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def unavailable(url: str, bucket: str, endpoint: str, err: BaseException) -> StoreUnavailable:
    """One line naming the store and the cause."""
    code = error_code(err)
    name = type(err).__name__
    refused = True  # the store answered and said no, unless it did not answer (below)
    if code in ("NoSuchBucket",) or (code == "404" and "Bucket" in str(err)):
        why = f"bucket {bucket!r} does not exist{_CREATE_IT}"
    elif code in REFUSALS:
        why = (
            f"access denied ({code}): check the AWS credentials "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    elif name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    ):
        why = f"cannot reach the endpoint {endpoint} ({name})"
        refused = False
    elif name == "NoCredentialsError":
        why = "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    else:
        why = f"{name}: {code or without_secrets(str(err))}"
        refused = code in OTHER_REFUSALS
    error = StoreUnavailable(f"{url}: {why}")
    error.refused = refused
    return error


REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden")
# the store answered, and no retry of the same request helps
OTHER_REFUSALS = (
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
    "AllAccessDisabled",
    "RequestTimeTooSkewed",
)


def not_an_s3_api(url: str, endpoint: str, status: str) -> StoreUnavailable:
    """A request answered without an S3 error code: the endpoint is some other HTTP service
    (a SeaweedFS filer, master or volume port, a web server), not an S3 API."""
    error = StoreUnavailable(
        f"{url}: the endpoint {endpoint} answers HTTP {status} without an S3 error: "
        "it is not an S3 API (check AWS_ENDPOINT_URL)"
    )
    error.refused = True  # a setting to change, not an outage
    return error
