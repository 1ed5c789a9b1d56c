"""Pure: libvirt XML in (domain) and out (backup job, checkpoint, a restored domain). No libvirt calls here."""

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
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
        dev = target.get("dev") if target is not None else None    # libvirt's schema requires it
        if dev is None or source is None:
            continue
        path = source.get("file") or source.get("dev") or ""
        disks.append(DomainDisk(dev, path, (driver.get("type") if driver is not None else "raw") or "raw",
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


def requires_quiesce(xml: str) -> bool:
    """Whether the domain asks for quiesced (frozen) backups: an element `os_require_quiesce`
    (any namespace) under <metadata> reading yes/true/1, as a Nova deployment can put the image
    property there (nova:instance has no image properties of its own)."""
    meta = ET.fromstring(xml).find("./metadata")
    if meta is None:
        return False
    return any(el.tag.rpartition("}")[2] == "os_require_quiesce"
               and (el.text or el.get("value") or "").strip().lower() in ("yes", "true", "1")
               for el in meta.iter())


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
        mode = (f"backupmode='incremental' incremental={quoteattr(d.incremental_from)} "
                f"exportbitmap={quoteattr('ekko-' + d.dev)}"
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


def without_parent(checkpoint: str) -> str:
    """A checkpoint's XML without its <parent>. libvirt records as parent whatever checkpoint was
    current when ours was made, a user's too; once that one is deleted, a redefinition naming it
    fails ("parent ... not found") although our bitmap is intact. The chain lives in our
    manifests, not in libvirt's parent links, so we never redefine one."""
    root = ET.fromstring(checkpoint)
    for p in root.findall("parent"):
        root.remove(p)
    return ET.tostring(root, encoding="unicode")


def dirty_context(dev: str) -> str:
    return f"qemu:dirty-bitmap:ekko-{dev}"


# --- the domain XML kept with a backup, and a new domain from it -------------------------------

NOVA_NS_PREFIX = "http://openstack.org/xmlns/libvirt/nova/"
SECRET_ATTRS = ("passwd", "password")      # <graphics passwd=...>; libvirt omits it without XML_SECURE
ET.register_namespace("nova", NOVA_NS)


def storable_xml(xml: str) -> str:
    """The (inactive) domain XML as a backup keeps it: with no secret values. Secret
    *references* (<auth><secret uuid=.../>, <encryption>) stay: they name, not hold, a secret."""
    root = ET.fromstring(xml)
    for el in root.iter():
        for a in SECRET_ATTRS:
            el.attrib.pop(a, None)
    return ET.tostring(root, encoding="unicode")


def restored_domain_xml(xml: str, name: str, uuid: str, disks: Dict[str, Tuple[str, str]]) -> Tuple[str, List[str]]:
    """A new domain from the XML stored with a backup. -> (XML, notes on what changed).

        name, uuid      the new ones; <sysinfo> entries that held the old UUID get the new one
                        (libvirt refuses a smbios UUID that differs from the domain's)
        Nova metadata   removed: the new domain is no Nova instance
        disks           `disks` maps a target dev to (restored file, format): its <source> becomes
                        that file; backing chain, encryption, auth dropped (the restored image is
                        one plain file). Other writable disks are removed (they would share the
                        original's images); CD-ROMs and floppies stay.
        interfaces      MAC, target dev and Neutron/OVS interfaceid removed: libvirt makes new
                        ones, so the copy never takes the original's network identity
        serial/console  file-backed ones (Nova's console.log) become pty
    """
    root = ET.fromstring(xml)
    notes: List[str] = []
    old_uuid = (root.findtext("uuid") or "").strip().lower()
    root.attrib.pop("id", None)
    _set_child_text(root, "name", name, 0)
    _set_child_text(root, "uuid", uuid, 1)
    for entry in root.iter("entry"):
        if old_uuid and (entry.text or "").strip().lower() == old_uuid:
            entry.text = uuid
    meta = root.find("metadata")
    if meta is not None:
        for el in list(meta):
            if el.tag.startswith("{" + NOVA_NS_PREFIX):
                meta.remove(el)
                notes.append("Nova metadata removed")
        if len(meta) == 0:
            root.remove(meta)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    seen = set()
    for d in list(devices.findall("disk")):
        target = d.find("target")
        dev = target.get("dev") if target is not None else None
        if dev in disks:
            _point_disk_at(d, *disks[dev])
            seen.add(dev)
        elif d.get("device", "disk") not in ("cdrom", "floppy"):
            devices.remove(d)
            notes.append(f"disk {dev or '?'} is not in the restore: removed from the new domain")
    missing = sorted(set(disks) - seen)
    if missing:
        raise ValueError(f"the domain XML has no disk {', '.join(missing)}")
    for iface in devices.findall("interface"):
        for tag in ("mac", "target", "alias"):
            for el in iface.findall(tag):
                iface.remove(el)
        for params in iface.findall("virtualport/parameters"):
            params.attrib.pop("interfaceid", None)
    if devices.findall("interface"):
        notes.append("network interfaces get new MAC addresses and no Neutron port identity")
    for tag in ("serial", "console"):
        for c in devices.findall(tag):
            if c.get("type") == "file":
                c.set("type", "pty")
                for src in c.findall("source"):
                    c.remove(src)
    return ET.tostring(root, encoding="unicode"), notes


def _set_child_text(root, tag: str, text: str, index: int) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(index, el)
    el.text = text


def _point_disk_at(d, path: str, fmt: str) -> None:
    d.set("type", "file")
    for tag in ("source", "backingStore", "encryption", "auth", "alias", "mirror"):
        for el in d.findall(tag):
            d.remove(el)
    drv = d.find("driver")
    if drv is None:
        drv = ET.Element("driver", {"name": "qemu"})
        d.insert(0, drv)
    drv.set("type", fmt)
    src = ET.Element("source", {"file": path})
    d.insert(list(d).index(drv) + 1, src)
