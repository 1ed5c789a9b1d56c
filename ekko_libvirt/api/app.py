"""The ekko-api WSGI application: Flask, /v1, behind keystonemiddleware.auth_token.

Every request runs as the token's project. Each query is confined to that project in the index
(index.py), so another project's instance, backup or job id answers 404 whatever the role; only
`?all_projects=1` with `ekko:all_projects` (admin) lifts it. The order is: token (401, by
auth_token) -> policy (403) -> input (400/413) -> the thing itself (404, 409) -> work.

Collaborators are injected (create_app's arguments) so tests can put fakes where a real one needs
a whole cloud: the bus (agents over oslo.messaging, bus.py), the Glance upload (glance.py), and
the opener of a backup's file system (serve/server.py + serve/files.py: a libguestfs appliance)."""

import contextlib
import importlib
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import flask
from oslo_config import cfg
from werkzeug.exceptions import HTTPException

from .. import config as ekko_config
from ..errors import EkkoError, StoreError, UsageError
from ..store import catalog, markers
from ..store.base import Store
from ..store.factory import namespaces, open_store
from . import policy, render
from .index import Index

log = logging.getLogger(__name__)

PIECE = 2 * 1024 * 1024                          # a download is read from the guest in these
_BACKUP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PROJECT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")   # store/factory.py's namespace rule
_DISK = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
FORMATS = ("qcow2", "raw")
FIRST_BUILD_WAIT = 30.0                          # s a request waits for another's first refresh of its project
BUILD_POLL = 0.05

GuestOpener = Callable[[ekko_config.Config, str, str], ContextManager[Any]]


class ApiError(Exception):
    """An answer other than success: HTTP code + a message for the caller (never a secret)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def real_guest(cfg: ekko_config.Config, namespace: str, key: str) -> ContextManager[Any]:
    """The backup's disk served (nbdkit) to a libguestfs appliance, its file system mounted."""
    from ..serve import files, server

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        with server.serving(cfg, namespace, key) as srv:
            assert srv.socket is not None
            with files.Guest(srv.socket) as g:
                yield g
    return opened()


class Caller:
    """Who asks, as auth_token put it in the environ (it strips the same headers from clients)."""

    def __init__(self, environ: Dict[str, Any]):
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            raise ApiError(401, "authentication required: a valid Keystone token in X-Auth-Token")
        self.project = environ.get("HTTP_X_PROJECT_ID") or ""
        self.user = environ.get("HTTP_X_USER_ID") or ""
        self.roles = [r.strip() for r in (environ.get("HTTP_X_ROLES") or "").split(",") if r.strip()]
        if not _PROJECT.match(self.project):
            raise ApiError(403, "the token is not scoped to a project")

    def creds(self) -> Dict[str, Any]:
        return {"project_id": self.project, "user_id": self.user, "roles": self.roles}


