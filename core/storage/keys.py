"""Where a job's objects live in storage: one layout, read by the runner that writes and the deletion
that removes them."""

from __future__ import annotations


def job_prefix(tenant_id: str, job_id: str) -> str:
    """Everything a job's attempts write: checkpoints/, samples/, attempt-N/ (the artifact)."""
    return f"tenants/{tenant_id}/jobs/{job_id}"


def cached_images_prefix(tenant_id: str, key: str) -> str:
    """Images derived from a base alone (DreamBooth's class images), shared by a tenant's jobs."""
    return f"tenants/{tenant_id}/cache/images/{key}"
