"""The webhook SSRF guard: hostile URLs refused with their reason, public ones pinned to the address
that was checked, and the allow-list. The resolver is `fake_dns` (tests/webhook_fixtures.py).
"""

from __future__ import annotations

import pytest

from core.config import Settings
from core.webhooks.url_guard import UrlNotAllowed, check_url

HOSTILE = [
    ("https://127.0.0.1/hook", "loopback"),
    ("https://localhost:8443/hook", "loopback"),
    ("https://10.1.2.3/", "private"),
    ("https://192.168.0.10/", "private"),
    ("https://172.16.5.4/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "link_local"),
    ("http://169.254.169.254/latest/meta-data/", "scheme"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback"),
    ("https://[::ffff:a9fe:a9fe]/", "link_local"),
    ("https://[::127.0.0.1]/", "loopback"),
    ("https://[64:ff9b::a00:1]/", "private"),  # NAT64 of 10.0.0.1
    ("https://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("https://[fe80::1]/", "link_local"),
    ("https://[fc00::1]/", "private"),
    ("https://[ff02::1]/", "multicast"),
    ("https://224.0.0.1/", "multicast"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://[::]/", "unspecified"),
    ("https://100.64.0.1/", "shared"),
    ("https://0x7f.1/", "numeric_host"),
    ("https://2130706433/", "numeric_host"),
    ("https://0177.0.0.1/", "numeric_host"),
    ("https://127.1/", "numeric_host"),
    ("https://0x7f000001/", "numeric_host"),
    ("https://internal.example.test/", "private"),
    ("https://metadata.example.test/", "link_local"),
    ("https://mixed.example.test/", "private"),  # one private answer is enough
    ("https://nowhere.example.test/", "unresolvable"),
    ("http://hooks.example.test/", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://hooks.example.test/", "scheme"),
    ("https://user:pw@hooks.example.test/", "credentials"),
    ("https:///no-host", "invalid_url"),
    ("https://hooks.example.test/" + "a" * 2100, "too_long"),
]


@pytest.mark.parametrize(("url", "reason"), HOSTILE, ids=[u[:60] for u, _ in HOSTILE])
def test_hostile_urls_are_refused(fake_dns: dict, url: str, reason: str) -> None:
    with pytest.raises(UrlNotAllowed) as refused:
        check_url(url, allow_hosts=[])
    assert refused.value.reason == reason


def test_a_public_https_url_is_pinned_to_the_address_that_was_checked(fake_dns: dict) -> None:
    checked = check_url("https://Hooks.Example.Test:8443/in?x=1", allow_hosts=[])
    assert (checked.host, checked.port, str(checked.address)) == ("hooks.example.test", 8443, "93.184.216.34")
    assert checked.target == "https://93.184.216.34:8443/in?x=1"
    assert checked.host_header == "hooks.example.test:8443"


def test_the_allow_list_admits_exactly_the_hosts_it_names(fake_dns: dict) -> None:
    allow = ["127.0.0.1"]
    assert str(check_url("http://127.0.0.1:8080/x", allow_hosts=allow).address) == "127.0.0.1"
    for url, reason in [
        ("http://localhost:8080/x", "scheme"),  # listed by address, not by every name for it
        ("https://localhost:8080/x", "loopback"),
        ("http://0x7f.1:8080/x", "numeric_host"),
        ("http://127.0.0.2/", "scheme"),
        ("https://[::1]/", "loopback"),
    ]:
        with pytest.raises(UrlNotAllowed) as refused:
            check_url(url, allow_hosts=allow)
        assert refused.value.reason == reason, url
    # Names and networks, as a compose file would list them: a receiver container, a private subnet.
    allow = ["receiver", "10.0.0.0/8"]
    assert str(check_url("http://receiver:9000/", allow_hosts=allow).address) == "172.18.0.5"
    assert str(check_url("http://10.2.3.4/", allow_hosts=allow).address) == "10.2.3.4"
    with pytest.raises(UrlNotAllowed):
        check_url("https://internal.example.test/", allow_hosts=allow)  # resolving into 10/8 is not enough


def test_the_allow_list_setting_reads_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", "127.0.0.1, receiver")
    assert Settings().webhook_allow_hosts == ["127.0.0.1", "receiver"]
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", '["::1"]')
    assert Settings().webhook_allow_hosts == ["::1"]
