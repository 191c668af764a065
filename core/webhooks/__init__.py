"""Webhooks: which events are sent and how they are signed (events), their delivery with retries
(delivery), and the URL guard.
"""