class Api:
    """The handlers' shared state: built once per process."""

    def __init__(self, conf: cfg.ConfigOpts, ekko: ekko_config.Config, bus: Any, glance: Any,
                 open_guest: GuestOpener):
        self.conf, self.ekko, self.bus, self.glance, self.open_guest = conf, ekko, bus, glance, open_guest
        self.enforcer = policy.enforcer(conf)
        self._local = threading.local()

    # -- per request -------------------------------------------------------------------------------
    def index(self) -> Index:
        """This thread's connection to the index, kept for the requests the thread serves next:
        opening one (connect, WAL and schema statements, close) cost 0.3-0.4 ms of a request."""
        idx = getattr(self._local, "index", None)
        if idx is None:
            idx = self._local.index = Index(self.conf.api.index_path)
        return idx

    def caller(self, rule: str) -> Caller:
        c = Caller(flask.request.environ)
        if not policy.allowed(self.enforcer, rule, c.creds()):
            raise ApiError(403, f"policy does not allow {rule} for roles {', '.join(c.roles) or 'none'}")
        return c

    def scope(self, c: Caller) -> Optional[str]:
        """The project the request sees; None: every project (admin, ?all_projects=1)."""
        flag = flask.request.args.get("all_projects", "")
        if flag.lower() not in ("1", "true", "yes"):
            return c.project
        if not policy.allowed(self.enforcer, "ekko:all_projects", c.creds()):
            raise ApiError(403, "all_projects: policy does not allow ekko:all_projects")
        return None

    def store(self, project: str) -> Store:
        try:
            return open_store(self.ekko, project)
        except EkkoError as e:
            raise ApiError(503, f"the store of project {project} cannot be opened: {e}") from e

    def fresh(self, project: str, force: bool = False) -> None:
        """The project's index refreshed from the store when it is older than index_max_age.

        One request refreshes (claim_refresh); the others answer from the index as it is, except
        while the project's first refresh runs: the index would say its instances do not exist
        (404s, empty lists: seen by bench/api_list.py under load), so they wait for it. Another
        worker process may be the one building, and SQLite tells no one when a row changes:
        they poll, with a deadline; a failed build is released and claimed again by a waiter."""
        idx = self.index()
        deadline = time.monotonic() + FIRST_BUILD_WAIT
        while not idx.claim_refresh(project, 0 if force else self.conf.api.index_max_age):
            if idx.built(project):
                return
            if time.monotonic() > deadline:
                raise ApiError(503, f"the index of project {project} is still being built from the store: "
                                    "try again")
            time.sleep(BUILD_POLL)
        try:
            store = self.store(project)
            try:
                idx.refresh(project, store)
            finally:
                store.close()
        except BaseException as e:
            idx.release_claim(project)
            if isinstance(e, StoreError):
                raise ApiError(503, f"the store does not answer: {e}") from e
            raise

    def fresh_scope(self, scope: Optional[str]) -> None:
        """fresh() of the project, or of every project namespace of the store (scope None)."""
        if scope is not None:
            self.fresh(scope)
            return
        try:
            projects = [ns for ns in namespaces(self.ekko) if ns is not None]
        except EkkoError as e:
            raise ApiError(503, f"the store does not answer: {e}") from e
        for p in projects:
            self.fresh(p)

    def backup_row(self, c: Caller, backup_id: str) -> Any:
        if not _BACKUP_ID.match(backup_id):
            raise ApiError(404, f"no backup {backup_id!r}")
        scope = self.scope(c)
        self.fresh_scope(scope)
        row = self.index().backup(scope, backup_id)
        if row is None:
            raise ApiError(404, f"no backup {backup_id!r}")
        return row


# -- input --------------------------------------------------------------------------------------------
def body(allowed: Dict[str, type], required: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """The request's JSON object: only `allowed` fields, of their types; 400 naming what is wrong."""
    raw = flask.request.get_data(cache=True)       # werkzeug's max_content_length: 413 beyond max_body
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = flask.json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")
    for name, kind in allowed.items():
        if name in data and (type(data[name]) is not kind):
            raise ApiError(400, f"field {name!r} must be a {kind.__name__}")
    missing = [r for r in required if r not in data]
    if missing:
        raise ApiError(400, f"missing field(s): {', '.join(map(repr, missing))}")
    return data


def page(conf: cfg.ConfigOpts) -> Tuple[int, Optional[str]]:
    args = flask.request.args
    text = args.get("limit")
    if text is None:
        limit = conf.api.page_default
    else:
        if not text.isdigit() or not 1 <= int(text) <= conf.api.page_max:
            raise ApiError(400, f"limit must be an integer from 1 to {conf.api.page_max}")
        limit = int(text)
    marker = args.get("marker") or None
    if marker is not None and not _BACKUP_ID.match(marker):
        raise ApiError(400, "marker is not one this API gave")
    return limit, marker


def instance_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ApiError(404, f"no instance {text[:64]!r}") from None


def only_args(*names: str) -> None:
    unknown = sorted(set(flask.request.args) - set(names) - {"all_projects"})
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")


# -- the app ------------------------------------------------------------------------------------------
def create_app(conf: cfg.ConfigOpts, bus: Any = None, glance: Any = None,
               open_guest: Optional[GuestOpener] = None, ekko: Optional[ekko_config.Config] = None):
    """The WSGI application: Flask wrapped in auth_token (unless [api] auth = false: tests).
    bus/glance default to ekko_libvirt.api.bus.Bus(conf) / ekko_libvirt.api.glance, imported when
    first needed (their absence answers 501 on the endpoints that need them, nothing else)."""
    ekko = ekko or ekko_config.load(conf.api.ekko_config).with_store(conf.api.store)
    api = Api(conf, ekko, bus, glance, open_guest or real_guest)
    app = flask.Flask("ekko-api")
    app.config["MAX_CONTENT_LENGTH"] = conf.api.max_body
    app.extensions["ekko"] = api
    _errors(app)
    _routes(app, api)

    @app.teardown_appcontext
    def _end(_exc: Optional[BaseException]) -> None:
        # The thread's connection outlives the request: a transaction an error left open would
        # hold SQLite's write lock for every other request of every worker.
        idx = getattr(api._local, "index", None)
        if idx is not None and idx.db.in_transaction:
            idx.db.execute("ROLLBACK")

    if not conf.api.auth:
        return app
    from keystonemiddleware import auth_token
    shared = _share_token_cache(conf)
    protected = auth_token.AuthProtocol(app.wsgi_app, {"oslo_config_config": conf})
    checked = protected if shared is None else _in_environ(shared, protected)
    app.wsgi_app = json_auth_errors(checked)   # type: ignore[method-assign]
    return app


KEYSTONE_DOWN = "the identity service (Keystone) cannot check the token now; try again later"


def json_auth_errors(inner: Callable) -> Callable:
    """auth_token answers 401 in JSON but 503 (Keystone unreachable) as webob's text or HTML page:
    that one becomes the API's JSON error like every other answer. Everything else passes as is."""
    def wsgi(environ: Dict[str, Any], start_response: Callable) -> Any:
        replaced: List[bytes] = []

        def start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
            ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
            if status.startswith("503") and not ctype.startswith("application/json"):
                body = flask.json.dumps(render.error(503, KEYSTONE_DOWN)).encode()
                replaced.append(body)
                return start_response(status, [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))], exc_info)
            return start_response(status, headers, exc_info)

        result = inner(environ, start)
        if not replaced:
            return result
        if hasattr(result, "close"):
            result.close()
        return [replaced[0]]
    return wsgi


