"""Tenants: API keys, per-tenant limits and the request rate limit."""
