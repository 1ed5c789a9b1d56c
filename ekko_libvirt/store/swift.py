"""OpenStack Swift store (python-swiftclient).

One project = one container; the container is created on the first put. Keys map 1:1 to object
names (check_key keeps them to [A-Za-z0-9._-] parts joined by '/').

Transport facts this relies on (measured, see shared notes/swift.md):
- swiftclient retries socket errors, 5xx, 408 and 429 with exponential backoff
  (`retries`, `starting_backoff`, `max_backoff`) and re-authenticates once on 401; other 4xx are
  final. A body passed as `bytes` is NOT retried after a 5xx, so puts pass a seekable file object.
- Sending the MD5 as ETag makes Swift verify the body (422 on mismatch); the ETag it returns is
  the MD5 of what it stored, which put() checks too.
- A swiftclient Connection is not thread-safe: each thread gets its own (thread-local), so a
  caller's pool of `threads` workers can put concurrently.
- Container listings come in pages (at most 10,000 names by default): list() follows markers.
- With the proxy down requests raises ConnectionError, not ClientException; both (and socket
  errors) become StoreError. Messages never carry the key, secret or token.
"""

import email.utils
import hashlib
import io
import os
import threading
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Mapping, Optional
from urllib.parse import urlsplit

from requests.exceptions import RequestException
from swiftclient.client import Connection
from swiftclient.exceptions import ClientException

from ..errors import ConfigError, ObjectNotFound, StoreError
from .base import ObjectInfo, check_key

