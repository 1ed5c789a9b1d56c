"""The `store:` section of a swift store and the ST_* / OS_* variables: which wins (README
"Configuration", store/swift.py env_values), and what a bad value in it gives. Pure: no Swift."""

import pytest

from ekko_libvirt import config
from ekko_libvirt.errors import ConfigError
from ekko_libvirt.store.swift import swift_config

TEMPAUTH = "http://swift.example:8080/auth/v1.0"
KEYSTONE = "https://keystone.example:5000/v3"
OPENRC = {"OS_AUTH_URL": KEYSTONE, "OS_USERNAME": "os-user", "OS_PASSWORD": "os-pass", "OS_PROJECT_NAME": "proj",
          "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default", "OS_IDENTITY_API_VERSION": "3"}


def test_st_variables_fill_in_what_the_file_leaves_out_and_the_file_wins_key_by_key():
    # the README's promise: auth_url in the file, ST_USER/ST_KEY in the environment
    c = swift_config({"auth_url": TEMPAUTH}, environ={"ST_USER": "acct:user", "ST_KEY": "st-key"})
    assert (c.auth_url, c.auth_version, c.user, c.key) == (TEMPAUTH, "1", "acct:user", "st-key")
    env = {"ST_AUTH": "http://other:8080/auth/v1.0", "ST_USER": "env-user", "ST_KEY": "env-key"}
    c = swift_config({"auth_url": TEMPAUTH, "user": "file-user"}, environ=env)
    assert (c.auth_url, c.user, c.key) == (TEMPAUTH, "file-user", "env-key")
    c = swift_config({"auth_url": TEMPAUTH, "user": "file-user", "key": "file-key"}, environ=env)
    assert (c.user, c.key) == ("file-user", "file-key")
    c = swift_config({"user": "file-user"}, environ=env)          # the URL from ST_AUTH, with version 1
    assert (c.auth_url, c.auth_version, c.user, c.key) == (env["ST_AUTH"], "1", "file-user", "env-key")


def test_the_url_and_its_version_travel_together():
    # an openrc sourced (OS_IDENTITY_API_VERSION=3) does not turn the file's tempauth URL into keystone
    c = swift_config({"auth_url": TEMPAUTH}, environ=dict(OPENRC, ST_USER="u", ST_KEY="k"))
    assert (c.auth_version, c.user, c.key) == ("1", "u", "k")
    # a Keystone URL in the file without auth_version is version 3; its user and key from OS_*
    c = swift_config({"auth_url": KEYSTONE + "/"}, environ=dict(OPENRC, ST_USER="u", ST_KEY="k"))
    assert (c.auth_version, c.user, c.key, c.project_name) == ("3", "os-user", "os-pass", "proj")
    # the file's auth_version is the file's
    c = swift_config({"auth_url": "https://ks.example/identity", "auth_version": 3}, environ=OPENRC)
    assert (c.auth_version, c.user) == ("3", "os-user")
    # from the environment only: ST_AUTH wins over OS_AUTH_URL, each with its own version variable
    c = swift_config({}, environ=dict(OPENRC, ST_AUTH=TEMPAUTH, ST_USER="u", ST_KEY="k"))
    assert (c.auth_url, c.auth_version, c.user) == (TEMPAUTH, "1", "u")
    c = swift_config({}, environ=OPENRC)
    assert (c.auth_url, c.auth_version, c.user, c.key) == (KEYSTONE, "3", "os-user", "os-pass")


def test_v3_prefers_os_variables_and_falls_back_to_st():
    c = swift_config({"auth_url": KEYSTONE, "project_name": "p"}, environ={"ST_USER": "u", "ST_KEY": "k"})
    assert (c.auth_version, c.user, c.key) == ("3", "u", "k")
    c = swift_config({"auth_url": TEMPAUTH}, environ={"OS_USERNAME": "u", "OS_PASSWORD": "k"})
    assert (c.auth_version, c.user, c.key) == ("1", "u", "k")


def test_credentials_do_not_mix_kinds():
    app = {"OS_APPLICATION_CREDENTIAL_ID": "app-id", "OS_APPLICATION_CREDENTIAL_SECRET": "app-secret"}
    # the file's user and key: the environment's application credential is not taken
    c = swift_config({"auth_url": KEYSTONE, "user": "u", "key": "k", "project_name": "p"}, environ=app)
    assert (c.user, c.key, c.application_credential_id) == ("u", "k", None)
    # the file's application credential id: its secret may come from the environment, not a password
    c = swift_config({"auth_url": KEYSTONE, "application_credential_id": "file-id"},
                     environ=dict(app, OS_USERNAME="u", OS_PASSWORD="k"))
    assert (c.application_credential_id, c.application_credential_secret, c.user, c.key) == (
        "file-id", "app-secret", "", "")
    # nothing in the file: the environment's application credential
    c = swift_config({}, environ=dict(app, OS_AUTH_URL=KEYSTONE))
    assert c.application_credential_id == "app-id"