class TokenCache:
    """auth_token's in-process token cache, one per process instead of one per concurrent request.

    Without memcached, keystonemiddleware keeps a pool of dict caches and makes a new, empty one
    whenever every cache of the pool is in use: under concurrent requests a worker holds up to
    one per thread, each learning each token for itself, so Keystone validates the same token
    again per cache (bench/api_list.py, 50 clients: Keystone busy during steady load, requests
    held up to seconds), and each get scans its whole dict for expired entries. This one is
    shared by a worker's threads, locked, expires an entry when it is read, and keeps at most
    `max_entries` (the oldest go first). The memcache client's get/set is what auth_token calls."""

    def __init__(self, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.max_entries, self._clock = max_entries, clock
        self._items: "OrderedDict[str, Tuple[float, Any]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] and self._clock() >= item[0]:
                del self._items[key]
                return None
            return item[1]

    def set(self, key: str, value: Any, time: float = 0, min_compress_len: int = 0) -> bool:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (self._clock() + time if time else 0.0, value)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return True
    # No __len__: auth_token takes the environ's cache only when it is truthy (`if cache:`), and
    # an empty one would be refused for its pool of dicts (seen: the shared cache stayed unused).


TOKEN_CACHE_ENV = "ekko.token_cache"


def _share_token_cache(conf: cfg.ConfigOpts) -> Optional[TokenCache]:
    """A TokenCache handed to auth_token through its `cache` option (the environ key under which
    it looks for a cache object, as Swift hands it one), unless the operator configured a cache
    (memcached_servers, or a `cache` of their own): theirs is used as it is."""
    ka = conf.keystone_authtoken
    if ka.memcached_servers or ka.cache not in (None, TOKEN_CACHE_ENV):      # (ours: an app built before)
        return None
    conf.set_default("cache", TOKEN_CACHE_ENV, group="keystone_authtoken")
    return TokenCache()


def _in_environ(cache: TokenCache, wsgi_app: Callable) -> Callable:
    def with_cache(environ: Dict[str, Any], start_response: Callable) -> Any:
        environ[TOKEN_CACHE_ENV] = cache
        return wsgi_app(environ, start_response)
    return with_cache


def _errors(app: flask.Flask) -> None:
    @app.errorhandler(ApiError)
    def _api(e: ApiError):
        return flask.jsonify(render.error(e.code, e.message)), e.code

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        code = e.code or 500
        return flask.jsonify(render.error(code, e.description or e.name)), code

    @app.errorhandler(Exception)
    def _other(e: Exception):
        # The traceback goes to the log, never to the caller (it may name paths and hosts).
        log.exception("%s %s failed", flask.request.method, flask.request.path)
        return flask.jsonify(render.error(500, f"internal error ({type(e).__name__}); see the ekko-api log")), 500


def _bus(api: Api) -> Any:
    if api.bus is None:
        try:
            mod = importlib.import_module("ekko_libvirt.api.bus")
        except ImportError as e:
            raise ApiError(501, "the message bus (ekko_libvirt.api.bus) is not installed") from e
        api.bus = mod.Bus(api.conf)
    return api.bus


def _bus_call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - the bus's failures are the caller's 503, logged with their cause
        log.warning("bus: %s failed: %s", what, e)
        raise ApiError(503, f"the agents cannot be reached over the message bus ({what}): {type(e).__name__}") from e


def host_of(hosts: List[Dict[str, Any]], domain_uuid: str) -> Optional[str]:
    """The host whose agent reports the domain (its `domains`: UUIDs, or dicts with a `uuid`); a
    host counted down (no recent heartbeat) is never chosen. During and after a live migration two
    hosts may report it: the one that says it runs there wins (the newest heartbeat among those),
    else the newest heartbeat of any (a shut-off domain is backed up by the host that holds it)."""
    found = []
    for h in hosts:
        if h.get("down"):
            continue
        for d in h.get("domains") or ():
            u = d.get("uuid") if isinstance(d, dict) else d
            if str(u).lower() == domain_uuid:
                running = bool(d.get("running")) if isinstance(d, dict) else False
                # last_heartbeat is UTC "YYYY-MM-DDTHH:MM:SSZ" (busrules.when): it orders as text
                found.append((running, str(h.get("last_heartbeat") or ""), str(h.get("host"))))
    return max(found)[2] if found else None


def _routes(app: flask.Flask, api: Api) -> None:
    conf = api.conf

    @app.get("/v1/instances")
    def instances():
        c = api.caller("ekko:instance:list")
        only_args("limit", "marker")
        scope = api.scope(c)
        limit, marker = page(conf)
        api.fresh_scope(scope)
        idx = api.index()
        rows = idx.instances(scope, limit, marker)
        out = [render.instance(r, r) for r in rows]        # a row carries its newest backup (Index.instances)
        nxt = rows[-1]["instance_id"] if len(rows) == limit else None
        return {"instances": out, "next": nxt}

    @app.get("/v1/instances/<inst>/backups")
    def backups(inst: str):
        c = api.caller("ekko:backup:list")
        only_args("limit", "marker")
        scope, iid = api.scope(c), instance_id(inst)
        limit, marker = page(conf)
        api.fresh_scope(scope)
        rows = api.index().backups(scope, iid, limit, marker)
        if not rows and not marker and (scope is None or not api.index().has_instance(scope, iid)):
            raise ApiError(404, f"no instance {iid} with backups")
        return {"backups": [render.backup(r) for r in rows],
                "next": rows[-1]["backup_id"] if len(rows) == limit else None}

    @app.get("/v1/backups/<backup_id>")
    def show(backup_id: str):
        c = api.caller("ekko:backup:show")
        only_args()
        row = api.backup_row(c, backup_id)
        return {"backup": render.backup(row, api.index().disks(row["project"], backup_id))}

    @app.post("/v1/instances/<inst>/backups")
    def backup_now(inst: str):
        c = api.caller("ekko:backup:create")
        only_args()
        data = body({"force_full": bool})
        iid = instance_id(inst)
        api.fresh(c.project)
        if not api.index().has_instance(c.project, iid):
            raise ApiError(404, f"no instance {iid} with backups in this project")
        bus = _bus(api)
        host = host_of(_bus_call("hosts", bus.hosts), iid)
        if host is None:
            raise ApiError(409, f"instance {iid} runs on no host whose agent is up: no backup started")
        job_id = str(_bus_call("backup_now", lambda: bus.backup_now(host, iid, bool(data.get("force_full")))))
        # The bus may have failed it already (the agent went silent since hosts()): say so at once.
        known = _bus_call("job", lambda: bus.job(job_id)) or {}
        state = "failed" if known.get("state") == "failed" else "queued"
        api.index().add_job(job_id, c.project, "backup", host, "queued")
        job = {"id": job_id, "state": state, "host": host}
        if state == "failed":
            job["error"] = str(known.get("error") or "the agent did not take the request")
        return {"job": job}, 202

    @app.get("/v1/jobs/<job_id>")
    def job(job_id: str):
        c = api.caller("ekko:job:show")
        only_args()
        row = api.index().job(api.scope(c), job_id[:128])
        if row is None:
            raise ApiError(404, f"no job {job_id[:64]!r}")
        live = _bus_call("job", lambda: _bus(api).job(job_id)) if row["kind"] == "backup" else None
        return {"job": render.job(row, live)}

    @app.put("/v1/backups/<backup_id>/protection")
    def protection(backup_id: str):
        c = api.caller("ekko:backup:protect")
        only_args()
        data = body({"protected": bool}, required=("protected",))
        row = api.backup_row(c, backup_id)
        project = row["project"]
        store = api.store(project)
        try:
            for d in api.index().disks(project, backup_id):
                if data["protected"]:
                    markers.protect(store, d["target"], backup_id)
                else:
                    markers.unprotect(store, d["target"], backup_id)
        except StoreError as e:
            raise ApiError(503, f"the store does not answer: {e}") from e
        finally:
            store.close()
        api.index().set_protected(project, backup_id, data["protected"])
        row = api.index().backup(project, backup_id)
        return {"backup": render.backup(row, api.index().disks(project, backup_id))}

    @app.delete("/v1/backups/<backup_id>")
    def delete(backup_id: str):
        c = api.caller("ekko:backup:delete")
        only_args()
        row = api.backup_row(c, backup_id)
        project = row["project"]
        api.fresh(project, force=True)        # decide on what the store holds now, not on the index
        store = api.store(project)
        try:
            refusal = _delete_refusal(store, api.index().disks(project, backup_id), backup_id)
            if refusal:
                raise ApiError(409, refusal)
            for d in api.index().disks(project, backup_id):
                store.delete(d["manifest_key"])
                markers.forget_backup(store, d["target"], backup_id)
        except StoreError as e:
            raise ApiError(503, f"the store does not answer: {e}") from e
        finally:
            store.close()
        api.index().forget(project, backup_id)
        log.info("project %s: backup %s of instance %s deleted", project, backup_id, row["instance_id"])
        return "", 204

    @app.get("/v1/backups/<backup_id>/files")
    def files_list(backup_id: str):
        c = api.caller("ekko:file:list")
        only_args("disk", "path")
        row = api.backup_row(c, backup_id)
        key, path = _file_request(api, row)
        with _guest(api, row["project"], key) as g:
            entries, refused = _guest_call(lambda: g.listdir(path))
        return {"path": path, "entries": [e.as_dict() for e in entries], "refused": refused}

    @app.get("/v1/backups/<backup_id>/files/content")
    def files_get(backup_id: str):
        c = api.caller("ekko:file:get")
        only_args("disk", "path")
        row = api.backup_row(c, backup_id)
        key, path = _file_request(api, row)
        stack = contextlib.ExitStack()
        try:
            g = stack.enter_context(_guest(api, row["project"], key))
            e = _guest_call(lambda: g.stat(path))
            if e.type != "file":
                raise ApiError(400, f"{path} is a {e.type}, not a regular file")
        except BaseException:
            stack.close()
            raise

        def pieces() -> Iterator[bytes]:
            for off in range(0, e.size, PIECE):
                yield g.read(path, min(PIECE, e.size - off), off)

        resp = flask.Response(pieces(), mimetype="application/octet-stream",
                              headers={"Content-Length": str(e.size),
                                       "Content-Disposition": f"attachment; filename*=UTF-8''{_quote(e.name)}"})
        resp.call_on_close(stack.close)     # the server and the appliance live as long as the stream
        return resp

    @app.post("/v1/backups/<backup_id>/restore")
    def restore(backup_id: str):
        c = api.caller("ekko:backup:restore")
        only_args()
        data = body({"image_name": str, "disk": str, "disk_format": str}, required=("image_name",))
        name, fmt = data["image_name"], data.get("disk_format", "qcow2")
        if not 1 <= len(name) <= 255 or not name.isprintable():
            raise ApiError(400, "image_name must be 1 to 255 printable characters")
        if fmt not in FORMATS:
            raise ApiError(400, f"disk_format must be one of {', '.join(FORMATS)}")
        row = api.backup_row(c, backup_id)
        key = _disk_key(api, row, data.get("disk"))
        glance = api.glance
        if glance is None:
            try:
                glance = importlib.import_module("ekko_libvirt.api.glance")
            except ImportError as e:
                raise ApiError(501, "restore as an image (ekko_libvirt.api.glance) is not installed") from e
        session = _user_session(flask.request.environ)
        job_id = str(uuid.uuid4())
        api.index().add_job(job_id, c.project, "restore", None, "running")
        threading.Thread(target=_run_restore, name=f"restore-{job_id}", daemon=True,
                         args=(api, glance, job_id, row["project"], key, name, fmt, session)).start()
        return {"job": {"id": job_id, "state": "running", "host": None}}, 202

    @app.get("/v1/usage")
    def usage():
        c = api.caller("ekko:usage:show")
        only_args()
        api.fresh(c.project)
        return {"usage": api.index().usage(c.project)}

    @app.get("/v1/admin/hosts")
    def hosts():
        api.caller("ekko:admin:hosts")
        only_args()
        bus = _bus(api)
        return {"hosts": _bus_call("hosts", bus.hosts)}


def _delete_refusal(store: Store, disks: List, backup_id: str) -> Optional[str]:
    """Why this backup must stay (409), from the store itself; None: it may go."""
    for d in disks:
        if markers.is_protected(store, d["target"], backup_id):
            return f"backup {backup_id} is protected: unprotect it first"
        newest = max((k.rsplit("/", 1)[1] for k in catalog.keys(store, d["target"])), default=None)
        if newest == backup_id:
            return f"backup {backup_id} is the newest of disk {d['disk']}: the next incremental builds on it"
    return None


def _disk_key(api: Api, row: Any, disk: Optional[str]) -> str:
    disks = api.index().disks(row["project"], row["backup_id"])
    if disk is None:
        if len(disks) != 1:
            raise ApiError(400, f"backup {row['backup_id']} has disks {', '.join(d['disk'] for d in disks)}: "
                                "give disk")
        return disks[0]["manifest_key"]
    if not _DISK.match(disk):
        raise ApiError(400, "disk must be a device name such as vda")
    found = [d for d in disks if d["disk"] == disk]
    if not found:
        raise ApiError(404, f"backup {row['backup_id']} has no disk {disk!r} "
                            f"(disks: {', '.join(d['disk'] for d in disks)})")
    return found[0]["manifest_key"]


def _file_request(api: Api, row: Any) -> Tuple[str, str]:
    from ..serve.files import guest_path
    key = _disk_key(api, row, flask.request.args.get("disk"))
    text = flask.request.args.get("path", "/")
    if len(text) > 4096:
        raise ApiError(400, "path is longer than 4096 characters")
    try:
        return key, guest_path(text)
    except UsageError as e:
        raise ApiError(400, str(e)) from None


@contextlib.contextmanager
def _guest(api: Api, project: str, key: str) -> Iterator[Any]:
    from ..serve.files import ApplianceError
    try:
        cm = api.open_guest(api.ekko, project, key)
        g = cm.__enter__()
    except ApplianceError as e:
        raise ApiError(503, f"the file browser could not start: {e}") from e
    except EkkoError as e:
        raise _files_error(e) from e
    try:
        yield g
    except BaseException:
        import sys
        if not cm.__exit__(*sys.exc_info()):
            raise
    else:
        cm.__exit__(None, None, None)


def _guest_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EkkoError as e:
        raise _files_error(e) from e


def _files_error(e: EkkoError) -> ApiError:
    from ..serve.files import ApplianceError, DamagedFileSystem, FilesError
    if isinstance(e, DamagedFileSystem):
        return ApiError(422, f"the guest file system in this backup is damaged: {e}")
    if isinstance(e, (FilesError, UsageError)):
        return ApiError(404 if "no such" in str(e).lower() or "not found" in str(e).lower() else 400, str(e))
    if isinstance(e, ApplianceError):
        return ApiError(404 if "No such file" in str(e) else 503, str(e))
    return ApiError(503, f"the backup cannot be served: {type(e).__name__}")


def _quote(name: str) -> str:
    from urllib.parse import quote
    return quote(name, safe="")


def _user_session(environ: Dict[str, Any]) -> Any:
    """A keystoneauth session acting as the caller (its token: auth_token's user plugin), so the
    image lands in the caller's project. None without auth_token (tests)."""
    plugin = environ.get("keystone.token_auth")
    if plugin is None:
        return None
    from keystoneauth1 import session
    return session.Session(auth=plugin)


def _run_restore(api: Api, glance: Any, job_id: str, project: str, key: str, name: str, fmt: str,
                 session: Any) -> None:
    idx = Index(api.conf.api.index_path)
    try:
        image_id = glance.upload_backup_as_image(api.ekko, api.conf.api.store, project, key, name, fmt, session)
        idx.update_job(job_id, "done", {"image_id": image_id})
    except Exception as e:  # noqa: BLE001 - the job records the failure; the log keeps the cause
        log.warning("restore job %s (%s) failed: %s", job_id, key, e, exc_info=True)
        idx.update_job(job_id, "failed", None, f"{type(e).__name__}: {e}")
    finally:
        idx.close()
