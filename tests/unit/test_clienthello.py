"""connection.sni: the server name of real ClientHellos (made by Python's ssl, as OpenSSL
sends them), split anywhere, and what is not one."""

from __future__ import annotations

import ssl

import pytest

from veil.core.clienthello import Hello, server_name


def hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("sni", ["api.example.com", "Catalog.Shop.svc.cluster.local."])
def test_the_server_name_of_a_real_client_hello(sni):
    data = hello(sni)
    assert server_name(data) == sni.lower().rstrip(".")
    for cut in range(len(data)):  # every prefix asks for more, never guesses
        assert server_name(data[:cut]) is Hello.NEED_MORE


def test_a_client_hello_without_sni_has_no_name():
    assert server_name(hello(None)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x01\x00\x00\x05hello",
        b"\x17\x03\x03\x00\x01x",
        b"\x16\x03\x01\xff\xff",
    ],
)
def test_what_is_not_a_client_hello(data):
    assert server_name(data) is Hello.NOT_TLS


def test_a_truncated_or_lying_hello_is_not_tls_never_an_exception():
    data = bytearray(hello("a.example"))
    data[6] = 0xFF  # ClientHello body length beyond the record
    assert server_name(bytes(data)) is Hello.NOT_TLS
    good = hello("a.example")
    for i in range(5, len(good)):
        broken = bytearray(good)
        broken[i] ^= 0xFF
        got = server_name(bytes(broken))
        assert got is Hello.NOT_TLS or got is None or isinstance(got, str)
