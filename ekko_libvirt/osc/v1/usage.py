"""openstack ekko usage show"""

from osc_lib.command import command

from . import common


class ShowUsage(command.ShowOne):
    """Show your project's backup usage: logical bytes, stored bytes after deduplication, objects."""

    def take_action(self, parsed_args):
        u = common.client(self.app).usage()
        return common.show(u, ("logical_bytes", "stored_bytes", "objects"),
                           ("Logical Bytes", "Stored Bytes", "Objects"))

