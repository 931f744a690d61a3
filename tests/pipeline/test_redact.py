"""URLs in messages lose their user info, wherever they appear in the text."""

import pytest

from pipeline.redact import without_credentials


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:secret@minio:9000", "http://minio:9000"),
        ("https://user:secret@host/v1/chat?x=1", "https://host/v1/chat?x=1"),
        ("http://user:p@ss@host:9000/bucket", "http://host:9000/bucket"),  # unescaped '@' in the password
        ("http://token@host", "http://host"),
        (
            'Could not connect to the endpoint URL: "http://u:s@127.0.0.1:9/b/k" (retried; see http://u2:s2@x/y)',
            'Could not connect to the endpoint URL: "http://127.0.0.1:9/b/k" (retried; see http://x/y)',
        ),
        ("http://host:9000/a@b", "http://host:9000/a@b"),  # '@' in the path is not user info
        ("s3://bucket/key and mail me@example.com", "s3://bucket/key and mail me@example.com"),
        ("AWS S3 (us-east-1)", "AWS S3 (us-east-1)"),
    ],
)
def test_user_info_is_stripped_from_every_url(text, expected):
    assert without_credentials(text) == expected
