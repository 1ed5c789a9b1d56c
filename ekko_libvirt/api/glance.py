"""Restore a backup's disk as a Glance image: the OpenStack-native restore (a tenant boots a new
instance from it with Nova).

    POST   /v2/images                 the image record (queued), in the session's project
    PUT    /v2/images/{id}/file       the disk, streamed: restore/stream.py, chunked, never on disk here
    GET    /v2/images/{id}            active, and of the size that was sent
    DELETE /v2/images/{id}            on any failure after the POST: nothing half-done is left

Every segment is re-hashed before a byte of it is sent (restore/stream.py); a missing or damaged
one stops the upload, the image is deleted and the IntegrityError says which segment.
Glance is reached through a keystoneauth1 session (the caller's token in ekko-api; a NoAuth
session against a Glance without Keystone in the tests), its endpoint from the catalog
(service type `image`) unless `endpoint` is given.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Optional, Union

from ..errors import EkkoError
from ..restore import stream
from ..store import catalog
from ..store.factory import open_store

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 3600.0         # one PUT carries the whole disk; Glance answers only at its end
# The HTTP chunk of the upload. Measured against Glance 33 under gunicorn (192 MiB, NoAuth, file
# store): 64-256 KiB chunks cost its worker ~0.9 s of CPU, 1-4 MiB chunks (a segment, the zero
# pieces) or a Content-Length body ~1.5 s; its worker is the bottleneck of the whole restore.
PIECE = 256 * 1024


class GlanceError(EkkoError):
    """Glance refused or failed a step; `status` is its HTTP status (None: not reached)."""

    def __init__(self, step: str, status: Optional[int], detail: str, image_id: Optional[str] = None):
        self.step, self.status, self.detail, self.image_id = step, status, detail, image_id
        where = f" (image {image_id})" if image_id else ""
        super().__init__(f"glance: {step}{where} failed: " + (f"HTTP {status}: " if status else "") + detail)


@dataclass(frozen=True)
class ImageRequest:
    """What the image is called and holds. `properties` become the image's own (ekko_backup_id...)."""
    name: str
    disk_format: str                       # raw | qcow2
    properties: Dict[str, str]
    visibility: str = "private"


def upload_backup_as_image(cfg, store: str, namespace: Optional[str], manifest_key: str, image_name: str,
                           disk_format: str, session, endpoint: Optional[str] = None) -> str:
    """The disk of `manifest_key` (in namespace `namespace` of the store named `store`: "default" is
    `store:`) uploaded as a new image `image_name` -> its id. Raises before Glance is asked for a
    bad format or backup; after that, any failure deletes the image before it is raised."""
    if disk_format not in stream.FORMATS:
        raise GlanceError("upload", None, f"disk_format must be one of {', '.join(stream.FORMATS)}, "
                                          f"not {disk_format!r}")
    st = open_store(cfg.with_store(store), namespace)
    try:
        m = catalog.load(st, manifest_key)
        body = stream.disk_stream(st, m, disk_format, workers=cfg.workers + 1)   # checks before any POST
        req = ImageRequest(image_name, disk_format, image_properties(m))
        return upload(session, req, body, stream.stream_size(m, disk_format), endpoint)
    finally:
        st.close()


def upload(session, req: ImageRequest, body, size: int, endpoint: Optional[str] = None) -> str:
    """A new image of `req`, its file the iterable `body` of `size` bytes -> its id (active)."""
    glance = _Glance(session, endpoint)
    image_id = glance.create(req)
    try:
        glance.put_file(image_id, body)
        image = glance.show(image_id)
        if image.get("status") != "active" or image.get("size") != size:
            raise GlanceError("upload", None, f"the image is {image.get('status')} with {image.get('size')} bytes "
                                              f"where {size} were sent", image_id)
    except BaseException as e:      # interrupted too: no image half-uploaded outlives the restore
        glance.delete_quietly(image_id, e)
        raise
    log.info("image %s (%s, %d bytes) uploaded to Glance", image_id, req.disk_format, size)
    return image_id


def image_properties(m) -> Dict[str, str]:
    """Where the image came from, as its own properties (Glance's are strings of <= 255). Pure."""
    props = {"ekko_backup_id": m.backup_id, "ekko_target": m.target}
    if m.labels.get("instance_uuid"):
        props["ekko_instance_uuid"] = str(m.labels["instance_uuid"])
    return {k: v[:255] for k, v in props.items()}


class _Glance:
    """The four calls to Glance's v2 API, errors translated at this boundary."""

    def __init__(self, session, endpoint: Optional[str]):
        self.session = session
        self.kw: Dict[str, Any] = ({"endpoint_override": endpoint.rstrip("/")} if endpoint
                                   else {"endpoint_filter": {"service_type": "image", "interface": "public"}})

    def _call(self, step: str, method: str, path: str, image_id: Optional[str] = None, **kw):
        from keystoneauth1 import exceptions as ka
        try:
            r = self.session.request(path, method, raise_exc=False, **self.kw, **kw)
        except ka.EndpointNotFound as e:         # the operator's to fix: the catalog, not Glance
            raise GlanceError(step, None, f"no public endpoint of service type 'image' (Glance) in the "
                                          f"service catalog ({type(e).__name__}: {e})", image_id) from e
        except ka.ClientException as e:          # connection refused, timeout...
            raise GlanceError(step, None, f"{type(e).__name__}: {e}", image_id) from e
        if r.status_code >= 400:
            raise GlanceError(step, r.status_code, _detail(r), image_id)
        return r

    def create(self, req: ImageRequest) -> str:
        body = dict(req.properties, name=req.name, disk_format=req.disk_format, container_format="bare",
                    visibility=req.visibility)
        image_id = self._call("create image", "POST", "/v2/images", json=body).json()["id"]
        return str(image_id)

    def put_file(self, image_id: str, body) -> None:
        # A generator body goes out chunked (Transfer-Encoding: chunked): nothing is buffered.
        self._call("upload", "PUT", f"/v2/images/{image_id}/file", image_id, data=_pieces(body),
                   headers={"Content-Type": "application/octet-stream"}, timeout=UPLOAD_TIMEOUT)

    def show(self, image_id: str) -> dict:
        return dict(self._call("show image", "GET", f"/v2/images/{image_id}", image_id).json())

    def delete_quietly(self, image_id: str, cause: BaseException) -> None:
        """Delete the image a failed upload created; a failure here is logged (the upload's own
        error is the one raised) with what the operator has to remove."""
        try:
            self._call("delete image", "DELETE", f"/v2/images/{image_id}", image_id)
            log.info("image %s deleted: its upload failed (%s)", image_id, cause)
        except Exception as e:
            log.warning("image %s could not be deleted after its upload failed; delete it by hand: %s",
                        image_id, e)


def _pieces(body: Iterable[bytes], size: int = PIECE) -> Iterator[Union[bytes, memoryview]]:
    """`body` re-cut into HTTP chunks of at most `size` bytes (views: nothing is copied). An empty
    piece is dropped: sent as a chunk of length 0 it would end the upload there (the last-chunk)."""
    for chunk in body:
        if not len(chunk):
            continue
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for o in range(0, len(view), size):
            yield view[o:o + size]


def _detail(r) -> str:
    """Glance's message from an error response (JSON or its HTML-ish text), short."""
    try:
        data = r.json()
        msg = data.get("message") or data.get("error", {}).get("message") or str(data)
    except ValueError:
        msg = r.text
    return " ".join(str(msg).split())[:300]
