"""Log output of a command, on stderr: the level from -v, the libraries that speak only at -vv,
and the filter that keeps every token and key out of it."""

import logging
import os
import re
import sys
from typing import Optional, Set

from ..config import Config


class _Redact(logging.Filter):
    """Last line of defence on the log output: no token or key gets through, at any -v. Values
    of token and key headers (swiftclient, keystoneauth: 'X-Auth-Token: ...', "'x-auth-token':
    '...'"), tempauth tokens wherever they appear, and the configured secrets themselves."""

    _HEADER = re.compile(r"(?i)(x-(?:auth|storage|service|subject)-token|x-auth-key|x-storage-pass)"
                         r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+")
    _TEMPAUTH = re.compile(r"AUTH_tk[0-9a-f]+")

    def __init__(self) -> None:
        super().__init__()
        self.secrets: Set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:       # a malformed record: logging reports it itself
            return True
        clean = self._TEMPAUTH.sub("AUTH_tk***", self._HEADER.sub(r"\1\2***", text))
        for secret in self.secrets:
            clean = clean.replace(secret, "***")
        if clean != text:
            record.msg, record.args = clean, None
        return True


REDACT = _Redact()
# Libraries whose own log lines show only with -vv: swiftclient logs every request that did not
# answer 2xx at INFO, the 404 that is exists()'s normal "no" too.
_CHATTY = ("swiftclient", "keystoneauth", "keystoneclient", "urllib3", "requests")


def setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), stream=sys.stderr,
                        format="ekko: %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if REDACT not in handler.filters:
            handler.addFilter(REDACT)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def secrets_of(cfg: Config) -> Set[str]:
    """The configured credentials of a Swift store (file and environment), for REDACT; short ones
    would blank out ordinary words and are left to the store's own scrubbing."""
    # Imported here, for Swift stores only: store.swift loads swiftclient and requests (~0.2 s).
    from ..store.swift import SECRET_FIELDS
    found: Set[Optional[str]] = {v for k, v in cfg.store.options if k in SECRET_FIELDS and isinstance(v, str)}
    found |= {os.environ.get(n) for n in ("ST_KEY", "OS_PASSWORD", "OS_APPLICATION_CREDENTIAL_SECRET")}
    return {v for v in found if v and len(v) >= 4}
