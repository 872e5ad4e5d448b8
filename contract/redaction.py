"""Finding and hiding the passwords in a URL, in every form they are written: `user:pass@host` (also with an
unencoded `@`, `/` or `?` in the password), and query parameters (`?password=...`, `&sslpassword=...`).

Plain string work on purpose, not a URL parser: a parser that reads `bob:p@ss@host` as the password `p` on the
host `ss@host` hides only `p`. Everything before the last `@` of the authority is the user part, and everything
in it after the first `:` is the password. Torch- and SQLAlchemy-free: every part imports it.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

HIDDEN = "***"

SECRET_PARAMETERS = frozenset({
    "password", "passwd", "pass", "pwd", "sslpassword", "secret", "token", "access_token", "api_key", "apikey",
})
"""Query parameters whose value is a secret (lower case): libpq's password and sslpassword, redis-py's password, ..."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_PARAMETER = re.compile(r"([?&;])([^=&;#?]*)=([^&;#]*)")


def _user_part(url: str) -> tuple[int, int] | None:
    """(start, end) of the user part of a URL (what comes before the `@` of the authority), or None."""
    found = _SCHEME.match(url)
    if found is None:
        return None
    start = found.end()
    query = url.find("?", start)
    at = url.rfind("@", start, query if query >= 0 else len(url))
    if at < 0:  # a `?` inside the password, unless what precedes the `@` is a query (`?x=a@b`)
        at = url.rfind("@", start)
        if "=" in url[start:max(at, start)]:
            at = -1
    return (start, at) if at >= 0 else None


def _password_span(url: str) -> tuple[int, int] | None:
    user = _user_part(url)
    if user is None:
        return None
    start, end = user
    colon = url.find(":", start, end)
    return (colon + 1, end) if colon >= 0 else None


def url_passwords(url: str) -> list[str]:
    """Every secret a URL holds, as written (the user part's password, secret query parameters' values)."""
    found: list[str] = []
    span = _password_span(url)
    if span is not None and span[1] > span[0]:
        found.append(url[span[0]:span[1]])
    base = span[1] if span is not None else 0
    for match in _PARAMETER.finditer(url, base):
        if unquote(match.group(2)).strip().lower() in SECRET_PARAMETERS and match.group(3):
            found.append(match.group(3))
    return found


def redact(url: str) -> str:
    """The URL with every password in it replaced by ***, for logs and output."""
    span = _password_span(url)
    if span is not None and span[1] > span[0]:
        url = url[:span[0]] + HIDDEN + url[span[1]:]
    base = _user_part(url)

    def _hide(match: re.Match[str]) -> str:
        if unquote(match.group(2)).strip().lower() in SECRET_PARAMETERS:
            return f"{match.group(1)}{match.group(2)}={HIDDEN}"
        return match.group(0)

    start = base[1] if base is not None else 0
    return url[:start] + _PARAMETER.sub(_hide, url[start:])


def url_secrets(*urls: str | None) -> list[str]:
    """The passwords in these URLs, raw and URL-decoded, longest first (for scrubbing them out of any text)."""
    found: list[str] = []
    for url in urls:
        for password in url_passwords(url or ""):
            for written in (password, unquote(password)):
                # a driver that splits the user part at its first `@` names the rest as the host
                pieces = written.split("@")
                found += [written, *("@".join(pieces[i:]) for i in range(1, len(pieces)))]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def hide_secrets(text: str, *urls: str | None) -> str:
    """The text (an error a driver raised, say) with the passwords of these URLs, and their pieces, replaced by ***."""
    for secret in url_secrets(*urls):
        text = text.replace(secret, HIDDEN)
    return text
