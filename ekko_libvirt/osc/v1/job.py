"""openstack ekko job show"""

from osc_lib.command import command

from . import common


class ShowJob(command.ShowOne):
    """Show a job (backup now, restore) and its state."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument("job", metavar="<job>", help="job id")
        return parser

    def take_action(self, parsed_args):
        job = common.client(self.app).job(parsed_args.job)
        return common.show(job, ("id", "kind", "state", "host", "result", "error"),
                           ("ID", "Kind", "State", "Host", "Result", "Error"))
