"""openstack ekko instance list"""

from osc_lib.command import command

from . import common


class ListInstance(command.Lister):
    """List the instances of your project that have backups."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("--all-projects", action="store_true", help="every project's instances (admin)")
        parser.add_argument("--limit", type=int, metavar="<n>", help="at most this many")
        return parser

    def take_action(self, parsed_args):
        items = common.client(self.app).instances(parsed_args.all_projects, parsed_args.limit)
        for i in items:
            last = common.sub(i, "last_backup")
            i["last_backup_id"], i["last_backup_created"] = last.get("id"), last.get("created")
            i["last_result"] = last.get("result")
        keys = ["id", "name", "last_backup_id", "last_backup_created", "last_result", "backups", "protected"]
        labels = ["ID", "Name", "Last Backup", "Last Backup Created", "Last Result", "Backups", "Protected"]
        if parsed_args.all_projects:
            keys.append("project_id")
            labels.append("Project")
        return labels, common.rows(items, keys)
