"""Instance prices: on-demand from the AWS Pricing API, spot from EC2's spot price history.

Both are cached with the time they were fetched. A price younger than its max age is served
from the cache; an older one is fetched again; when the API cannot be reached, a stale cached
price is served (its source says "cache" and its age shows how old), and with nothing cached
the offline table shipped with the package answers (source "offline table <date>").

Pricing API documents (``get_products``'s ``PriceList``) are JSON strings of the form
``{"product": {"attributes": {"instanceType": ...}}, "terms": {"OnDemand": {<offer>:
{"priceDimensions": {<rate>: {"unit": "Hrs", "pricePerUnit": {"USD": "0.5260000000"}}}}}}}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from spotwise.cloud.aws import AwsConfig, aws_call_errors, aws_client, error_code

log = logging.getLogger(__name__)

SPOT_PRODUCT_DESCRIPTIONS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


class PricingError(RuntimeError):
    """A pricing call failed (the caller falls back to the cache or the offline table)."""


@dataclass(frozen=True, kw_only=True)
class Price:
    """One instance type's hourly price in one market."""

    instance_type: str
    market: str
    """"on-demand" or "spot"."""
    usd_per_hour: float
    zone: str = ""
    """Availability zone of a spot price; "" for a regional (on-demand or offline) price."""
    source: str = "api"
    """"api" (just fetched), "cache" (fetched earlier) or "offline table <date>"."""
    fetched_at: float = 0.0
    """Clock seconds when it was fetched from the API (0 for the offline table)."""

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.fetched_at)


@dataclass(frozen=True, kw_only=True)
class PricingConfig:
    """Where prices come from and how long they stay fresh."""

    region: str = "us-east-1"
    """Region whose prices we want (the EC2 region of the fleet)."""
    pricing_region: str = "us-east-1"
    """Region of the Pricing API endpoint (it exists in us-east-1, eu-central-1, ap-south-1)."""
    ec2_endpoint_url: str | None = None
    """EC2 endpoint override (a moto server in tests)."""
    pricing_endpoint_url: str | None = None
    """Pricing API endpoint override."""
    on_demand_max_age_s: float = 24 * 3600.0
    """On-demand prices change rarely: refetch after a day."""
    spot_max_age_s: float = 300.0
    """Spot prices move: refetch after five minutes."""
    timeout_s: float = 5.0
    """HTTP timeout of each pricing call."""
    max_attempts: int = 2
    """Attempts per call before falling back."""
    operating_system: str = "Linux"
    """operatingSystem filter of the Pricing API."""


@dataclass(frozen=True, kw_only=True)
class OfflineTable:
    """The dated fallback table (cloud/offline_prices.json)."""

    date: str
    region: str
    on_demand: dict[str, float]
    spot_fraction: dict[str, float]

    @property
    def source(self) -> str:
        return f"offline table {self.date}"

    def on_demand_price(self, instance_type: str) -> float | None:
        return self.on_demand.get(instance_type)

    def spot_price(self, instance_type: str) -> float | None:
        od = self.on_demand.get(instance_type)
        if od is None:
            return None
        family = instance_type.split(".", 1)[0]
        return od * self.spot_fraction.get(family, self.spot_fraction.get("default", 0.35))


def parse_offline_table(doc: dict[str, Any]) -> OfflineTable:
    """Validate the offline table document; ValueError if it is not usable."""
    try:
        date = str(doc["date"])
        datetime.strptime(date, "%Y-%m-%d")
        on_demand = {str(k): float(v) for k, v in doc["on_demand_usd_per_hour"].items()}
        fractions = {str(k): float(v) for k, v in doc["spot_fraction"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"offline price table is malformed: {exc!r}") from exc
    if any(v <= 0 for v in on_demand.values()) or any(not 0 < v <= 1 for v in fractions.values()):
        raise ValueError("offline price table: prices must be > 0 and spot fractions in (0, 1]")
    return OfflineTable(date=date, region=str(doc.get("region", "")), on_demand=on_demand, spot_fraction=fractions)


def load_offline_table() -> OfflineTable:
    """The table shipped with the package."""
    text = resources.files("spotwise.cloud").joinpath("offline_prices.json").read_text()
    return parse_offline_table(json.loads(text))


def on_demand_filters(instance_type: str, region: str, operating_system: str = "Linux") -> list[dict[str, str]]:
    """The usual get_products filters for one Linux, shared-tenancy, no-extra-software price."""
    pairs = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": operating_system,
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in pairs.items()]


