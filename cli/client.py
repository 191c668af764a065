"""A small Python client for the Atelier HTTP API; the CLI and the demo use it, and so can users.

client = AtelierClient("http://127.0.0.1:8000", api_key)   # or AtelierClient.from_env()
ds = client.upload_dataset([Path("photos.zip")])  # or client.upload_folder(Path("photos/")).dataset
job = client.create_job({...}, idempotency_key="my-run-1")
job = client.wait(job["id"], on_progress=print)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cli.sse import iter_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# What a dataset folder may hold (the server decides what it accepts; other image kinds are sent so
# its report can say why they are refused).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
CAPTION_SUFFIX = ".txt"
_FILENAME = re.compile(r'filename="?([^";]+)"?')


class ApiProblem(Exception):
    """An RFC 9457 problem returned by the API."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = body.get("code", "unknown")
        self.detail = str(body.get("detail", body))
        super().__init__(f"{status} {self.code}: {self.detail}")


class StreamUnavailable(Exception):
    """The server answered an event-stream request with something else (a proxy, an older server)."""


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of a job: a job event (`data` is the event) or a `progress` snapshot."""

    type: str
    data: dict[str, Any]
    id: int | None


@dataclass(frozen=True)
class FolderUpload:
    """What `upload_folder` sent and what it left out."""

    dataset: dict[str, Any]
    sent: list[str]
    skipped: list[str]


class AtelierClient:
    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 60.0, http: httpx.Client | None = None
    ) -> None:
        """`http` is an httpx.Client to talk through (tests pass FastAPI's TestClient)."""
        self.base_url = base_url.rstrip("/")
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout, follow_redirects=True)
        self.http.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None) -> AtelierClient:
        """Arguments first, then ATELIER_URL / ATELIER_API_KEY; the URL defaults to a local server."""
        key = api_key or os.environ.get("ATELIER_API_KEY")
        if not key:
            raise ValueError("no API key: pass --api-key or set ATELIER_API_KEY (atelier keys create)")
        return cls(url or os.environ.get("ATELIER_URL") or DEFAULT_URL, key)

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text or response.reason_phrase}
            if not isinstance(body, dict):
                body = {"detail": body}
            raise ApiProblem(response.status_code, body)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return self._json(self.http.get(path, params=params or None))

    def delete(self, collection: str, object_id: str) -> dict[str, Any]:
        """DELETE /v1/{collection}/{id}: {id, object, deleted: true}."""
        return self._json(self.http.delete(f"/v1/{collection}/{object_id}"))

    # --- datasets ---------------------------------------------------------------------------------

    def upload_dataset(self, paths: list[Path], *, name: str | None = None) -> dict[str, Any]:
        """One zip, or images and same-name .txt captions as separate files."""
        handles = [p.open("rb") for p in paths]
        try:
            files = [("files", (p.name, h)) for p, h in zip(paths, handles, strict=True)]
            data = {"name": name} if name else None
            return self._json(self.http.post("/v1/datasets", files=files, data=data))
        finally:
            for handle in handles:
                handle.close()

    def upload_folder(self, folder: Path, *, name: str | None = None) -> FolderUpload:
        """A folder's images, captions and `conditioning/` images, sent as one zip of relative names.

        One zip rather than many files: the server's multipart limits count files, a zip's entries
        are capped by the dataset rules instead, and conditioning images keep their folder.
        """
        sent, skipped = _folder_members(folder)
        if not sent:
            raise ValueError(f"{folder} holds no images or captions")
        with tempfile.TemporaryFile() as spool:
            # Stored, not deflated: images are compressed already.
            with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_STORED) as archive:
                for rel in sent:
                    archive.write(folder / rel, rel)
            spool.seek(0)
            files = [("files", (f"{folder.resolve().name or 'dataset'}.zip", spool, "application/zip"))]
            data = {"name": name or folder.resolve().name}
            dataset = self._json(self.http.post("/v1/datasets", files=files, data=data))
        return FolderUpload(dataset=dataset, sent=sent, skipped=skipped)

    def datasets(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        return self.get("/v1/datasets", limit=limit, after=after)

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}")

    # --- jobs -------------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or str(uuid.uuid4())
        return self._json(self.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        return self.get("/v1/jobs", status=status, limit=limit, after=after)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def stream_events(
        self, job_id: str, *, after: int = 0, read_timeout: float = 120.0
    ) -> Iterator[JobEvent]:
        """The job's server-sent events until it is terminal: every event after `after`, and a
        `progress` snapshot whenever progress changes. Raises StreamUnavailable when the server
        answers with something other than an event stream."""
        # (connect, read, write, pool) as a plain tuple, not httpx.Timeout: the client may be
        # another httpx-compatible one (starlette's TestClient is httpx2 when that is installed, and
        # httpx2 >= 2.17 refuses httpx's Timeout objects).
        timeout = (10.0, read_timeout, 10.0, 10.0)
        with self.http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"after": after},
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        ) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise StreamUnavailable(f"the server answered {response.headers.get('content-type')!r}")
            for event in iter_sse(response.iter_lines()):
                data = json.loads(event.data) if event.data else {}
                yield JobEvent(event.event, data, int(event.id) if event.id else None)

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = 3600.0,
    ) -> dict[str, Any]:
        """Poll until the job is terminal; returns the final job (`timeout_s=None`: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    # --- artifacts --------------------------------------------------------------------------------

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return self.get(f"/v1/artifacts/{artifact_id}")

    def artifacts(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        return self.get("/v1/artifacts", limit=limit, after=after)

    def download_artifact(
        self, artifact_id: str, dest: Path, *, file: str | None = None, format: str | None = None
    ) -> Path:
        """Save one file of an artifact (default its primary file) to `dest`; when `dest` is an
        existing folder, the file keeps the name the server gives it. Returns the path written."""
        params = {k: v for k, v in {"file": file, "format": format}.items() if v}
        with self.http.stream(
            "GET", f"/v1/artifacts/{artifact_id}/download", params=params or None
        ) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            if dest.is_dir():
                dest = dest / _served_name(response, fallback=(file or artifact_id).rsplit("/", 1)[-1])
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".part")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            # Only a complete download takes the name: a cut connection leaves no truncated weights.
            partial.replace(dest)
        return dest

    # --- generations ------------------------------------------------------------------------------

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/generations", json=body))

    def generation(self, generation_id: str) -> dict[str, Any]:
        return self.get(f"/v1/generations/{generation_id}")

    def wait_generation(self, generation_id: str, *, poll_s: float = 0.5, timeout_s: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            gen = self.generation(generation_id)
            if gen["status"] in TERMINAL:
                return gen
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation {generation_id} still {gen['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def upload_image(self, path: Path) -> dict[str, Any]:
        """An image for generations (ControlNet conditioning, IP-Adapter reference); returns its id."""
        with path.open("rb") as handle:
            return self._json(self.http.post("/v1/images", files={"file": (path.name, handle)}))

    def fetch(self, url: str) -> bytes:
        """Download a URL the API returned (presigned S3 URL or an API file route)."""
        if url.startswith(self.base_url):
            response = self.http.get(url)
        else:
            # A presigned URL carries its own authorisation; the API key must not travel with it.
            response = httpx.get(url, timeout=self.http.timeout)
        if response.status_code >= 400:
            self._json(response)
        return response.content


def _folder_members(folder: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX names of the images and captions under `folder` (hidden files and folders
    left out), and of the other files, which are skipped."""
    sent, skipped = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.casefold()
        (sent if suffix in IMAGE_SUFFIXES or suffix == CAPTION_SUFFIX else skipped).append(rel.as_posix())
    return sent, skipped


def _served_name(response: httpx.Response, *, fallback: str) -> str:
    match = _FILENAME.search(response.headers.get("content-disposition", ""))
    name = match.group(1) if match else fallback
    return Path(name).name or fallback  # never a path the server could point outside `dest`
