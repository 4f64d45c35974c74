"""The run's `ServiceLink`s: one per service address, each with the run's token and TLS settings
and a typed client that does not retry underneath the link (the link backs off itself)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from esper.clients import AsyncUrzaClient, OonaClient, ServiceLink, TamiyoClient, TezzeretClient
from esper.serving.client import NO_RETRY, ChannelConfig
from esper.tolaria.services_config import ServicesConfig

CLIENTS = {"urza": AsyncUrzaClient, "tezzeret": TezzeretClient, "oona": OonaClient, "tamiyo": TamiyoClient}


def channel_config(settings: ServicesConfig, address: str) -> ChannelConfig:
    """How to reach a service of the run: its address with the run's token and TLS settings."""
    return ChannelConfig(address, auth_token=settings.token(),
                         tls_root_cert=Path(settings.tls_root_cert) if settings.tls_root_cert else None,
                         tls_server_name=settings.tls_server_name or None)


class ServiceLinks(dict[str, ServiceLink]):
    """The run's links by service name, and what they say about the services together."""

    def outages(self) -> dict[str, int]:
        """Times each service went down during the run."""
        return {name: link.outages for name, link in self.items()}

    def paused(self) -> tuple[bool, str]:
        """(adaptation paused, why): a service the cycle needs is down."""
        down = [link.down_reason for link in self.values() if not link.up]
        return bool(down), "; ".join(down)

    def any_down(self, names: Iterable[str]) -> bool:
        """Whether one of the named services (those the run has) is down."""
        return any(not self[name].up for name in names if name in self)


def open_links(settings: ServicesConfig, addresses: dict[str, str],
               on_change: Callable[[], None]) -> ServiceLinks:
    """A link per named service (urza, tezzeret, oona, tamiyo) at `addresses`; nothing connects yet."""
    def client_of(name: str):
        cls = CLIENTS[name]
        return lambda config: cls(config, timeout_s=settings.call_timeout_s, retry=NO_RETRY)

    return ServiceLinks({name: ServiceLink(name, channel_config(settings, address), client_of(name),
                                           retry_initial_s=settings.retry_initial_s,
                                           retry_max_s=settings.retry_max_s, on_change=on_change)
                         for name, address in addresses.items()})
