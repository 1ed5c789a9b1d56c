"""Random config files against the loader and the CLI (Hypothesis): whatever the file holds,
loading it gives a Config or a ConfigError, never another exception (a traceback for the user);
the error is one short line; a credential's value never appears in it.

Credentials are generated as SECRET (or SECRET_NUMBER) wrapped in random shapes, and only in
the credential fields, so finding either marker in any output is a leak."""

import contextlib
import io
import os
import tempfile
from unittest import mock

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko_libvirt import cli, config
from ekko_libvirt.errors import ConfigError

SECRET = "s3cr3t-VALUE-x9"
SECRET_NUMBER = 987654321
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOP_KEYS = sorted(config._TOP_KEYS)
SWIFT_KEYS = ["auth_url", "auth_version", "user", "key", "project_name", "project_id", "user_domain_name",
              "project_domain_name", "application_credential_id", "application_credential_secret", "region_name",
              "interface", "storage_url", "threads", "retries", "starting_backoff", "max_backoff", "timeout",
              "insecure", "cacert", "listing_page_size", "container", "container_prefix", "password", "token"]
SECRET_FIELDS = ("key", "application_credential_secret", "password", "token")
OTHER_KEYS = ["path", "type", "engine", "qmp_socket", "node", "disks", "domain", "bitmap_prefix", "level",
              "enabled", "request_size", "in_flight", "key_file", "uri", "keep_last", "interval", "window"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)   # YAML cannot hold lone surrogates
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), text,
                    st.sampled_from(["1MiB", "64KiB", "local", "swift", "qmp", "libvirt", "3", "1",
                                     "http://127.0.0.1:9/auth/v1.0", "https://ks.example/v3", "/tmp/x", "24h"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(text, st.sampled_from(OTHER_KEYS + SWIFT_KEYS), st.integers(0, 9)), inner,
                    max_size=4)), max_leaves=12)
secrets = st.one_of(
    st.just(SECRET), st.just(SECRET_NUMBER), st.builds(lambda a, b: a + SECRET + b, text, text),
    st.lists(st.just(SECRET), min_size=1, max_size=3), st.dictionaries(text, st.just(SECRET), min_size=1, max_size=2),
    st.just([[[SECRET]]]), st.just(SECRET + "\n"), st.just(SECRET * 400), st.just(float(SECRET_NUMBER)))


@st.composite
def store_sections(draw):
    section = {}
    if draw(st.booleans()):
        section["type"] = draw(st.one_of(st.sampled_from(["swift", "local"]), values))
    for k in draw(st.lists(st.one_of(st.sampled_from(SWIFT_KEYS + ["path"]), text), max_size=8, unique=True)):
        section[k] = draw(secrets if k in SECRET_FIELDS else values)
    return section


@st.composite
def documents(draw):
    doc = {}
    for k in draw(st.lists(st.one_of(st.sampled_from(TOP_KEYS), text), max_size=6, unique=True)):
        doc[k] = draw(values)
    if draw(st.booleans()):
        doc["store"] = draw(store_sections())
    return draw(st.one_of(st.just(doc), values)) if draw(st.integers(0, 9)) == 0 else doc


# Text built from YAML's own syntax, for what the structured documents cannot reach: anchors,
# aliases, tags, directives, flow and block styles, quoting, escapes, several documents.
tokens = st.sampled_from(["{", "}", "[", "]", ": ", ":", "- ", ", ", "&a ", "*a", "&b ", "*b", "!!str ", "!!int ",
                          "!!binary ", "!!python/object:os.system ", "!x ", "? ", "---\n", "...\n", "\n", "  ",
                          "store", "type", "swift", "key", "workers", "segment_size", "'", '"', "\\x00", "\\q", "#",
                          "|\n", ">\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "9" * 40, "1e999", ".nan", "2001-13-01",
                          "~", "\t", "\u00ff", "\u2028", "<<: *a\n", "!!bool ", "!!float ", "!!timestamp ",
                          "!!set ", "!!omap ", "0x", "_"])


@contextlib.contextmanager
def no_credentials_in_environment():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ST_", "OS_", "SWIFTCLIENT_"))}
    with mock.patch.dict(os.environ, clean, clear=True):
        yield


def _check_error(e: ConfigError) -> None:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 600, msg
    assert SECRET not in msg and str(SECRET_NUMBER) not in msg, msg


def _check_text_error(e: ConfigError) -> None:
    """Random text: no secret markers in it, so only the form of the error is checked."""
    assert "\n" not in str(e) and len(str(e)) < 600, str(e)


def _load(path: str, data: bytes, check=_check_error) -> None:
    with open(path, "wb") as f:
        f.write(data)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        check(e)
        return
    if cfg.store.type == "swift":
        # what loaded is usable: the store's settings are built from it without an error, its
        # credentials are strings, and the store's scrubbing (its messages) works on them
        from ekko_libvirt.store.swift import SwiftStore, swift_config
        c = swift_config(dict(cfg.store.options))
        assert isinstance(c.key, str) and isinstance(c.application_credential_secret, (str, type(None)))
        assert SECRET not in repr(c)
        SwiftStore(c)._scrub("a message")


@FUZZ
@given(documents())
def test_random_documents_load_or_fail_with_a_config_error(doc):
    with no_credentials_in_environment(), tempfile.TemporaryDirectory() as d:
        _load(os.path.join(d, "ekko.yaml"), yaml.safe_dump(doc, allow_unicode=True).encode())


@FUZZ
@given(st.lists(tokens, max_size=40).map("".join))
def test_random_yaml_text_loads_or_fails_with_a_config_error(text):
    with no_credentials_in_environment(), tempfile.TemporaryDirectory() as d:
        _load(os.path.join(d, "ekko.yaml"), text.encode("utf-8", "surrogatepass"), _check_text_error)


@FUZZ
@given(documents())
def test_random_documents_through_the_cli(doc):
    """`ekko hook uninstall` of a hook that is not there: every command loads the config first,
    this one then touches neither a store nor the network."""
    with no_credentials_in_environment(), tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ekko.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, allow_unicode=True)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["-c", path, "--json", "hook", "uninstall", "--no-reload",
                             "--dest", os.path.join(d, "no-hook")])
        assert code in (0, 2), err.getvalue()
        if code == 2:
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ekko: error: config: "), err.getvalue()
        for output in (out.getvalue(), err.getvalue()):
            assert SECRET not in output and str(SECRET_NUMBER) not in output
