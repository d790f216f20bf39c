"""The tests' S3-compatible server (reframe/locals3.py: moto_server over real HTTP) and an
independent reader of its bucket (boto3, not the code under test)."""

from __future__ import annotations

from typing import Any

import boto3

from reframe.locals3 import ACCESS_KEY_ID, BUCKET, SECRET_ACCESS_KEY, S3Server

__all__ = ["BUCKET", "S3Server", "bucket_objects"]


def bucket_objects(server: S3Server) -> dict[str, bytes]:
    """Every object in the bucket: key -> bytes, read with boto3."""
    s3: Any = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name="us-east-1",
    )
    listing = s3.list_objects_v2(Bucket=BUCKET)
    return {
        o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in listing.get("Contents", [])
    }
