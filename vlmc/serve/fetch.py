"""Fetching image URLs for the server: which addresses it may reach, and what a client learns.

Anyone who may send a request names these URLs, so the fetcher must not be a probe of the
server's own network. Every hop (the URL, then each redirect) is resolved here and refused
unless all its addresses are public (``FetchPolicy``), then connected to at the address that
was checked, so a second DNS answer cannot swap in another one; http and https only; one
deadline over the whole fetch and a byte cap. A client is told the same thing for every
failure, so a refused port, a 404, a timeout and a non-image look alike; the server log
has the reason. httpx2 does the HTTP: redirects are followed here, one checked hop at a time.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .middleware import request_id

log = logging.getLogger("vlmc.serve")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance-metadata services (credentials live there): refused even with
# --allow-private-fetch, unless a network given to --allow-fetch-network contains them.
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "169.254.170.23",
                                               "100.100.100.200", "fd00:ec2::254")}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


class FetchFailed(Exception):
    """Why a fetch failed, for the server log (the client gets ``CLIENT_MESSAGE``)."""


CLIENT_MESSAGE = "the image URL could not be fetched as an image (the server log says why)"


@dataclass
class FetchPolicy:
    timeout: float = 10.0              # seconds for the whole fetch, redirects included
    max_bytes: int = 20 * 2**20
    allow_private: bool = False        # loopback, private, link-local, ... (not metadata services)
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)
    max_redirects: int = 5

    def allows(self, address: str) -> bool:
        ip = _embedded(ipaddress.ip_address(address.split("%", 1)[0]))
        if any(ip in net for net in self.allowed_networks):
            return True
        if ip in METADATA or ip.is_multicast:
            return False
        return ip.is_global or self.allow_private


def _embedded(ip: Address) -> Address:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), which is where it goes."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


class Fetcher:
    """One per server: an httpx2 client without proxies (a proxy would resolve names
    itself, past the address check) or connection reuse (connections are per checked
    address and TLS name), and a count of fetches in progress for /metrics."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.in_flight = 0
        self._client: httpx2.AsyncClient | None = None

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:  # made on first use, inside the server's event loop
            transport = httpx2.AsyncHTTPTransport(trust_env=False, retries=0,
                                                  limits=httpx2.Limits(max_keepalive_connections=0))
            self._client = httpx2.AsyncClient(transport=transport, trust_env=False, follow_redirects=False,
                                              timeout=httpx2.Timeout(self.policy.timeout))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def get(self, url: str, *, max_bytes: int | None = None, what: str = "image",
                  timeout: float | None = None) -> bytes:
        """The body of ``url``, or FetchFailed (logged here with the request id).
        ``max_bytes``/``timeout`` override the policy's (videos are larger than images)."""
        self.in_flight += 1
        cap = self.policy.max_bytes if max_bytes is None else max_bytes
        timeout = self.policy.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._follow(url, cap, what), timeout)
        except asyncio.TimeoutError:
            reason = f"timed out after {timeout:g} s"
        except FetchFailed as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - whatever a remote host makes go wrong is its failure, not ours
            reason = f"{type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
        log.warning("%s %s fetch failed: %s: %s", request_id.get(), what, _shown(url), reason)
        raise FetchFailed(reason)

    async def _follow(self, url: str, max_bytes: int, what: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            target = httpx2.URL(url)
            if target.scheme not in ("http", "https"):
                raise FetchFailed(f"scheme {target.scheme!r} is not fetched (http and https only)")
            host = target.raw_host.decode("ascii")
            if not host:
                raise FetchFailed("the URL has no host")
            port = target.port or (443 if target.scheme == "https" else 80)
            addresses = await self._resolve(host, port)
            for i, address in enumerate(addresses):  # the next one only if this one cannot be reached
                try:
                    got = await self._hop(target, host, address, max_bytes, what)
                    break
                except httpx2.ConnectError:
                    if i == len(addresses) - 1:
                        raise
            if isinstance(got, bytes):
                return got
            url = got
        raise FetchFailed(f"more than {self.policy.max_redirects} redirects")

    async def _hop(self, target: httpx2.URL, host: str, address: str, max_bytes: int, what: str) -> bytes | str:
        """GET ``target`` from ``address``: its body, or the URL it redirects to."""
        pinned = target.copy_with(host=address)
        headers = {"Host": target.netloc.decode("ascii"), "User-Agent": "vlmc",
                   "Accept": f"{what}/*", "Accept-Encoding": "identity"}
        extensions: dict[str, Any] = {}
        if target.scheme == "https" and not _is_literal(host):
            extensions["sni_hostname"] = host  # TLS checks the certificate against the name, not the address
        async with self._http().stream("GET", pinned, headers=headers, extensions=extensions) as resp:
            if resp.status_code in _REDIRECTS:
                location = resp.headers.get("location")
                if not location:
                    raise FetchFailed(f"HTTP {resp.status_code} without a Location")
                return str(target.join(location))
            if resp.status_code != 200:
                raise FetchFailed(f"HTTP {resp.status_code}")
            if resp.headers.get("content-encoding", "identity").lower() != "identity":
                raise FetchFailed(f"a compressed response ({resp.headers['content-encoding']})")
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchFailed(f"Content-Length {length} is over --max-{what}-bytes ({max_bytes})")
            chunks, total = [], 0
            async for chunk in resp.aiter_raw():
                total += len(chunk)
                if total > max_bytes:
                    raise FetchFailed(f"the response is over --max-{what}-bytes ({max_bytes})")
                chunks.append(chunk)
            return b"".join(chunks)

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` to connect to; every one must be allowed, so a name
        that also points inside the network is refused as a whole."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise FetchFailed(f"cannot resolve {host!r}: {e.strerror or e}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not self.policy.allows(a)]
        if refused or not addresses:
            raise FetchFailed(f"{host!r} resolves to {', '.join(refused) or 'nothing'}, which this server does not "
                              f"fetch from (private, loopback, link-local or metadata addresses need "
                              f"--allow-private-fetch or --allow-fetch-network)")
        return addresses


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _shown(url: str, limit: int = 200) -> str:
    url = url if len(url) <= limit else url[:limit] + "..."
    return url.encode("unicode_escape", "backslashreplace").decode("ascii")
