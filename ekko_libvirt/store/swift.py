"""OpenStack Swift store (python-swiftclient).

One project = one container; the container is created on the first put. Keys map 1:1 to object
names (check_key keeps them to [A-Za-z0-9._-] parts joined by '/').

Transport facts this relies on (measured, see shared notes/swift.md):
- swiftclient retries socket errors, 5xx, 408 and 429 with exponential backoff
  (`retries`, `starting_backoff`, `max_backoff`) and re-authenticates once on 401; other 4xx are
  final. A body passed as `bytes` is NOT retried after a 5xx, so puts pass a seekable file object.
  The first retry of an outage is told once, as a warning naming the URL (_Connection).
- Sending the MD5 as ETag makes Swift verify the body (422 on mismatch); the ETag it returns is
  the MD5 of what it stored, which put() checks too.
- A swiftclient Connection is not thread-safe: each thread gets its own (thread-local), so a
  caller's pool of `threads` workers can put concurrently.
- Container listings come in pages (at most 10,000 names by default): list() follows markers.
- With the proxy down requests raises ConnectionError, not ClientException; both (and socket
  errors) become StoreError. Messages never carry the key, secret or token.
- swiftclient logs every request that did not answer 2xx at INFO (the 404 of exists() too), and
  by default the first 16 characters of X-Auth-Token / X-Auth-Key: set to none below. The CLI
  shows swiftclient's lines only with -vv (cli/logs.py, setup_logging).

Secrets: `key` and `application_credential_secret` (SECRET_FIELDS). A config error about one
names the field, never its value; repr() leaves them out.
"""

import email.utils
import hashlib
import io
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, List, Mapping, Optional
from urllib.parse import urlsplit

import swiftclient.client
from requests.exceptions import RequestException
from swiftclient.client import Connection
from swiftclient.exceptions import ClientException

from ..errors import ConfigError, ObjectNotFound, StoreError
from . import ranged_listing
from .base import ObjectInfo, Store, check_key
from .uploader import PipelinedBatch

log = logging.getLogger(__name__)

# swiftclient's request log shows this many characters of a token or key (default 16): none.
swiftclient.client.logger_settings["reveal_sensitive_prefix"] = 0

_AUTH_VERSIONS = {"1": "1", "1.0": "1", "3": "3", "3.0": "3"}
_INTERFACES = {"public": "publicURL", "internal": "internalURL", "admin": "adminURL"}

SECRET_FIELDS = frozenset({"key", "application_credential_secret"})
# Field kinds, checked before anything else looks at a value (a YAML list, number or mapping in
# a string field must be a config error, never a TypeError or a header with the value in it).
_TEXT = ("auth_url", "container", "user", "key")
_OPTIONAL_TEXT = ("project_name", "project_id", "user_domain_name", "project_domain_name",
                  "application_credential_id", "application_credential_secret", "region_name", "interface",
                  "storage_url", "cacert")
_MAX_TEXT = 4096
# name -> (lowest, highest); an int field
_INTS = {"threads": (1, 64), "retries": (0, 20)}
# name -> highest; a number of seconds > 0
_SECONDS = {"starting_backoff": 3600.0, "max_backoff": 3600.0, "timeout": 3600.0}
_MAX_PAGE = 10000        # Swift's container_listing_limit: a bigger `limit` is refused (412)
# What one listing page of _MAX_PAGE names costs, in HEAD requests (measured on the test Swift,
# bench/swift_upload.py --listing: a page ~40 ms, a HEAD ~2 ms; rounded up for a loaded proxy).
_PAGE_COST_IN_HEADS = 25


def _type_name(v: Any) -> str:
    return {type(None): "nothing (null)", bool: "true/false", int: "a number", float: "a number",
            list: "a list", dict: "a mapping"}.get(type(v), f"a {type(v).__name__}")


def _check_url(name: str, url: Any) -> None:
    """http(s)://host[...], without user:password@ (which would end up in messages)."""
    try:
        parts = urlsplit(url)
        has_credentials = bool(parts.username or parts.password)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        has_credentials, ok = "@" in url, False
    if has_credentials:
        raise ConfigError(f"store.{name}", "must not carry credentials (user:password@host): give user and key")
    if not ok:
        raise ConfigError(f"store.{name}", f"must be an http(s) URL, not {url[:200]!r}")


