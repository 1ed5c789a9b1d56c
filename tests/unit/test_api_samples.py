"""The committed samples of ekko-api's configuration and policy (packaging/) are what the
generators make from the code today: an option or a rule added, renamed or re-defaulted without
regenerating them fails here. Regenerate with the commands in the README (Tenants on OpenStack)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _read(name: str) -> str:
    with open(os.path.join(ROOT, "packaging", name)) as f:
        return f.read()


def test_config_sample_is_the_generated_one():
    out = subprocess.run([sys.executable, "-m", "oslo_config.generator", "--namespace", "ekko.api",
                          "--namespace", "ekko.api.bus"], capture_output=True, text=True, check=True).stdout
    assert out == _read("ekko-api.conf.sample"), \
        "packaging/ekko-api.conf.sample is stale: regenerate it (README, Tenants on OpenStack)"
    for opt in ("#ekko_config = /etc/ekko/ekko.yaml", "#index_path = ", "#call_timeout = ", "[keystone_authtoken]"):
        assert opt in out, opt


def test_policy_sample_is_the_generated_one(tmp_path):
    from ekko_libvirt.api import policy
    target = tmp_path / "policy.yaml"
    subprocess.run([os.path.join(BIN, "oslopolicy-sample-generator"), "--namespace", "ekko",
                    "--output-file", str(target)], capture_output=True, text=True, check=True)
    out = target.read_text()
    assert out == _read("ekko-api-policy.yaml.sample"), \
        "packaging/ekko-api-policy.yaml.sample is stale: regenerate it (README, Tenants on OpenStack)"
    for rule in policy.RULES:
        assert f'#"{rule.name}": "{rule.check_str}"' in out, rule.name
