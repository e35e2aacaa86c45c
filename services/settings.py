"""
Settings read from the environment, in one place.

Notable:
- Read at call time, never cached at import: tests and Ray workers set the variables after import.
- S3 settings come from the usual AWS variables, so the same environment works for boto3, pyarrow and
  the aws CLI; a service-specific endpoint (AWS_ENDPOINT_URL_S3) wins over the global one.
- Unset credentials stay None so that the SDK's own chain (profiles, IRSA on Kubernetes, instance
  metadata) still applies.
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REGION = "us-east-1"


def _env(name: str) -> str | None:
    # an exported-but-empty variable means "not set" (a common result of templated manifests)
    value = os.environ.get(name, "").strip()
    return value or None


def default_storage_uri() -> str:
    """Where runs, data and checkpoints live unless --storage says otherwise."""
    return _env("NANOCHAT_STORAGE") or str(Path("~/.cache/nanochat").expanduser())


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None  # None: AWS itself; otherwise e.g. http://minio:9000 or a moto server
    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None  # temporary (STS) credentials carry one
    region: str


def s3_settings() -> S3Settings:
    return S3Settings(
        endpoint_url=_env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL"),
        access_key_id=_env("AWS_ACCESS_KEY_ID"),
        secret_access_key=_env("AWS_SECRET_ACCESS_KEY"),
        session_token=_env("AWS_SESSION_TOKEN"),
        region=_env("AWS_REGION") or _env("AWS_DEFAULT_REGION") or DEFAULT_REGION,
    )