@dataclass(frozen=True)
class SwiftConfig:
    """Where and how to reach Swift. Secrets are excluded from repr()."""

    auth_url: str
    container: str
    auth_version: str = "1"  # "1": tempauth/swauth (ST_*); "3": Keystone v3 (OS_*)
    user: str = ""
    key: str = field(default="", repr=False)
    # Keystone v3
    project_name: Optional[str] = None
    project_id: Optional[str] = None
    user_domain_name: Optional[str] = None
    project_domain_name: Optional[str] = None
    application_credential_id: Optional[str] = None
    application_credential_secret: Optional[str] = field(default=None, repr=False)
    region_name: Optional[str] = None
    interface: Optional[str] = None  # public | internal | admin (catalog endpoint to use)
    storage_url: Optional[str] = None  # overrides the storage URL the auth service returns
    # transport
    threads: int = 8  # how many concurrent puts callers should run (one connection per thread)
    retries: int = 5
    starting_backoff: float = 1.0
    max_backoff: float = 16.0
    timeout: float = 60.0  # seconds, per connect / per read
    insecure: bool = False
    cacert: Optional[str] = None
    listing_page_size: Optional[int] = None  # None: the server's page (10,000 by default)

    def __post_init__(self) -> None:
        def bad(name: str, problem: str) -> ConfigError:
            return ConfigError(f"store.{name}", problem)

        self._check_kinds()
        version = _version(self.auth_version)
        if version is None:
            raise bad("auth_version", f"must be 1 (tempauth) or 3 (keystone), not {str(self.auth_version)[:20]!r}")
        object.__setattr__(self, "auth_version", version)
        _check_url("auth_url", self.auth_url)
        if self.storage_url is not None:
            _check_url("storage_url", self.storage_url)
        c = self.container
        if not c or "/" in c or len(c.encode()) > 256:
            raise bad("container", f"must be 1-256 bytes without '/', not {c[:300]!r}")
        if version == "1":
            if not (self.user and self.key):
                raise bad("user" if not self.user else "key", "auth_version 1 needs user and key")
        elif self.application_credential_id or self.application_credential_secret:
            if not (self.application_credential_id and self.application_credential_secret):
                missing = "secret" if self.application_credential_id else "id"
                raise bad(f"application_credential_{missing}", "an application credential needs both the id and "
                                                              "the secret")
        else:
            if not (self.user and self.key):
                raise bad("user" if not self.user else "key",
                          "auth_version 3 needs user and key (or an application credential)")
            if not (self.project_name or self.project_id):
                raise bad("project_name", "auth_version 3 needs project_name or project_id")
        if self.interface is not None and self.interface not in _INTERFACES:
            raise bad("interface", f"must be one of {', '.join(_INTERFACES)}, not {self.interface[:40]!r}")

    def _check_kinds(self) -> None:
        """Every field of the type it must have. Messages about a secret name the field only."""
        for name in _TEXT + _OPTIONAL_TEXT:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL_TEXT:
                continue
            if not isinstance(v, str):
                hint = f' (quote it: {name}: "...")' if isinstance(v, (int, float)) else ""
                raise ConfigError(f"store.{name}", f"must be a string{hint}, not {_type_name(v)}")
            if len(v) > _MAX_TEXT:
                raise ConfigError(f"store.{name}", f"must be at most {_MAX_TEXT} characters, not {len(v)}")
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
                raise ConfigError(f"store.{name}", "must not contain control characters (newline, tab, ...)")
        v = self.auth_version
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError("store.auth_version", f"must be 1 (tempauth) or 3 (keystone), not {_type_name(v)}")
        for name, (lo, hi) in _INTS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"store.{name}", f"must be an integer from {lo} to {hi}, not {_type_name(v)}")
            if not lo <= v <= hi:
                raise ConfigError(f"store.{name}", f"must be an integer from {lo} to {hi}, not "
                                                   f"{v if abs(v) < 10**9 else 'a bigger one'}")
        for name, most in _SECONDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= most:
                raise ConfigError(f"store.{name}", f"must be a number of seconds above 0 and at most {most:g}")
        if not isinstance(self.insecure, bool):
            raise ConfigError("store.insecure", f"must be true or false, not {_type_name(self.insecure)}")
        p = self.listing_page_size
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= _MAX_PAGE):
            raise ConfigError("store.listing_page_size", f"must be an integer from 1 to {_MAX_PAGE}")

    @classmethod
    def from_mapping(cls, data: Mapping) -> "SwiftConfig":
        """From a config-file section (e.g. ekko.yaml `store:` without its `type`)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(str(k)[:80] for k in data if k not in known and k != "type")
        if extra:
            raise ConfigError(f"store.{extra[0]}", "unknown key for a swift store")
        for name in ("auth_url", "container"):
            if data.get(name) is None or data.get(name) == "":
                raise ConfigError(f"store.{name}", "missing")
        return cls(**{k: v for k, v in data.items() if k != "type"})

    @classmethod
    def from_env(cls, container: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                 **overrides) -> "SwiftConfig":
        """From the variables the `swift` CLI reads: ST_AUTH/ST_USER/ST_KEY (v1) or OS_* (v3).

        The container comes from the argument, else EKKO_SWIFT_CONTAINER. Keyword overrides win.
        """
        env = os.environ if environ is None else environ
        values = dict(env_values(env, overrides), **overrides)
        values["container"] = container or env.get("EKKO_SWIFT_CONTAINER")
        if not values.get("auth_url"):
            raise ConfigError("store.auth_url", "set ST_AUTH (tempauth) or OS_AUTH_URL (keystone)")
        if not values["container"]:
            raise ConfigError("store.container", "pass a container or set EKKO_SWIFT_CONTAINER")
        return cls(**values)

    def with_container(self, container: str) -> "SwiftConfig":
        return replace(self, container=container)

    def retry_seconds(self) -> float:
        """How long swiftclient waits between its tries of one request, in total."""
        return sum(min(self.starting_backoff * 2 ** i, self.max_backoff) for i in range(self.retries))


def _version(v: Any) -> Optional[str]:
    """"1" or "3" for the ways to write them (1, "1.0", 3, 3.0, ...); None for anything else."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None
    return _AUTH_VERSIONS.get(str(v))


