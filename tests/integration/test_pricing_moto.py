"""Spot prices from a real moto EC2 server, and the offline fallback when nothing answers."""

from __future__ import annotations

import socket
import time

import pytest

from spotwise.cloud.pricing import PriceBook, PricingConfig

pytestmark = pytest.mark.usefixtures("aws_test_credentials")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_spot_prices_from_moto_per_zone_and_cached(moto_url: str) -> None:
    book = PriceBook(PricingConfig(ec2_endpoint_url=moto_url, spot_max_age_s=300))
    cheapest = book.spot("g4dn.xlarge")
    assert cheapest.market == "spot" and cheapest.source == "api"
    assert cheapest.zone.startswith("us-east-1")
    assert cheapest.usd_per_hour > 0  # moto's price is a constant, but a real parsed number
    in_zone = book.spot("g4dn.xlarge", "us-east-1b")
    assert in_zone.zone == "us-east-1b" and in_zone.source == "cache"
    assert book.price("g4dn.xlarge", "spot", "us-east-1b").source == "cache"


def test_unreachable_apis_fall_back_to_the_offline_table() -> None:
    url = closed_port_url()
    book = PriceBook(PricingConfig(ec2_endpoint_url=url, pricing_endpoint_url=url, timeout_s=1, max_attempts=1))
    od = book.on_demand("g5.12xlarge")
    spot = book.spot("g5.12xlarge", "us-east-1a")
    assert od.source == spot.source == book.offline.source
    assert od.source.startswith("offline table 20")
    assert od.usd_per_hour == 5.672 and 0 < spot.usd_per_hour < od.usd_per_hour
    assert spot.zone == "us-east-1a"
    with pytest.raises(LookupError):
        book.spot("x9.huge")


def test_stale_spot_cache_beats_offline_table(moto_url: str) -> None:
    now = [time.time()]  # moto filters its history by StartTime, so a real "now"
    book = PriceBook(PricingConfig(ec2_endpoint_url=moto_url, spot_max_age_s=60), clock=lambda: now[0])
    fresh = book.spot("g4dn.xlarge", "us-east-1a")
    assert fresh.source == "api"
    # the endpoint goes away; the cached price is older than its max age but still the best we have
    book._ec2 = None
    book.config = PricingConfig(ec2_endpoint_url=closed_port_url(), spot_max_age_s=60, timeout_s=1, max_attempts=1)
    now[0] += 120
    stale = book.spot("g4dn.xlarge", "us-east-1a")
    assert stale.source == "cache" and stale.usd_per_hour == fresh.usd_per_hour
    assert stale.age_s(now[0]) == 120
