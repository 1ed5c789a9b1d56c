"""serve: {cache: SIZE} in the config, and `ekko serve --cache` checked against the same bounds."""

import pytest

from ekko_libvirt import config, units
from ekko_libvirt.cli import serve as cli_serve
from ekko_libvirt.errors import ConfigError, UsageError


def test_default_and_sizes():
    assert config.build({}).serve.cache == units.DEFAULT_SERVE_CACHE == 64 * units.MiB
    assert config.build({"serve": None}).serve.cache == units.DEFAULT_SERVE_CACHE
    assert config.build({"serve": {}}).serve.cache == units.DEFAULT_SERVE_CACHE
    assert config.build({"serve": {"cache": "256MiB"}}).serve.cache == 256 * units.MiB
    assert config.build({"serve": {"cache": 3 * units.MiB}}).serve.cache == 3 * units.MiB
    assert config.build({"serve": {"cache": "1MiB"}}).serve.cache == units.MIN_SERVE_CACHE
    assert config.build({"serve": {"cache": "64GiB"}}).serve.cache == units.MAX_SERVE_CACHE


@pytest.mark.parametrize("raw, key, words", [
    ({"serve": {"cache": "lots"}}, "serve.cache", "not a size: 'lots'"),
    ({"serve": {"cache": -1}}, "serve.cache", "never negative"),
    ({"serve": {"cache": 0}}, "serve.cache", "must be from 1.0 MiB to 64.0 GiB"),
    ({"serve": {"cache": "1048575"}}, "serve.cache", "got 1048575"),
    ({"serve": {"cache": "65GiB"}}, "serve.cache", "must be from 1.0 MiB to 64.0 GiB"),
    ({"serve": {"cache": True}}, "serve.cache", "must be a size"),
    ({"serve": {"cache": [64]}}, "serve.cache", "must be a size"),
    ({"serve": {"cache_mib": 64}}, "serve.cache_mib", "unknown key (known: cache)"),
    ({"serve": "64MiB"}, "serve", "must be a mapping"),
])
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as e:
        config.build(raw)
    assert e.value.key == key and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size, ok", [(units.MiB, True), (units.MiB - 1, False), (0, False),
                                      (64 * units.GiB, True), (64 * units.GiB + 1, False)])
def test_cache_option_has_the_config_bounds(size, ok):
    if ok:
        assert cli_serve._cache(size) == size
    else:
        with pytest.raises(UsageError, match=r"^--cache: must be from 1.0 MiB to 64.0 GiB"):
            cli_serve._cache(size)