def test_config_load_checks_the_swift_section_with_the_environment(monkeypatch):
    for name in ("ST_AUTH", "ST_USER", "ST_KEY", "OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    section = {"type": "swift", "auth_url": TEMPAUTH}
    with pytest.raises(ConfigError) as e:            # fails when loaded, not when first used
        config.build({"store": section})
    assert e.value.key == "store.user"
    monkeypatch.setenv("ST_USER", "acct:user")
    monkeypatch.setenv("ST_KEY", "st-key-value")
    cfg = config.build({"store": section})
    assert cfg.store.type == "swift" and "st-key-value" not in repr(cfg)


SECRET = "s3cr3t-VALUE-x9"


@pytest.mark.parametrize("field", ["key", "application_credential_secret"])
@pytest.mark.parametrize("value", [[SECRET], {"k": SECRET}, 987654321, 98765.4321, True, None,
                                   SECRET + "\n", "\t" + SECRET, "x" * 5000])
def test_a_secret_that_is_not_a_string_is_named_never_shown(field, value):
    section = {"type": "swift", "auth_url": KEYSTONE, "auth_version": "3", "project_name": "p"}
    if field == "key":
        section.update(user="u", key=value)
    else:
        section.update(application_credential_id="id", application_credential_secret=value)
    with pytest.raises(ConfigError) as e:
        config.build({"store": section})
    msg = str(e.value)
    assert e.value.key == f"store.{field}", msg
    assert "\n" not in msg and len(msg) < 200
    for shown in (SECRET, "987654321", "98765", "xxxxxxxxxx"):
        assert shown not in msg


@pytest.mark.parametrize("section, field", [
    ({"auth_url": ["http://h/auth/v1.0"]}, "store.auth_url"),
    ({"auth_url": "http://acct:" + SECRET + "@h:8080/auth/v1.0"}, "store.auth_url"),
    ({"auth_url": "http://[::1/auth"}, "store.auth_url"),
    ({"auth_url": "http://h:99999/auth/v1.0"}, "store.auth_url"),
    ({"storage_url": "https://u:" + SECRET + "@h/v1/AUTH_x"}, "store.storage_url"),
    ({"user": ["a"]}, "store.user"),
    ({"user": 12}, "store.user"),
    ({"auth_version": [1]}, "store.auth_version"),
    ({"auth_version": True}, "store.auth_version"),
    ({"auth_version": "2"}, "store.auth_version"),
    ({"retries": "5"}, "store.retries"),
    ({"retries": 10 ** 30}, "store.retries"),
    ({"retries": 2.5}, "store.retries"),
    ({"threads": 0}, "store.threads"),
    ({"timeout": float("inf")}, "store.timeout"),
    ({"timeout": float("nan")}, "store.timeout"),
    ({"starting_backoff": "1"}, "store.starting_backoff"),
    ({"max_backoff": -1}, "store.max_backoff"),
    ({"insecure": "no"}, "store.insecure"),
    ({"listing_page_size": 10 ** 6}, "store.listing_page_size"),
    ({"container_prefix": ["ekko"]}, "store.container_prefix"),
    ({"container_prefix": "a/b"}, "store.container_prefix"),
    ({"container": 5}, "store.container"),
    ({"container": "a", "container_prefix": "b"}, "store.container"),
    ({"project_name": {"a": 1}}, "store.project_name"),
    ({"interface": "private"}, "store.interface"),
    ({"region_name": "a\x00b"}, "store.region_name"),
    ({"password": SECRET}, "store.password"),
    ({"token": SECRET}, "store.token"),
    ({1: SECRET}, "store.1"),
])
def test_every_swift_field_has_a_type(section, field):
    full = {"type": "swift", "auth_url": TEMPAUTH, "user": "acct:user", "key": "k3y"}
    full.update(section)
    with pytest.raises(ConfigError) as e:
        config.build({"store": full})
    assert e.value.key == field, str(e.value)
    assert SECRET not in str(e.value) and "\n" not in str(e.value)
