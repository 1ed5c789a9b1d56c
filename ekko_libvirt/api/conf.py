"""ekko-api's configuration: oslo.config options, read from /etc/ekko/ekko-api.conf (or
--config-file). Built once (load) and handed to everything else; auth_token reads its own
[keystone_authtoken] section from the same ConfigOpts."""

from typing import List, Optional

from oslo_config import cfg

DEFAULT_FILE = "/etc/ekko/ekko-api.conf"

API_OPTS = [
    cfg.StrOpt("ekko_config", default="/etc/ekko/ekko.yaml",
               help="The agents' ekko.yaml: the store (and its credentials) the API reads."),
    cfg.StrOpt("store", default="default",
               help="Which store of ekko.yaml holds the backups: 'default' is `store:`, others are under `stores:`."),
    cfg.StrOpt("index_path", default="/var/lib/ekko/api/index.sqlite",
               help="The SQLite index of backups; rebuilt from the store by `ekko-api reindex`."),
    cfg.IntOpt("index_max_age", default=60, min=0,
               help="Seconds an index of a project is trusted before a request refreshes it from the store "
                    "(only new or removed manifests are read)."),
    cfg.IntOpt("page_max", default=1000, min=1, help="The largest `limit` of a list."),
    cfg.IntOpt("page_default", default=100, min=1, help="`limit` when none is given."),
    cfg.IntOpt("max_body", default=64 * 1024, min=1024, help="The largest request body, in bytes (413 beyond)."),
    cfg.StrOpt("bind", default="127.0.0.1:8799", help="host:port `ekko-api serve` listens on."),
    cfg.IntOpt("workers", default=2, min=1, help="gunicorn worker processes of `ekko-api serve`."),
    cfg.IntOpt("threads", default=8, min=1, help="Threads per worker (requests served at once by each)."),
    cfg.BoolOpt("auth", default=True,
                help="Put keystonemiddleware.auth_token in front of the app. Only tests turn it off."),
]


def register(conf: cfg.ConfigOpts) -> None:
    """ekko-api's options, and auth_token's [keystone_authtoken] (registered here too, so they can
    be set before the middleware is built and appear in the generated sample)."""
    from keystonemiddleware import auth_token
    conf.register_opts(API_OPTS, group="api")
    for group, opts in auth_token.list_opts():
        conf.register_opts(opts, group=group)


def load(args: Optional[List[str]] = None, files: Optional[List[str]] = None) -> cfg.ConfigOpts:
    """A new ConfigOpts with ekko-api's options, read from `files` (default: DEFAULT_FILE when it
    exists). oslo.config raises ConfigFilesNotFoundError / ConfigFileValueError naming the file
    and the option."""
    import os
    conf = cfg.ConfigOpts()
    register(conf)
    if files is None:
        files = [DEFAULT_FILE] if os.path.exists(DEFAULT_FILE) else []
    conf(args or [], project="ekko", prog="ekko-api", default_config_files=files, validate_default_values=True)
    return conf


def list_opts():
    """For oslo-config-generator (entry point oslo.config.opts: ekko.api)."""
    from keystonemiddleware import auth_token
    return [("api", API_OPTS)] + auth_token.list_opts()