def parse_price_list(price_list: Iterable[str]) -> dict[str, float]:
    """Hourly on-demand USD per instance type from get_products' PriceList documents.

    Documents that are not JSON or lack the expected fields are skipped (logged). Zero prices
    (capacity-reservation rows) are ignored; when several products remain for one type, the
    lowest hourly price wins.
    """
    prices: dict[str, float] = {}
    for raw in price_list:
        try:
            doc = json.loads(raw) if isinstance(raw, str) else raw
            itype = doc["product"]["attributes"]["instanceType"]
            terms = doc["terms"]["OnDemand"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("skipping a PriceList document without on-demand terms: %r", exc)
            continue
        for term in terms.values():
            for dim in term.get("priceDimensions", {}).values():
                if dim.get("unit") not in ("Hrs", "Hours"):
                    continue
                try:
                    usd = float(dim["pricePerUnit"]["USD"])
                except (KeyError, TypeError, ValueError):
                    continue
                if usd > 0 and (itype not in prices or usd < prices[itype]):
                    prices[itype] = usd
    return prices


def latest_spot_prices(history: Iterable[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, datetime]]:
    """(instance type, zone) -> (USD/h, timestamp) of the newest entry of a spot price history."""
    latest: dict[tuple[str, str], tuple[float, datetime]] = {}
    for entry in history:
        key = (entry["InstanceType"], entry["AvailabilityZone"])
        stamp = entry["Timestamp"]
        if isinstance(stamp, str):
            stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if key not in latest or stamp > latest[key][1]:
            latest[key] = (float(entry["SpotPrice"]), stamp)
    return latest


class PriceBook:
    """Cached prices for the fleet reconciler and the ledger. Thread-safe.

    `on_demand` and `spot` never raise for an unreachable API: they fall back to the cache,
    then to the offline table. They raise LookupError only when no source knows the type.
    """

    def __init__(
        self,
        config: PricingConfig | None = None,
        *,
        ec2_client: Any = None,
        pricing_client: Any = None,
        offline: OfflineTable | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config or PricingConfig()
        self._ec2 = ec2_client
        self._pricing = pricing_client
        self.offline = offline or load_offline_table()
        self._clock = clock
        self._lock = threading.Lock()
        self._on_demand: dict[str, Price] = {}
        self._spot: dict[tuple[str, str], Price] = {}
        self._spot_fetched: dict[str, float] = {}

    # ---- clients (lazy) --------------------------------------------------------------------

    def _pricing_client(self) -> Any:
        if self._pricing is None:
            self._pricing = aws_client("pricing", AwsConfig(
                region=self.config.pricing_region, endpoint_url=self.config.pricing_endpoint_url,
                timeout_s=self.config.timeout_s, max_attempts=self.config.max_attempts))
        return self._pricing

    def _ec2_client(self) -> Any:
        if self._ec2 is None:
            self._ec2 = aws_client("ec2", AwsConfig(
                region=self.config.region, endpoint_url=self.config.ec2_endpoint_url,
                timeout_s=self.config.timeout_s, max_attempts=self.config.max_attempts))
        return self._ec2

    # ---- fetching --------------------------------------------------------------------------

    def fetch_on_demand(self, instance_type: str) -> float:
        """One get_products query (all pages, bounded); PricingError if it fails or finds nothing."""
        filters = on_demand_filters(instance_type, self.config.region, self.config.operating_system)
        documents: list[str] = []
        kwargs: dict[str, Any] = {"ServiceCode": "AmazonEC2", "Filters": filters,
                                  "FormatVersion": "aws_v1", "MaxResults": 100}
        try:
            for _ in range(10):  # the filters match a handful of products; 10 pages is plenty
                page = self._pricing_client().get_products(**kwargs)
                documents.extend(page.get("PriceList", []))
                if not page.get("NextToken"):
                    break
                kwargs["NextToken"] = page["NextToken"]
        except aws_call_errors() as exc:
            raise PricingError(
                f"pricing:GetProducts failed ({error_code(exc)}: {exc}); tried {instance_type} "
                f"in {self.config.region} via {self.config.pricing_region}") from exc
        prices = parse_price_list(documents)
        if instance_type not in prices:
            raise PricingError(f"pricing:GetProducts has no on-demand price for {instance_type} in {self.config.region}"
                               f" ({len(documents)} documents)")
        return prices[instance_type]

    def fetch_spot(self, instance_types: Sequence[str]) -> dict[tuple[str, str], float]:
        """Current spot price per (type, zone) from describe_spot_price_history; PricingError on failure."""
        now = datetime.fromtimestamp(self._clock()).astimezone()
        entries: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"InstanceTypes": list(instance_types),
                                  "ProductDescriptions": list(SPOT_PRODUCT_DESCRIPTIONS),
                                  "StartTime": now, "MaxResults": 1000}
        try:
            for _ in range(20):  # bounded pagination
                page = self._ec2_client().describe_spot_price_history(**kwargs)
                entries.extend(page.get("SpotPriceHistory", []))
                if not page.get("NextToken"):
                    break
                kwargs["NextToken"] = page["NextToken"]
        except aws_call_errors() as exc:
            raise PricingError(
                f"ec2:DescribeSpotPriceHistory failed ({error_code(exc)}: {exc}); tried "
                f"{', '.join(instance_types)} in {self.config.region}") from exc
        return {key: price for key, (price, _) in latest_spot_prices(entries).items()}

    # ---- answering -------------------------------------------------------------------------

    def on_demand(self, instance_type: str) -> Price:
        """The on-demand price of `instance_type` in the configured region."""
        now = self._clock()
        with self._lock:
            cached = self._on_demand.get(instance_type)
        if cached is not None and cached.age_s(now) < self.config.on_demand_max_age_s:
            return _as_cached(cached)
        try:
            usd = self.fetch_on_demand(instance_type)
        except PricingError as exc:
            log.warning("on-demand price of %s: %s; falling back", instance_type, exc)
            if cached is not None:
                return _as_cached(cached)
            usd_offline = self.offline.on_demand_price(instance_type)
            if usd_offline is None:
                raise LookupError(f"no on-demand price for {instance_type}: API unreachable and "
                                  f"not in the {self.offline.source}") from exc
            return Price(instance_type=instance_type, market="on-demand", usd_per_hour=usd_offline,
                         source=self.offline.source)
        price = Price(instance_type=instance_type, market="on-demand", usd_per_hour=usd, fetched_at=now)
        with self._lock:
            self._on_demand[instance_type] = price
        return price

    def spot(self, instance_type: str, zone: str | None = None) -> Price:
        """The current spot price of `instance_type` in `zone` (None: the cheapest zone)."""
        now = self._clock()
        with self._lock:
            fetched = self._spot_fetched.get(instance_type)
        fresh = fetched is not None and now - fetched < self.config.spot_max_age_s
        if not fresh:
            try:
                prices = self.fetch_spot([instance_type])
            except PricingError as exc:
                log.warning("spot price of %s: %s; falling back", instance_type, exc)
            else:
                with self._lock:
                    for (itype, z), usd in prices.items():
                        self._spot[(itype, z)] = Price(instance_type=itype, market="spot", usd_per_hour=usd,
                                                       zone=z, fetched_at=now)
                    self._spot_fetched[instance_type] = now
                found = self._pick_spot(instance_type, zone, cached=False)
                if found is not None:
                    return found
        found = self._pick_spot(instance_type, zone, cached=True)
        if found is not None:
            return found
        usd_offline = self.offline.spot_price(instance_type)
        if usd_offline is None:
            raise LookupError(f"no spot price for {instance_type}: API unreachable and not in the {self.offline.source}")
        return Price(instance_type=instance_type, market="spot", usd_per_hour=usd_offline, zone=zone or "",
                     source=self.offline.source)

    def _pick_spot(self, instance_type: str, zone: str | None, *, cached: bool) -> Price | None:
        with self._lock:
            candidates = [p for (itype, z), p in self._spot.items()
                          if itype == instance_type and (zone is None or z == zone)]
        if not candidates:
            return None
        best = min(candidates, key=lambda p: (p.usd_per_hour, p.zone))
        return _as_cached(best) if cached else best

    def price(self, instance_type: str, market: str, zone: str | None = None) -> Price:
        """The price a node of this type pays in `market` ("spot" or "on-demand")."""
        if market == "spot":
            return self.spot(instance_type, zone)
        if market == "on-demand":
            return self.on_demand(instance_type)
        raise ValueError(f"market must be 'spot' or 'on-demand', got {market!r}")


def _as_cached(price: Price) -> Price:
    if price.source != "api":
        return price
    return Price(instance_type=price.instance_type, market=price.market, usd_per_hour=price.usd_per_hour,
                 zone=price.zone, source="cache", fetched_at=price.fetched_at)
