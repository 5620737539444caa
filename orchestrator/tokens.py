"""Bearer tokens: made here, shown once, stored only as a hash, compared in constant time.

A token is 32 random bytes (256 bits) from the operating system's CSPRNG, URL-safe base64,
behind a short prefix that says what it is for, so a token pasted in the wrong place is
recognisable: `orch_u_` a user's API token (team server), `orch_l_` the local server's token
(`$ORCH_HOME/api_token`), `orch_w_` a worker's attempt token. With that much entropy a plain SHA-256 is
the right hash (a slow password hash protects low-entropy secrets; these are not): lookups
by hash stay one indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

USER_PREFIX = "orch_u_"
LOCAL_PREFIX = "orch_l_"
WORKER_PREFIX = "orch_w_"


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Hex SHA-256 of the token: what the database keeps."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(given: str, expected: str) -> bool:
    """Constant-time comparison (no early exit that leaks how much of a guess was right)."""
    return hmac.compare_digest(given.encode(), expected.encode())
