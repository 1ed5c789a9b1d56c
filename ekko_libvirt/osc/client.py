"""ekko-api's /v1 over HTTP: one method per endpoint, answers as the API's JSON.

The session is the `openstack` CLI's keystoneauth1 Session (it adds X-Auth-Token); any object
with keystoneauth's `request(url, method, raise_exc=..., ...)` does (the unit tests' fake).
An answer other than 2xx raises ApiError with the API's own message; a connection that fails
raises ApiError with code None."""

import urllib.parse
from typing import Any, Dict, Iterator, List, Optional

from osc_lib import exceptions

PAGE = 1000          # ekko-api's page_max default: the fewest round trips


class ApiError(exceptions.CommandError):
    """ekko-api refused (code: its HTTP status) or could not be reached (code None)."""

    def __init__(self, code: Optional[int], message: str, method: str = "", path: str = ""):
        self.code, self.message, self.method, self.path = code, message, method, path
        where = f"{method} {path}".strip()
        text = f"ekko-api answered {code} to {where}: {message}" if code else f"ekko-api: {where}: {message}"
        super().__init__(text)


class Client:
    def __init__(self, session: Any, endpoint: str):
        if not endpoint:
            raise ApiError(None, "no endpoint: give --os-ekko-url or register the ekko-backup service in the "
                                 "catalog")
        base = endpoint.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.session = session

    # -- transport ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, params: Optional[Dict[str, Any]] = None,
                 body: Optional[Dict[str, Any]] = None, stream: bool = False) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        kwargs: Dict[str, Any] = {"raise_exc": False, "headers": {"Accept": "application/json"}}
        if body is not None:
            kwargs["json"] = body
        if stream:
            kwargs["stream"] = True
        if method == "GET":
            # ekko-api's gunicorn closes a keep-alive connection idle for 2 s, the interval --wait polls
            # at: a GET sent on the pooled connection as it closes is reset (seen in test_tenant_e2e).
            # A GET asks again once on a new connection; a POST, PUT or DELETE never: the API may have
            # acted on it.
            kwargs["connect_retries"] = 1
        try:
            resp = self.session.request(url, method, **kwargs)
        except Exception as e:      # keystoneauth's ConnectFailure, SSLError, ...: the message, not a traceback
            if isinstance(e, ApiError):
                raise
            raise ApiError(None, f"cannot reach {self.base}: {type(e).__name__}: {e}", method, path) from e
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _message(resp), method, path)
        return resp

    def _json(self, method: str, path: str, params: Optional[Dict[str, Any]] = None,
              body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        resp = self._request(method, path, params, body)
        if resp.status_code == 204 or not resp.content:
            return {}
        try:
            data = resp.json()
        except ValueError as e:
            raise ApiError(resp.status_code, "the answer is not JSON", method, path) from e
        if not isinstance(data, dict):
            raise ApiError(resp.status_code, "the answer is not a JSON object", method, path)
        return data

    def _object(self, method: str, path: str, key: str, params: Optional[Dict[str, Any]] = None,
                body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The answer's `key`, which must be a JSON object (an answer of another shape: ApiError)."""
        value = self._json(method, path, params, body).get(key)
        if not isinstance(value, dict):
            raise ApiError(None, f"the answer has no object {key!r}", method, path)
        return value

    def _pages(self, path: str, key: str, limit: Optional[int] = None,
               params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Every item of a paginated list (following `next`), or the first `limit`."""
        out: List[Dict[str, Any]] = []
        marker = None
        while limit is None or len(out) < limit:
            page = min(PAGE, limit - len(out)) if limit is not None else PAGE
            data = self._json("GET", path, dict(params or {}, limit=page, marker=marker))
            items = data.get(key)
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ApiError(None, f"the answer has no list of objects {key!r}", "GET", path)
            out.extend(items)
            nxt = data.get("next")
            if nxt is not None and (not isinstance(nxt, str) or nxt == marker):
                raise ApiError(None, f"the answer's 'next' is not a new marker: {str(nxt)[:64]!r}", "GET", path)
            if not nxt or len(items) < page:      # ekko-api gives `next` only with a full page
                break
            marker = nxt
        return out if limit is None else out[:limit]

    # -- the API -----------------------------------------------------------------------------------
    def instances(self, all_projects: bool = False, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self._pages("/instances", "instances", limit, {"all_projects": 1 if all_projects else None})

    def backups(self, instance_id: str, all_projects: bool = False,
                limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self._pages(f"/instances/{_seg(instance_id)}/backups", "backups", limit,
                           {"all_projects": 1 if all_projects else None})

    def backup(self, backup_id: str, all_projects: bool = False) -> Dict[str, Any]:
        return self._object("GET", f"/backups/{_seg(backup_id)}", "backup",
                            {"all_projects": 1 if all_projects else None})

    def create_backup(self, instance_id: str, force_full: bool = False) -> Dict[str, Any]:
        return self._object("POST", f"/instances/{_seg(instance_id)}/backups", "job",
                            body={"force_full": force_full})

    def delete_backup(self, backup_id: str) -> None:
        self._json("DELETE", f"/backups/{_seg(backup_id)}")

    def set_protected(self, backup_id: str, protected: bool) -> None:
        self._json("PUT", f"/backups/{_seg(backup_id)}/protection", body={"protected": protected})

    def restore(self, backup_id: str, image_name: str, disk: Optional[str] = None,
                disk_format: Optional[str] = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {"image_name": image_name}
        if disk is not None:
            body["disk"] = disk
        if disk_format is not None:
            body["disk_format"] = disk_format
        return self._object("POST", f"/backups/{_seg(backup_id)}/restore", "job", body=body)

    def job(self, job_id: str) -> Dict[str, Any]:
        return self._object("GET", f"/jobs/{_seg(job_id)}", "job")

    def files(self, backup_id: str, path: str = "/", disk: Optional[str] = None) -> Dict[str, Any]:
        """{"path", "entries": [objects], "refused": [texts]} of one directory."""
        where = f"/backups/{_seg(backup_id)}/files"
        data = self._json("GET", where, {"disk": disk, "path": path})
        entries, refused = data.get("entries"), data.get("refused", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) \
                or not isinstance(refused, list):
            raise ApiError(None, "the answer has no list of objects 'entries'", "GET", where)
        return data

    def file_content(self, backup_id: str, path: str, disk: Optional[str] = None,
                     chunk: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes as the API streams them. A stream that breaks is an ApiError (requests'
        own errors are OSErrors: a caller must not take them for its own write failing)."""
        where = f"/backups/{_seg(backup_id)}/files/content"
        resp = self._request("GET", where, {"disk": disk, "path": path}, stream=True)   # refusals raise here
        return _stream(resp, chunk, path, where)

    def usage(self) -> Dict[str, Any]:
        return self._object("GET", "/usage", "usage")


def _stream(resp: Any, chunk: int, path: str, where: str) -> Iterator[bytes]:
    """The body in pieces; a stream that breaks is an ApiError saying after how many bytes."""
    got = 0
    try:
        for piece in resp.iter_content(chunk):
            got += len(piece)
            yield piece
    except Exception as e:  # noqa: BLE001 - whatever broke the stream: the user's message says what and where
        raise ApiError(None, f"the download of {path} broke after {got} bytes: {type(e).__name__}: {e}",
                       "GET", where) from e
    finally:
        resp.close()


def _seg(text: str) -> str:
    """One path segment: an id with a '/' or '..' in it stays one segment (the API answers 404)."""
    return urllib.parse.quote(text, safe="")


def _message(resp: Any) -> str:
    """The API's error message ({"error": {"message"}}), else the start of the body (auth_token's
    own 401/503 answers are text)."""
    try:
        data = resp.json()
        msg = data["error"]["message"]
        if isinstance(msg, str):
            return msg
    except (ValueError, KeyError, TypeError):
        pass
    text = " ".join((getattr(resp, "text", "") or "").split())
    return text[:300] or getattr(resp, "reason", "") or "no message"