def _url_version(url: Any) -> str:
    """The auth version a URL given without one goes with: 3 for a Keystone '.../v3', else 1."""
    try:
        return "3" if urlsplit(url).path.rstrip("/").endswith("/v3") else "1"
    except (TypeError, ValueError, AttributeError):
        return "1"          # not a URL: SwiftConfig says so


def env_values(env: Mapping[str, str], given: Mapping = {}) -> dict:   # noqa: B006 (read only)
    """The SwiftConfig fields the environment supplies for those `given` (the config file's
    `store:` section) leaves out. The precedence, as README "Configuration" states it:

    - a key of the file always wins; the environment only fills in what the file leaves out;
    - the auth URL and its version travel together: the file's auth_url goes with the file's
      auth_version, else 3 for a URL ending in /v3 and 1 for any other. Without one in the file:
      ST_AUTH with ST_AUTH_VERSION (default 1), else OS_AUTH_URL with OS_AUTH_VERSION /
      OS_IDENTITY_API_VERSION (default 3);
    - user and key: for version 1 ST_USER / ST_KEY, else OS_USERNAME / OS_PASSWORD; for
      version 3 the other way round. Not taken when the file gives an application credential;
    - an application credential (OS_APPLICATION_CREDENTIAL_ID/_SECRET, version 3) is not taken
      when the file gives a user or key;
    - the other Keystone settings from OS_* (project, domains, region, interface, ...).
    """

    def get(*names: str) -> Optional[str]:
        return next((env[n] for n in names if env.get(n)), None)

    out: dict = {}
    if "auth_url" in given:
        version = given.get("auth_version") or _url_version(given["auth_url"])
    elif get("ST_AUTH"):
        out["auth_url"] = get("ST_AUTH")
        version = given.get("auth_version") or get("ST_AUTH_VERSION") or "1"
    elif get("OS_AUTH_URL"):
        out["auth_url"] = get("OS_AUTH_URL")
        version = given.get("auth_version") or get("OS_AUTH_VERSION", "OS_IDENTITY_API_VERSION") or "3"
    else:
        version = given.get("auth_version") or "1"
    if "auth_version" not in given:
        out["auth_version"] = version
    v3 = _version(version) == "3"
    file_app = any(given.get(k) for k in ("application_credential_id", "application_credential_secret"))
    file_user = any(given.get(k) for k in ("user", "key"))
    if not file_app:
        out["user"] = get("OS_USERNAME", "ST_USER") if v3 else get("ST_USER", "OS_USERNAME")
        out["key"] = get("OS_PASSWORD", "ST_KEY") if v3 else get("ST_KEY", "OS_PASSWORD")
    if v3 and not file_user:
        out["application_credential_id"] = get("OS_APPLICATION_CREDENTIAL_ID")
        out["application_credential_secret"] = get("OS_APPLICATION_CREDENTIAL_SECRET")
    out.update(
        project_name=get("OS_PROJECT_NAME", "OS_TENANT_NAME"),
        project_id=get("OS_PROJECT_ID", "OS_TENANT_ID"),
        user_domain_name=get("OS_USER_DOMAIN_NAME"),
        project_domain_name=get("OS_PROJECT_DOMAIN_NAME"),
        region_name=get("OS_REGION_NAME"),
        interface=get("OS_INTERFACE", "OS_ENDPOINT_TYPE"),
        storage_url=get("OS_STORAGE_URL"),
        cacert=get("OS_CACERT"),
        insecure=(get("SWIFTCLIENT_INSECURE") or "").lower() in ("1", "true", "yes") or None,
    )
    if out["interface"] and out["interface"].endswith("URL"):  # publicURL -> public
        out["interface"] = out["interface"][:-3]
    return {k: v for k, v in out.items() if v is not None and k not in given}