_AUTH_VERSIONS = {"1": "1", "1.0": "1", "3": "3", "3.0": "3"}
_INTERFACES = {"public": "publicURL", "internal": "internalURL", "admin": "adminURL"}


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

        version = _AUTH_VERSIONS.get(str(self.auth_version))
        if version is None:
            raise bad("auth_version", f"must be 1 (tempauth) or 3 (keystone), not {self.auth_version!r}")
        object.__setattr__(self, "auth_version", version)
        parts = urlsplit(self.auth_url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise bad("auth_url", f"must be an http(s) URL, not {self.auth_url!r}")
        c = self.container
        if not c or "/" in c or len(c.encode()) > 256:
            raise bad("container", f"must be 1-256 bytes without '/', not {c!r}")
        if version == "1":
            if not (self.user and self.key):
                raise bad("user", "auth_version 1 needs user and key")
        elif self.application_credential_id or self.application_credential_secret:
            if not (self.application_credential_id and self.application_credential_secret):
                raise bad("application_credential_id", "needs both the id and the secret")
        else:
            if not (self.user and self.key):
                raise bad("user", "auth_version 3 needs user and key (or an application credential)")
            if not (self.project_name or self.project_id):
                raise bad("project_name", "auth_version 3 needs project_name or project_id")
        if self.interface is not None and self.interface not in _INTERFACES:
            raise bad("interface", f"must be one of {', '.join(_INTERFACES)}, not {self.interface!r}")
        for name in ("threads", "retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "threads" else 0):
                raise bad(name, f"must be an integer >= {1 if name == 'threads' else 0}, not {v!r}")
        for name in ("starting_backoff", "max_backoff", "timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise bad(name, f"must be a positive number of seconds, not {v!r}")
        p = self.listing_page_size
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise bad("listing_page_size", f"must be a positive integer, not {p!r}")

    @classmethod
    def from_mapping(cls, data: Mapping) -> "SwiftConfig":
        """From a config-file section (e.g. ekko.yaml `store:` without its `type`)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known - {"type"})
        if extra:
            raise ConfigError(f"store.{extra[0]}", "unknown key for a swift store")
        for name in ("auth_url", "container"):
            if not data.get(name):
                raise ConfigError(f"store.{name}", "missing")
        return cls(**{k: v for k, v in data.items() if k != "type"})

    @classmethod
    def from_env(cls, container: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                 **overrides) -> "SwiftConfig":
        """From the variables the `swift` CLI reads: ST_AUTH/ST_USER/ST_KEY (v1) or OS_* (v3).

        The container comes from the argument, else EKKO_SWIFT_CONTAINER. Keyword overrides win.
        """
        env = os.environ if environ is None else environ
        values = env_values(env)
        values["container"] = container or env.get("EKKO_SWIFT_CONTAINER")
        values.update(overrides)
        if not values.get("auth_url"):
            raise ConfigError("store.auth_url", "set ST_AUTH (tempauth) or OS_AUTH_URL (keystone)")
        if not values["container"]:
            raise ConfigError("store.container", "pass a container or set EKKO_SWIFT_CONTAINER")
        return cls(**values)

    def with_container(self, container: str) -> "SwiftConfig":
        return replace(self, container=container)


def env_values(env: Mapping[str, str]) -> dict:
    """SwiftConfig fields found in ST_* (v1, they win when ST_AUTH is set) or OS_* variables."""

    def get(*names: str) -> Optional[str]:
        return next((env[n] for n in names if env.get(n)), None)

    v1 = bool(get("ST_AUTH"))
    values = dict(
        auth_url=get("ST_AUTH") if v1 else get("OS_AUTH_URL"),
        auth_version=get("ST_AUTH_VERSION", "OS_AUTH_VERSION", "OS_IDENTITY_API_VERSION")
        or ("1" if v1 else "3" if get("OS_AUTH_URL") else None),
        user=get("ST_USER") if v1 else get("OS_USERNAME"),
        key=get("ST_KEY") if v1 else get("OS_PASSWORD"),
        project_name=get("OS_PROJECT_NAME", "OS_TENANT_NAME"),
        project_id=get("OS_PROJECT_ID", "OS_TENANT_ID"),
        user_domain_name=get("OS_USER_DOMAIN_NAME"),
        project_domain_name=get("OS_PROJECT_DOMAIN_NAME"),
        application_credential_id=get("OS_APPLICATION_CREDENTIAL_ID"),
        application_credential_secret=get("OS_APPLICATION_CREDENTIAL_SECRET"),
        region_name=get("OS_REGION_NAME"),
        interface=get("OS_INTERFACE", "OS_ENDPOINT_TYPE"),
        storage_url=get("OS_STORAGE_URL"),
        cacert=get("OS_CACERT"),
        insecure=(get("SWIFTCLIENT_INSECURE") or "").lower() in ("1", "true", "yes") or None,
    )
    if values["interface"] and values["interface"].endswith("URL"):  # publicURL -> public
        values["interface"] = values["interface"][:-3]
    return {k: v for k, v in values.items() if v is not None}


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


class SwiftStore:
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
        if c.application_credential_id:
            os_options.update(
                auth_type="v3applicationcredential",
                application_credential_id=c.application_credential_id,
                application_credential_secret=c.application_credential_secret,
            )
            # swiftclient re-authenticates on 401 only when user and key are set
            user, key = c.application_credential_id, c.application_credential_secret
        return Connection(
            authurl=c.auth_url, user=user, key=key, auth_version=c.auth_version,
            os_options=os_options, retries=c.retries, starting_backoff=c.starting_backoff,
            max_backoff=c.max_backoff, timeout=c.timeout, insecure=c.insecure, cacert=c.cacert,
        )

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
        conn = getattr(self._local, "conn", None)
        secrets = self._secrets + ((conn.token,) if conn is not None and conn.token else ())
        for s in secrets:
            text = text.replace(s, "***")
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
        marker = ""
        while True:
            try:
                _, page = self._conn().get_container(
                    self.container, marker=marker or None, prefix=prefix or None,
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
    if options.get("container") and options.get("container_prefix"):
        raise ConfigError("store.container", "give container or container_prefix, not both")
    return str(options.get("container") or options.get("container_prefix") or DEFAULT_CONTAINER_PREFIX)


def container_for(options: Mapping, namespace: Optional[str] = None) -> str:
    """The default namespace uses the base name ("ekko"); project P uses "ekko-P"."""
    base = _base_container(options)
    return base if namespace is None else f"{base}-{namespace}"


def swift_config(options: Mapping, namespace: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None) -> SwiftConfig:
    """SwiftConfig from the `store:` section. Keys the file leaves out (typically user/key) come
    from the environment (ST_* or OS_*, as for the `swift` CLI); the file wins where both set."""
    opts = {k: v for k, v in options.items() if k not in ("type", "container", "container_prefix")}
    env = os.environ if environ is None else environ
    merged = {k: v for k, v in env_values(env).items() if k not in opts}
    if "auth_url" in opts and "auth_version" not in opts:
        merged.pop("auth_version", None)  # the file's URL, the file's (default) version
    merged.update(opts)
    merged["container"] = container_for(options, namespace)
    return SwiftConfig.from_mapping(merged)


def open_swift_store(options: Mapping, namespace: Optional[str] = None) -> SwiftStore:
    return SwiftStore(swift_config(options, namespace))


def list_namespaces(options: Mapping) -> list:
    """Project namespaces that have a container in the account: names after "<base>-"."""
    store = SwiftStore(swift_config(options))
    prefix = store.container + "-"
    found, marker = [], None
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
