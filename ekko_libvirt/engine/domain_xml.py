"""Pure: libvirt XML in (domain) and out (backup job, checkpoint). No libvirt calls here."""

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence
from xml.sax.saxutils import quoteattr

NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class DomainDisk:
    dev: str                 # target dev: vda, sdb
    source: str              # file or device path ('' for network disks)
    format: str              # driver type: qcow2, raw, ...
    kind: str                # file | block | network | volume

    @property
    def bitmap_capable(self) -> bool:
        return self.format == "qcow2" and self.kind == "file"


def parse_disks(xml: str) -> List[DomainDisk]:
    """Backup-able disks of a domain: device='disk', with a source, not read-only/shareable."""
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") != "disk" or d.find("readonly") is not None or d.find("shareable") is not None:
            continue
        target, driver, source = d.find("target"), d.find("driver"), d.find("source")
        if target is None or source is None:
            continue
        path = source.get("file") or source.get("dev") or ""
        disks.append(DomainDisk(target.get("dev"), path, (driver.get("type") if driver is not None else "raw") or "raw",
                                d.get("type", "file")))
    return disks


def parse_nova(xml: str) -> Dict[str, str]:
    """Nova's instance metadata (empty outside OpenStack). The domain UUID is the instance UUID."""
    root = ET.fromstring(xml)
    out = {"domain_uuid": root.findtext("uuid", ""), "domain_name": root.findtext("name", "")}
    inst = root.find(f"./metadata/{{{NOVA_NS}}}instance")
    if inst is None:
        return out
    out["instance_uuid"] = out["domain_uuid"]
    name = inst.findtext(f"{{{NOVA_NS}}}name")
    if name:
        out["instance_name"] = name
    owner = inst.find(f"{{{NOVA_NS}}}owner")
    if owner is not None:
        user, project = owner.find(f"{{{NOVA_NS}}}user"), owner.find(f"{{{NOVA_NS}}}project")
        if user is not None:
            out.update(user_id=user.get("uuid", ""), user_name=(user.text or "").strip())
        if project is not None:
            out.update(project_id=project.get("uuid", ""), project_name=(project.text or "").strip())
    return out


def project_namespace(nova: Dict[str, str]) -> Optional[str]:
    """Store namespace for a domain: its Nova project id, so projects never share one."""
    pid = nova.get("project_id")
    return _SAFE.sub("_", pid) if pid else None


def target_name(domain_name: str, dev: str) -> str:
    return f"{_SAFE.sub('_', domain_name)}.{dev}"


@dataclass(frozen=True)
class DiskBackupSpec:
    dev: str
    incremental_from: Optional[str]     # checkpoint name, or None for a full of this disk
    scratch: str                        # scratch qcow2 path
    checkpoint: bool                    # the new checkpoint covers this disk (qcow2 only)


def backup_xml(disks: Sequence[DiskBackupSpec], socket: str) -> str:
    lines = ["<domainbackup mode='pull'>", f"  <server transport='unix' socket={quoteattr(socket)}/>", "  <disks>"]
    for d in disks:
        mode = (f"backupmode='incremental' incremental={quoteattr(d.incremental_from)} exportbitmap={quoteattr('ekko-' + d.dev)}"
                if d.incremental_from else "backupmode='full'")
        lines.append(f"    <disk name={quoteattr(d.dev)} backup='yes' type='file' exportname={quoteattr(d.dev)} {mode}>"
                     f"<scratch file={quoteattr(d.scratch)}/></disk>")
    lines += ["  </disks>", "</domainbackup>"]
    return "\n".join(lines)


def checkpoint_xml(name: str, devs_with_bitmap: Sequence[str], other_devs: Sequence[str],
                   description: str = "ekko backup generation", created: Optional[int] = None) -> str:
    """Every disk named explicitly: an unlisted disk gets checkpoint='no' silently. `created`
    (Unix seconds) is required when redefining: libvirt refuses a checkpoint without it."""
    disks = [f"<disk name={quoteattr(d)} checkpoint='bitmap' bitmap={quoteattr(name)}/>" for d in devs_with_bitmap]
    disks += [f"<disk name={quoteattr(d)} checkpoint='no'/>" for d in other_devs]
    when = f"<creationTime>{int(created)}</creationTime>" if created is not None else ""
    return (f"<domaincheckpoint><name>{name}</name><description>{description}</description>{when}"
            f"<disks>{''.join(disks)}</disks></domaincheckpoint>")


def dirty_context(dev: str) -> str:
    return f"qemu:dirty-bitmap:ekko-{dev}"