def _network_reason(e: BaseException) -> str:
    """The useful end of a requests/urllib3 error chain, e.g.
    "Failed to establish a new connection: [Errno 111] Connection refused"."""
    inner = e.args[0] if isinstance(e, RequestException) and e.args else e
    inner = getattr(inner, "reason", None) or inner  # urllib3 MaxRetryError -> its cause
    text = " ".join(str(inner).split())
    if text.startswith("<") and ">: " in text:  # "<urllib3...Connection object at 0x..>: ..."
        text = text.split(">: ", 1)[1]
    if len(text) > 300:
        text = text[:300] + "..."
    return text


class _Connection(Connection):
    """A swiftclient Connection that reports each try of a request to `on_try(conn, error)`:
    `error` is what failed the try before (None on the first); `on_success(conn)` after a
    request went through. swiftclient retries inside Connection._retry and says nothing: a
    command pointed at an unreachable store would sit silent for half a minute."""

    def __init__(self, *args, on_try, on_success, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_try, self._on_success = on_try, on_success
        self._failed: Optional[BaseException] = None

    def _tried(self, call, *args, **kwargs):
        self._on_try(self, self._failed if self.attempts > 1 else None)
        try:
            return call(*args, **kwargs)
        except BaseException as e:
            self._failed = e
            raise

    def get_auth(self):
        # Called at the start of a try while there is no token (so also while the auth
        # service does not answer).
        return self._tried(super().get_auth)

    def _retry(self, reset_func, func, *args, **kwargs):
        def attempt(*a, **kw):
            rv = self._tried(func, *a, **kw)
            self._failed = None
            self._on_success(self)
            return rv
        return super()._retry(reset_func, attempt, *args, **kwargs)


class SwiftStore(Store):
    def __init__(self, config: SwiftConfig):
        self.config = config
        self.container = config.container
        self._local = threading.local()
        self._conns: "weakref.WeakSet[Connection]" = weakref.WeakSet()
        self._lock = threading.Lock()  # guards _conns
        self._container_lock = threading.Lock()
        self._container_ready = False
        self._secrets = tuple(
            s for s in (config.key, config.application_credential_secret) if s
        )
        self._retry_told = False  # an outage's first retry was told; cleared when a request succeeds

    # ---- connections --------------------------------------------------------------------
    def _conn(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection()
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _new_connection(self) -> Connection:
        c = self.config
        os_options = {
            k: v
            for k, v in dict(
                project_name=c.project_name,
                project_id=c.project_id,
                user_domain_name=c.user_domain_name,
                project_domain_name=c.project_domain_name,
                region_name=c.region_name,
                endpoint_type=_INTERFACES.get(c.interface or ""),
                object_storage_url=c.storage_url,
            ).items()
            if v
        }
        user, key = c.user, c.key
        if c.application_credential_id and c.application_credential_secret:    # both or neither (__post_init__)
            os_options.update(
                auth_type="v3applicationcredential",
                application_credential_id=c.application_credential_id,
                application_credential_secret=c.application_credential_secret,
            )
            # swiftclient re-authenticates on 401 only when user and key are set
            user, key = c.application_credential_id, c.application_credential_secret
        return _Connection(
            authurl=c.auth_url, user=user, key=key, auth_version=c.auth_version,
            os_options=os_options, retries=c.retries, starting_backoff=c.starting_backoff,
            max_backoff=c.max_backoff, timeout=c.timeout, insecure=c.insecure, cacert=c.cacert,
            on_try=self._on_try, on_success=self._on_success,
        )

    def _on_try(self, conn: Connection, failed: Optional[BaseException]) -> None:
        """Say once per outage, on its first retry, what is retried and where (a 401 is a token
        expiring: re-authenticating is not an outage)."""
        if failed is None or (isinstance(failed, ClientException) and failed.http_status == 401):
            return
        with self._lock:
            if self._retry_told:
                return
            self._retry_told = True
        c = self.config
        if isinstance(failed, ClientException):
            what = f"answered {failed.http_status} {failed.http_reason}".strip()
        else:
            what = f"is unreachable ({_network_reason(failed)})"
        wait = c.retry_seconds()
        log.warning("%s", self._scrub(
            f"swift {conn.url or c.storage_url or c.auth_url} {what}: retrying, up to {c.retries} times "
            f"in about {wait:.0f} s" + ("" if wait >= 10 else f" ({wait:.1f} s)")))

    def _on_success(self, conn: Connection) -> None:
        self._retry_told = False

    def close(self) -> None:
        """Close every thread's HTTP connection (they reopen on next use)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    # ---- errors -------------------------------------------------------------------------
    def _where(self) -> str:
        """The storage URL once known (any thread authenticated), else the auth URL."""
        conn = getattr(self._local, "conn", None)
        url = conn.url if conn is not None else None
        if not url:
            with self._lock:
                url = next((c.url for c in self._conns if c.url), None)
        return self._scrub(url or self.config.storage_url or self.config.auth_url)

    def _scrub(self, text: str) -> str:
        """The text without the key, the secret or any connection's token, also where a message
        quotes them escaped (repr)."""
        with self._lock:
            tokens = tuple(c.token for c in self._conns if isinstance(getattr(c, "token", None), str) and c.token)
        for s in self._secrets + tokens:
            for form in {s, repr(s)[1:-1]}:
                text = text.replace(form, "***")
        return text

    def _error(self, op: str, key: Optional[str], e: BaseException) -> StoreError:
        what = f"{self.container}/{key}" if key else f"container {self.container}"
        where = f"swift {self._where()}"
        tries = self.config.retries
        if isinstance(e, ClientException):
            status = e.http_status
            txn = f", transaction {e.transaction_id}" if e.transaction_id else ""
            if status == 401:
                detail = "authentication failed (401): check user, key and project"
            elif status == 403:
                detail = "access denied (403): these credentials have no rights on this container"
            elif status == 422:
                detail = "Swift refused the body (422): it did not match its MD5, corrupted in transit"
            elif status == 507:
                detail = "insufficient storage (507) on the Swift storage node"
            elif status is not None and (status >= 500 or status in (408, 429, 498)):
                detail = f"{status} {e.http_reason} still after {tries} retries"
            elif status is not None:
                detail = f"{status} {e.http_reason}"
            else:  # auth-time failures without an HTTP status (keystone missing, bad options)
                detail = " ".join(str(e.msg).split())
            msg = f"cannot {op} {what} at {where}: {detail}{txn}"
        elif isinstance(e, (RequestException, OSError)):
            reason = _network_reason(e)
            msg = (
                f"cannot {op} {what}: {where} unreachable after {tries} retries "
                f"({type(e).__name__}: {reason})"
            )
        else:
            msg = f"cannot {op} {what} at {where}: {type(e).__name__}: {e}"
        return StoreError(self._scrub(msg))

    # ---- contract -----------------------------------------------------------------------
    def _ensure_container(self, force: bool = False) -> None:
        if self._container_ready and not force:
            return
        with self._container_lock:
            if self._container_ready and not force:
                return
            try:
                self._conn().put_container(self.container)
            except (ClientException, RequestException, OSError) as e:
                raise self._error("create", None, e) from e
            self._container_ready = True

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        self._ensure_container()
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        for attempt in (1, 2):
            try:
                # A seekable body: swiftclient rewinds and re-sends it after a 5xx or a dropped
                # connection (plain bytes are never retried). Handing http.client 1 MiB blocks
                # instead of its 8 KiB saved ~10% client CPU but no wall time here: not done.
                etag = self._conn().put_object(
                    self.container, key, io.BytesIO(data), content_length=len(data), etag=md5,
                    content_type="application/octet-stream",
                )
                break
            except ClientException as e:
                if e.http_status == 404 and attempt == 1:  # container deleted behind our back
                    self._ensure_container(force=True)
                    continue
                raise self._error("put", key, e) from e
            except (RequestException, OSError) as e:
                raise self._error("put", key, e) from e
        if (etag or "").strip('"') != md5:
            raise StoreError(
                f"cannot put {self.container}/{key} at swift {self._where()}: stored ETag "
                f"{etag!r} is not the MD5 {md5} of the {len(data)} bytes sent"
            )

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            headers, body = self._conn().get_object(self.container, key)
        except ClientException as e:
            if e.http_status == 404:
                raise ObjectNotFound(key) from None
            raise self._error("get", key, e) from e
        except (RequestException, OSError) as e:
            raise self._error("get", key, e) from e
        expected = headers.get("content-length")
        if expected is not None and int(expected) != len(body):
            raise StoreError(
                f"cannot get {self.container}/{key} at swift {self._where()}: "
                f"got {len(body)} of {expected} bytes"
            )
        return body

    def batch(self) -> PipelinedBatch:
        """Puts on `threads` uploader threads (store/uploader.py): a backup's workers go on
        with the next segment while its PUT travels."""
        return PipelinedBatch(self.put, self.config.threads, name="ekko-swift-put")

    def prefers_listing(self, checks: int) -> bool:
        """A listing of the container's objects in pages against one HEAD per check (the
        container's object count is one HEAD; an unknown count lists: the checks are many)."""
        if checks <= _PAGE_COST_IN_HEADS:
            return False
        try:
            headers = self._conn().head_container(self.container)
            count = int(headers.get("x-container-object-count", "0"))
        except ClientException as e:
            if e.http_status == 404:        # no container: nothing exists, a listing is one request
                return True
            raise self._error("check", None, e) from e
        except (RequestException, OSError) as e:
            raise self._error("check", None, e) from e
        except ValueError:
            return True
        page = self.config.listing_page_size or _MAX_PAGE
        return checks > math.ceil(count / page) * _PAGE_COST_IN_HEADS

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self._conn().head_object(self.container, key)
            return True
        except ClientException as e:
            if e.http_status == 404:
                return False
            raise self._error("check", key, e) from e
        except (RequestException, OSError) as e:
            raise self._error("check", key, e) from e

    def list(self, prefix: str = "") -> Iterator[str]:
        """All names starting with prefix, page by page (each page its own retried request)."""
        return self._list_range(prefix, None, None)

    def _list_range(self, prefix: str, marker: Optional[str], end_marker: Optional[str]) -> Iterator[str]:
        """The names under prefix after marker and before end_marker (None: unbounded)."""
        while True:
            try:
                _, page = self._conn().get_container(
                    self.container, marker=marker or None, end_marker=end_marker, prefix=prefix or None,
                    limit=self.config.listing_page_size,
                )
            except ClientException as e:
                if e.http_status == 404:  # no container yet: nothing was ever put
                    return
                raise self._error("list", f"{prefix}*", e) from e
            except (RequestException, OSError) as e:
                raise self._error("list", f"{prefix}*", e) from e
            if not page:
                return
            for item in page:
                yield item["name"]
            marker = page[-1]["name"]

    def list_sorted(self, prefix: str = "") -> Iterator[str]:
        """Swift lists a container in name order (UTF-8 bytes; keys are ASCII). The segments of
        a big container are listed as key ranges by `threads` connections at once, in order
        (store/ranged_listing.py): the listing of 10^7 names is otherwise 1,000 round trips in a row."""
        workers = min(self.config.threads, ranged_listing.MAX_WORKERS)
        if prefix != ranged_listing.SEGMENTS or workers <= 1:
            yield from self.list(prefix)
            return
        page = self.config.listing_page_size or _MAX_PAGE
        parts = ranged_listing.ranges(ranged_listing.range_count(self._object_count(), page, workers))

        def fetch(part: ranged_listing.Range) -> List[str]:
            return list(self._list_range(prefix, *part))
        yield from ranged_listing.in_order(fetch, parts, workers)

    def _object_count(self) -> int:
        """The container's object count (0 when there is no container or the header is unusable)."""
        try:
            headers = self._conn().head_container(self.container)
            return int(headers.get("x-container-object-count", "0"))
        except ClientException as e:
            if e.http_status == 404:
                return 0
            raise self._error("list", None, e) from e
        except (RequestException, OSError) as e:
            raise self._error("list", None, e) from e
        except ValueError:
            return 0

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self._conn().delete_object(self.container, key)
        except ClientException as e:
            if e.http_status != 404:
                raise self._error("delete", key, e) from e
        except (RequestException, OSError) as e:
            raise self._error("delete", key, e) from e

    def stat(self, key: str) -> ObjectInfo:
        """HEAD: X-Timestamp (Unix seconds, sub-second) when the proxy sends it, else
        Last-Modified (1 s resolution). Both are the time of the last PUT or POST."""
        check_key(key)
        try:
            headers = self._conn().head_object(self.container, key)
        except ClientException as e:
            if e.http_status == 404:
                raise ObjectNotFound(key) from None
            raise self._error("stat", key, e) from e
        except (RequestException, OSError) as e:
            raise self._error("stat", key, e) from e
        try:
            if headers.get("x-timestamp"):
                mtime = float(headers["x-timestamp"])
            else:
                mtime = email.utils.parsedate_to_datetime(headers["last-modified"]).timestamp()
            return ObjectInfo(key, int(headers.get("content-length") or 0), mtime)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"cannot stat {self.container}/{key} at swift {self._where()}: "
                             f"no usable X-Timestamp or Last-Modified header") from e

    def describe(self) -> str:
        return f"swift {self._where()} container {self.container}"


# ---- config file -> store (ekko.yaml `store: {type: swift, ...}`, see store/factory.py) ----------

DEFAULT_CONTAINER_PREFIX = "ekko"


def _base_container(options: Mapping) -> str:
    given = [k for k in ("container", "container_prefix") if options.get(k) is not None]
    if len(given) == 2:
        raise ConfigError("store.container", "give container or container_prefix, not both")
    if not given:
        return DEFAULT_CONTAINER_PREFIX
    base = options[given[0]]
    if not isinstance(base, str) or not base or "/" in base or len(base.encode()) > 128 \
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in base):
        raise ConfigError(f"store.{given[0]}", "must be a name of 1-128 bytes without '/' or control characters")
    return base


