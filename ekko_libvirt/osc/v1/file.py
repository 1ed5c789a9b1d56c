"""openstack ekko file list|get: the files inside a backup's guest file system."""

import os
import sys

from osc_lib import exceptions
from osc_lib.command import command

from . import common


def _common_args(parser, path_required: bool):
    parser.add_argument("backup", metavar="<backup>", help="backup id")
    parser.add_argument("--disk", metavar="<disk>", help="which disk (e.g. vda); needed when it has several")
    parser.add_argument("--path", metavar="<path>", required=path_required, default=None if path_required else "/",
                        help="path in the guest" + ("" if path_required else " (default /)"))


class ListFile(command.Lister):
    """List a directory of a backup's guest file system."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        _common_args(parser, path_required=False)
        return parser

    def take_action(self, parsed_args):
        data = common.client(self.app).files(parsed_args.backup, parsed_args.path, parsed_args.disk)
        for r in data.get("refused", []):
            self.app.stderr.write(f"refused: {r}\n")
        return (("Name", "Type", "Size", "Mode", "Path"),
                common.rows(data["entries"], ("name", "type", "size", "mode", "path")))


class GetFile(command.Command):
    """Download one file of a backup's guest file system."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        _common_args(parser, path_required=True)
        parser.add_argument("--file", metavar="<file>", required=True,
                            help="where to write it ('-': standard output)")
        return parser

    def take_action(self, parsed_args):
        pieces = common.client(self.app).file_content(parsed_args.backup, parsed_args.path, parsed_args.disk)
        if parsed_args.file == "-":
            out = sys.stdout.buffer
            for p in pieces:
                out.write(p)
            out.flush()
            return
        tmp = parsed_args.file + ".part"
        try:
            with open(tmp, "wb") as f:          # the whole file or none: a broken stream leaves no half file
                for p in pieces:
                    f.write(p)
            os.replace(tmp, parsed_args.file)
        except OSError as e:
            raise exceptions.CommandError(f"cannot write {parsed_args.file}: {e.strerror}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
