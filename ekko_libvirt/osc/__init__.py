"""The OpenStack CLI plugin of ekko-api: `openstack ekko ...` (issue 19).

    plugin.py   what python-openstackclient loads (entry point openstack.cli.extension: ekko)
    client.py   the HTTP client of ekko-api's /v1, over the CLI's keystoneauth session
    v1/         the commands (entry point group openstack.ekko.v1): cliff Lister / ShowOne / Command
"""
