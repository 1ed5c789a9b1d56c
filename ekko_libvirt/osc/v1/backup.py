"""openstack ekko backup list|show|create|delete|protect|unprotect|restore"""

import logging

from osc_lib import exceptions
from osc_lib.cli import format_columns
from osc_lib.command import command

from . import common

log = logging.getLogger(__name__)

SHOW_KEYS = ("id", "instance_id", "instance_name", "project_id", "created", "kind", "reason", "result",
             "consistency", "protected", "disks")
SHOW_LABELS = ("ID", "Instance ID", "Instance Name", "Project ID", "Created", "Kind", "Reason", "Result",
               "Consistency", "Protected", "Disks")
JOB_KEYS = ("id", "kind", "state", "host", "result", "error")
JOB_LABELS = ("ID", "Kind", "State", "Host", "Result", "Error")


def _job_show(job):
    return common.show(dict({"kind": None, "result": None, "error": None}, **job), JOB_KEYS, JOB_LABELS)


def _wait_args(parser):
    parser.add_argument("--wait", action="store_true", help="wait until the job ends (exit 1 if it fails)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="<seconds>",
                        help="how long --wait waits (default 3600)")


class ListBackup(command.Lister):
    """List the backups of an instance, newest first."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("instance", metavar="<instance>", help="Nova instance UUID")
        parser.add_argument("--all-projects", action="store_true", help="look in every project (admin)")
        parser.add_argument("--limit", type=int, metavar="<n>", help="at most this many")
        return parser

    def take_action(self, parsed_args):
        items = common.client(self.app).backups(parsed_args.instance, parsed_args.all_projects, parsed_args.limit)
        for b in items:
            b["consistency_level"] = common.sub(b, "consistency").get("level")
        return (("ID", "Created", "Kind", "Result", "Consistency", "Protected"),
                common.rows(items, ("id", "created", "kind", "result", "consistency_level", "protected")))


class ShowBackup(command.ShowOne):
    """Show one backup: its instance, kind, reason, consistency, protection, disks and their sizes."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("backup", metavar="<backup>", help="backup id")
        parser.add_argument("--all-projects", action="store_true", help="look in every project (admin)")
        return parser

    def take_action(self, parsed_args):
        b = common.client(self.app).backup(parsed_args.backup, parsed_args.all_projects)
        b["consistency"] = format_columns.DictColumn(common.sub(b, "consistency"))
        disks = b.get("disks")
        b["disks"] = format_columns.ListDictColumn([d for d in disks if isinstance(d, dict)]
                                                   if isinstance(disks, list) else [])
        return common.show(b, SHOW_KEYS, SHOW_LABELS)


class CreateBackup(command.ShowOne):
    """Back an instance up now (on the host where it runs); shows the job."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("instance", metavar="<instance>", help="Nova instance UUID")
        parser.add_argument("--force-full", action="store_true", help="a full backup, not an incremental")
        _wait_args(parser)
        return parser

    def take_action(self, parsed_args):
        c = common.client(self.app)
        job = c.create_backup(parsed_args.instance, parsed_args.force_full)
        if parsed_args.wait:
            job = common.wait_job(c, job, parsed_args.timeout)
        return _job_show(job)


class DeleteBackup(command.Command):
    """Delete backups (never the newest of a disk, never a protected one)."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("backups", metavar="<backup>", nargs="+", help="backup id(s)")
        return parser

    def take_action(self, parsed_args):
        c = common.client(self.app)
        failed = []
        for b in parsed_args.backups:
            try:
                c.delete_backup(b)
            except exceptions.CommandError as e:
                log.error("%s", e)
                failed.append(b)
        if failed:
            raise exceptions.CommandError(f"{len(failed)} of {len(parsed_args.backups)} backups not deleted: "
                                          f"{', '.join(failed)}")


class _SetProtection(command.Command):
    protected = True

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("backups", metavar="<backup>", nargs="+", help="backup id(s)")
        return parser

    def take_action(self, parsed_args):
        c = common.client(self.app)
        for b in parsed_args.backups:
            c.set_protected(b, self.protected)


class ProtectBackup(_SetProtection):
    """Protect backups: retention and delete keep them."""
    protected = True


class UnprotectBackup(_SetProtection):
    """Remove the protection of backups."""
    protected = False


class RestoreBackup(command.ShowOne):
    """Restore a backup's disk as a Glance image in your project; shows the job (its result: the image id)."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("backup", metavar="<backup>", help="backup id")
        parser.add_argument("--image-name", required=True, metavar="<name>", help="name of the new image")
        parser.add_argument("--disk", metavar="<disk>", help="which disk (e.g. vda); needed when it has several")
        parser.add_argument("--disk-format", choices=("qcow2", "raw"), help="image format (default qcow2)")
        _wait_args(parser)
        return parser

    def take_action(self, parsed_args):
        c = common.client(self.app)
        job = c.restore(parsed_args.backup, parsed_args.image_name, parsed_args.disk, parsed_args.disk_format)
        if parsed_args.wait:
            job = common.wait_job(c, job, parsed_args.timeout)
        return _job_show(job)
