"""The `openstack` CLI's hook for ekko (entry point group openstack.cli.extension: ekko).

python-openstackclient reads API_NAME, API_VERSION_OPTION, API_VERSIONS, calls
build_option_parser() when it builds its global options and make_client() the first time a
command uses `self.app.client_manager.ekko`.

The endpoint: --os-ekko-url (or OS_EKKO_URL) when given, else the token's service catalog
(service type SERVICE_TYPE, the CLI's region and interface)."""

import argparse
from typing import Any

from osc_lib import utils

from .client import Client

API_NAME = "ekko"
API_VERSION_OPTION = "os_ekko_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = {"1": "ekko_libvirt.osc.client.Client"}
SERVICE_TYPE = "ekko-backup"       # not "backup": the service-types authority gives that one to Freezer


def make_client(instance: Any) -> Client:
    """The Client of ekko-api for osc-lib's ClientManager `instance`."""
    url = instance.get_configuration().get("ekko_url")   # --os-ekko-url: openstack.config drops "os_"
    if not url:
        url = instance.get_endpoint_for_service_type(SERVICE_TYPE, region_name=instance.region_name,
                                                     interface=instance.interface)
    return Client(instance.session, url)


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--os-ekko-api-version", metavar="<ekko-api-version>",
                        default=utils.env("OS_EKKO_API_VERSION"),
                        help=f"ekko API version, default={DEFAULT_API_VERSION} (Env: OS_EKKO_API_VERSION)")
    parser.add_argument("--os-ekko-url", metavar="<url>", default=utils.env("OS_EKKO_URL"),
                        help="ekko-api's URL instead of the service catalog's "
                             f"{SERVICE_TYPE} endpoint (Env: OS_EKKO_URL)")
    return parser
