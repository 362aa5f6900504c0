"""Ray options checked before anything is loaded: `--workers N` / `--ray ADDRESS`.

A count, Ray installed, a cluster address that answers, and a token where the cluster
asks for one, each said in one line at once (Ray itself waits minutes on an address
nobody listens on, and its C++ client aborts the process on a missing token). Nothing
here imports Ray at module level.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from vislens.errors import VislensError

INSTALL = "pip install 'vislens[ray]'"
CONNECT_TIMEOUT_S = 5.0


def check(workers: int, address: str | None) -> None:
    """--workers / --ray, checked before anything is loaded: a count, Ray installed, a
    cluster that answers (Ray itself waits minutes on an address nobody listens on) and
    takes this process's token where it asks for one."""
    if workers < 0:
        raise VislensError(f"--workers must be 0 (this process only) or more (got {workers})")
    if not workers and not address:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise VislensError(f"--workers / --ray need Ray: {INSTALL}") from None
    if address:
        _reachable(address)
        _token_at_hand(address)
        if address != "auto" and "://" not in address:
            _authenticated(address)


def _reachable(address: str) -> None:
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise VislensError(f"--ray {address!r} is no cluster address; give HOST:PORT (the head "
                           "node's GCS port, 6379 by default), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise VislensError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}"
                           "); start one with `ray start --head` or check the address") from None


# ---- token authentication (Ray >= 2.59) ---------------------------------------------------------
# A cluster started with `ray start --head` where a token exists (~/.ray/auth_token, which any
# local `ray.init()` writes, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) takes only callers that
# present it; Ray sends it to an explicit address only when RAY_AUTH_MODE=token is set (for
# `auto` it sends the local token by itself). The token itself is never read or printed here.
WHERE_TOKEN = ("RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
               "(the head's ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")


def token_source() -> str | None:
    """Where Ray reads this process's token from, in Ray's order (the variable or file's name,
    never the token); None where there is none. A RAY_AUTH_TOKEN_PATH naming a missing or empty
    file is none: Ray does not fall back to ~/.ray/auth_token then."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return f"RAY_AUTH_TOKEN_PATH ({path})" if _holds_text(path) else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if _holds_text(default) else None


def _holds_text(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def _token_mode() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


def _token_at_hand(address: str) -> None:
    """RAY_AUTH_MODE=token and no token: Ray fails on it (the C++ client aborts the process)."""
    if _token_mode() and token_source() is None:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        where = (f"RAY_AUTH_TOKEN_PATH names {path}, which is missing or empty" if path else
                 "no token is set here")
        raise VislensError(f"--ray {address}: RAY_AUTH_MODE=token but {where}; give the "
                           f"cluster's token in {WHERE_TOKEN}")


def auth_refused(address: str) -> VislensError:
    if not _token_mode():
        return VislensError(
            f"--ray {address}: the cluster asks for its token (Ray token authentication) and "
            f"none was sent: set RAY_AUTH_MODE=token, with the token in {WHERE_TOKEN}")
    return VislensError(
        f"--ray {address}: the cluster refused the token from {token_source()}; give the "
        f"cluster's own token in {WHERE_TOKEN}")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Ray's C++ client logs each refused connection on file descriptor 2; the error raised
    after it says the same in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _authenticated(address: str) -> None:
    """Ask the cluster's GCS who it is, as ray.init would: a cluster that refuses this
    process's token (or its lack of one) is said so at once, instead of after the 20 retries
    of ray.init."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray than the one pyproject declares: ray.init will tell
        return
    try:
        with _quiet_stderr():
            GcsClient(address=address)
    except AuthenticationError:
        raise auth_refused(address) from None
    except Exception:  # noqa: BLE001 - anything else is ray.init's to report
        return


def refused_for_auth(err: BaseException) -> bool:
    """A ray.init error whose cause, however deep, is a refused (or missing) token."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "AuthenticationError":
            return True
        text = str(err).lower()
        if "invalidauthtoken" in text or "unauthenticated" in text:
            return True
        err = err.__cause__ or err.__context__
    return False