def container_for(options: Mapping, namespace: Optional[str] = None) -> str:
    """The default namespace uses the base name ("ekko"); project P uses "ekko-P"."""
    base = _base_container(options)
    return base if namespace is None else f"{base}-{namespace}"


def swift_config(options: Mapping, namespace: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None) -> SwiftConfig:
    """SwiftConfig from the `store:` section; the keys it leaves out come from the environment
    (ST_* or OS_*, as for the `swift` CLI): precedence in env_values()."""
    opts = {k: v for k, v in options.items() if k not in ("type", "container", "container_prefix")}
    env = os.environ if environ is None else environ
    merged = env_values(env, opts)
    merged.update(opts)
    merged["container"] = container_for(options, namespace)
    return SwiftConfig.from_mapping(merged)


def open_swift_store(options: Mapping, namespace: Optional[str] = None) -> SwiftStore:
    return SwiftStore(swift_config(options, namespace))


def list_namespaces(options: Mapping) -> List[str]:
    """Project namespaces that have a container in the account: names after "<base>-"."""
    store = SwiftStore(swift_config(options))
    prefix = store.container + "-"
    found: List[str] = []
    marker = None
    try:
        while True:
            try:
                _, page = store._conn().get_account(prefix=prefix, marker=marker)
            except (ClientException, RequestException, OSError) as e:
                raise store._error("list containers", None, e) from e
            if not page:
                break
            found += [c["name"][len(prefix):] for c in page if len(c["name"]) > len(prefix)]
            marker = page[-1]["name"]
    finally:
        store.close()
    return sorted(found)
