"""A small Python client for the Atelier HTTP API; the CLI and the demo use it, and so can users.

client = AtelierClient("http://127.0.0.1:8000", api_key)
ds = client.upload_dataset(Path("photos.zip"))
job = client.create_job({...}, idempotency_key="my-run-1")
job = client.wait(job["id"], on_progress=print)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


class ApiProblem(Exception):
    """An RFC 9457 problem returned by the API."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = body.get("code", "unknown")
        super().__init__(f"{status} {self.code}: {body.get('detail', body)}")


class AtelierClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            follow_redirects=True,
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text}
            raise ApiProblem(response.status_code, body)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self._json(self.http.get(path, params=params or None))

    def upload_dataset(self, paths: list[Path], *, name: str | None = None) -> dict[str, Any]:
        handles = [p.open("rb") for p in paths]
        try:
            files = [("files", (p.name, h)) for p, h in zip(paths, handles, strict=True)]
            data = {"name": name} if name else None
            return self._json(self.http.post("/v1/datasets", files=files, data=data))
        finally:
            for handle in handles:
                handle.close()

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or str(uuid.uuid4())
        return self._json(self.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float = 3600.0,
    ) -> dict[str, Any]:
        """Poll until the job is terminal; returns the final job."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return self.get(f"/v1/artifacts/{artifact_id}")

    def download_artifact(self, artifact_id: str, dest: Path, *, file: str | None = None) -> Path:
        params = {"file": file} if file else None
        with self.http.stream("GET", f"/v1/artifacts/{artifact_id}/download", params=params) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return dest

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/generations", json=body))

    def wait_generation(self, generation_id: str, *, poll_s: float = 0.5, timeout_s: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            gen = self.get(f"/v1/generations/{generation_id}")
            if gen["status"] in ("succeeded", "failed", "canceled"):
                return gen
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation {generation_id} still {gen['status']}")
            time.sleep(poll_s)

    def fetch(self, url: str) -> bytes:
        """Download a URL the API returned (presigned S3 URL or an API file route)."""
        if url.startswith(self.base_url):
            response = self.http.get(url)
        else:
            response = httpx.get(url, timeout=self.http.timeout)
        response.raise_for_status()
        return response.content
