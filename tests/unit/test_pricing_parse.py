"""Parsing Pricing API documents and spot price history as AWS returns them; the offline table;
PriceBook caching and fallback. The Pricing API cannot run here (moto has none), so its answers
come from fixtures in the real response shape, fed through botocore's Stubber, which also
checks our request against the service model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from spotwise.cloud.pricing import (
    PriceBook,
    PricingConfig,
    latest_spot_prices,
    load_offline_table,
    on_demand_filters,
    parse_offline_table,
    parse_price_list,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pricing"


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text())


def test_price_list_documents_parse_to_on_demand_hourly_usd() -> None:
    page = fixture("get_products_g4dn.xlarge.json")
    assert all(isinstance(d, str) for d in page["PriceList"])  # AWS sends JSON strings
    # the Reserved terms in the same document (an upfront fee, a lower hourly) are not on-demand
    assert parse_price_list(page["PriceList"]) == {"g4dn.xlarge": 0.526}


def test_price_list_skips_garbage_and_zero_prices() -> None:
    good = fixture("get_products_g4dn.xlarge.json")["PriceList"][0]
    zero = json.loads(good)
    for term in zero["terms"]["OnDemand"].values():
        for dim in term["priceDimensions"].values():
            dim["pricePerUnit"]["USD"] = "0.0000000000"
    assert parse_price_list(["not json", "{}", json.dumps(zero), good]) == {"g4dn.xlarge": 0.526}
    assert parse_price_list([json.dumps(zero)]) == {}


def test_latest_spot_price_per_type_and_zone() -> None:
    latest = latest_spot_prices(fixture("describe_spot_price_history.json")["SpotPriceHistory"])
    assert {k: v[0] for k, v in latest.items()} == {
        ("g4dn.xlarge", "us-east-1a"): 0.2075,
        ("g4dn.xlarge", "us-east-1b"): 0.1831,
        ("p3.2xlarge", "us-east-1f"): 1.0123,
    }


def test_offline_table_is_dated_and_covers_common_gpu_types() -> None:
    table = load_offline_table()
    assert table.source.startswith("offline table 20")
    for itype in ("p3.2xlarge", "p3.8xlarge", "g4dn.xlarge", "g4dn.12xlarge", "g5.xlarge", "g5.12xlarge",
                  "p4d.24xlarge"):
        od = table.on_demand_price(itype)
        spot = table.spot_price(itype)
        assert od is not None and spot is not None and 0 < spot < od
    assert table.on_demand_price("x9.huge") is None
    with pytest.raises(ValueError):
        parse_offline_table({"date": "someday", "on_demand_usd_per_hour": {}, "spot_fraction": {}})
    with pytest.raises(ValueError):
        parse_offline_table({"date": "2026-01-01", "on_demand_usd_per_hour": {"a.b": 1}, "spot_fraction": {"a": 2}})


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _pricing_client():
    return boto3.client("pricing", region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _expected(itype: str, token: str | None = None) -> dict:
    params = {"ServiceCode": "AmazonEC2", "Filters": on_demand_filters(itype, "us-east-1"),
              "FormatVersion": "aws_v1", "MaxResults": 100}
    if token:
        params["NextToken"] = token
    return params


def test_pricebook_on_demand_from_api_then_cache_then_refetch() -> None:
    client = _pricing_client()
    clock = Clock()
    book = PriceBook(PricingConfig(on_demand_max_age_s=3600), pricing_client=client, clock=clock)
    page = fixture("get_products_g4dn.xlarge.json")
    with Stubber(client) as stub:
        stub.add_response("get_products", copy.deepcopy(page), _expected("g4dn.xlarge"))
        first = book.on_demand("g4dn.xlarge")
        assert (first.usd_per_hour, first.source, first.market) == (0.526, "api", "on-demand")
        clock.now += 100
        second = book.on_demand("g4dn.xlarge")  # no second response queued: must come from cache
        assert second.source == "cache" and second.age_s(clock.now) == 100
        stub.assert_no_pending_responses()
        clock.now += 3600
        stub.add_response("get_products", copy.deepcopy(page), _expected("g4dn.xlarge"))
        assert book.on_demand("g4dn.xlarge").source == "api"
        stub.assert_no_pending_responses()


def test_pricebook_follows_next_token() -> None:
    client = _pricing_client()
    book = PriceBook(pricing_client=client)
    first, second = fixture("get_products_p3.2xlarge_paged.json")
    with Stubber(client) as stub:
        stub.add_response("get_products", first, _expected("p3.2xlarge"))
        stub.add_response("get_products", second, _expected("p3.2xlarge", first["NextToken"]))
        assert book.on_demand("p3.2xlarge").usd_per_hour == 3.06
        stub.assert_no_pending_responses()


def test_pricebook_falls_back_on_api_errors() -> None:
    client = _pricing_client()
    clock = Clock()
    book = PriceBook(PricingConfig(on_demand_max_age_s=10), pricing_client=client, clock=clock)
    with Stubber(client) as stub:
        # nothing cached: the API refuses -> the offline table, reported as such
        stub.add_client_error("get_products", "AccessDeniedException", "no pricing:GetProducts", 400)
        offline = book.on_demand("p3.2xlarge")
        assert offline.source == book.offline.source and offline.usd_per_hour == 3.06
        # the API answers nothing for the type -> also the offline table
        stub.add_response("get_products", fixture("get_products_none.json"), _expected("g5.xlarge"))
        assert book.on_demand("g5.xlarge").source.startswith("offline table")
        # cached once, then the API fails: the stale cache wins over the offline table
        stub.add_response("get_products", fixture("get_products_g4dn.xlarge.json"), _expected("g4dn.xlarge"))
        assert book.on_demand("g4dn.xlarge").source == "api"
        clock.now += 60
        stub.add_client_error("get_products", "ThrottlingException", "slow down", 400)
        stale = book.on_demand("g4dn.xlarge")
        assert stale.source == "cache" and stale.age_s(clock.now) == 60
        stub.add_client_error("get_products", "ThrottlingException", "slow down", 400)
        with pytest.raises(LookupError, match="x9.huge"):
            book.on_demand("x9.huge")
    with pytest.raises(ValueError):
        book.price("g4dn.xlarge", "reserved")
