"""The AWS variables and a fresh bucket for a real moto S3 server (the `s3_server` fixture of tests/conftest.py)."""

import uuid

import pytest


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point the usual AWS variables at endpoint with moto's test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)  # a developer's own AWS set-up must not leak in


def create_bucket(endpoint: str) -> str:
    import boto3

    name = f"nanochat-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name
