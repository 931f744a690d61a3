"""Credentials out of messages: every URL loses its ``user:password@`` before an error or a log line quotes it.

Endpoints for S3-compatible stores and OpenAI-compatible servers may carry credentials in the URL
(``http://user:secret@host:9000``), and client libraries quote the URL they failed to reach; messages end up
in step failures, sensor skip reasons and the UI.
"""

from __future__ import annotations

import re

# scheme://userinfo@ : the userinfo runs to the last '@' before the host's end ('/', '?', '#', whitespace or a
# quote), so a password with an unescaped '@' is removed whole.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s'\"<>]*@")


def without_credentials(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) with the user info of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)
