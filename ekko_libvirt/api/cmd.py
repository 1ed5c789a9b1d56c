"""`ekko-api`: serve (gunicorn, in this process) | reindex (rebuild the index from the stores).

    ekko-api [--config-file /etc/ekko/ekko-api.conf] serve
    ekko-api [--config-file ...] reindex

Exit 0 success, 1 failure, 2 bad configuration (the message names the file and option)."""

import logging
import os
import sys
from typing import List, Optional

from oslo_config import cfg

from .. import config as ekko_config
from ..errors import EkkoError
from ..store.factory import namespaces, open_store
from . import conf as api_conf
from .index import Index, reindex

log = logging.getLogger("ekko-api")


def _commands(subparsers) -> None:
    subparsers.add_parser("serve", help="serve the API with gunicorn")
    subparsers.add_parser("reindex", help="rebuild the index from every project namespace of the store")


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    conf = cfg.ConfigOpts()
    api_conf.register(conf)
    conf.register_cli_opt(cfg.SubCommandOpt("command", handler=_commands))
    try:
        files = [api_conf.DEFAULT_FILE] if os.path.exists(api_conf.DEFAULT_FILE) else []
        conf(sys.argv[1:] if argv is None else argv, project="ekko", prog="ekko-api", default_config_files=files,
             validate_default_values=True)
    except (cfg.Error, ValueError) as e:
        sys.stderr.write(f"ekko-api: error: {e}\n")
        return 2
    try:
        if conf.command.name == "reindex":
            return _reindex(conf)
        return _serve(conf)
    except EkkoError as e:
        sys.stderr.write(f"ekko-api: error: {e}\n")
        return getattr(e, "exit_code", 1)


def _reindex(conf: cfg.ConfigOpts) -> int:
    ekko = ekko_config.load(conf.api.ekko_config).with_store(conf.api.store)
    os.makedirs(os.path.dirname(conf.api.index_path) or ".", mode=0o700, exist_ok=True)
    idx = Index(conf.api.index_path)
    try:
        projects = [ns for ns in namespaces(ekko) if ns is not None]
        done = reindex(idx, ((p, open_store(ekko, p)) for p in projects))
    finally:
        idx.close()
    for project, (added, removed) in sorted(done.items()):
        print(f"{project}: {added} manifests added, {removed} removed")
    return 0


def bus_configured(conf: cfg.ConfigOpts) -> bool:
    """Whether [DEFAULT] transport_url is set (oslo.messaging's own option, registered here only to
    read it: it may not be registered yet)."""
    try:
        from oslo_messaging import opts as messaging_opts
    except ImportError:
        return False
    default = None
    for group, opts in messaging_opts.list_opts():
        if group is None:
            conf.register_opts(opts)
            default = next((o.default for o in opts if o.name == "transport_url"), None)
    return conf.transport_url not in (None, "", default)      # its default, 'rabbit://', means "not set"


def bus_starter_for(application):
    """gunicorn's post_worker_init hook: each worker joins the bus when it starts, not at its first
    request that needs the bus; until then it took no heartbeats, and right after a start no
    worker might (found by bench/bus_agents.py)."""
    def hook(worker) -> None:
        from .app import ApiError, _bus
        try:
            _bus(application.extensions["ekko"])
        except ApiError as e:
            log.error("worker %s: not on the message bus: %s", worker.pid, e.message)
    return hook


def worker_exit_for(application):
    """gunicorn's worker_exit hook: a worker that started the bus stops it, then ends at once.

    Measured (tests/integration/test_tenant_e2e.py): once oslo.messaging is in a worker, its exit
    after SIGTERM hung in the interpreter's shutdown (concurrent.futures joining a thread that no
    longer runs: oslo's eventlet backend is loaded with the bus) until gunicorn's graceful_timeout
    killed it, 30 s later. Everything the worker owns is done when gunicorn calls this hook
    (requests answered, the index's transactions committed), so after the bus is stopped and the
    logs are flushed it leaves with os._exit. A worker that never used the bus exits normally."""
    def hook(_arbiter, worker) -> None:
        api = application.extensions.get("ekko")
        bus = getattr(api, "bus", None)
        if bus is None:
            return
        stop = getattr(bus, "stop", None)
        if stop is not None:
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - leaving anyway; the broker drops our queues' consumers
                log.warning("worker %s: the bus did not stop cleanly: %s", worker.pid, e)
        logging.shutdown()
        os._exit(0)
    return hook


def _serve(conf: cfg.ConfigOpts) -> int:
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    os.makedirs(os.path.dirname(conf.api.index_path) or ".", mode=0o700, exist_ok=True)
    Index(conf.api.index_path).close()        # the schema exists before workers race to make it
    application = create_app(conf)            # fails here (config, store section), not in a worker

    class Gunicorn(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", conf.api.bind)
            self.cfg.set("workers", conf.api.workers)
            self.cfg.set("threads", conf.api.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", "-")
            # The access log line: method, path and query, status. No headers: X-Auth-Token stays out.
            self.cfg.set("access_log_format", '%(h)s "%(r)s" %(s)s %(B)s %(M)sms')
            self.cfg.set("worker_exit", worker_exit_for(application))
            if bus_configured(conf):
                self.cfg.set("post_worker_init", bus_starter_for(application))
            # idle keep-alive connections outlive a client's 2 s poll (`openstack ekko ... --wait`)
            self.cfg.set("keepalive", 5)

        def load(self):
            return application

    Gunicorn().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
