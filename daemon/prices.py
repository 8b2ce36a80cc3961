"""What each node is charged: the price book's price for its type, zone and lifecycle.

The ledger needs a price for every billed node at every accounting tick, on the daemon's event
loop, where a Pricing API call (seconds, maybe a timeout) must not run. So prices are quoted
from what the last `refresh` found, and `refresh` (the only call that may reach AWS) runs in a
worker thread of the daemon's pricing loop. Before a type's first refresh, and when the API
cannot answer, the dated offline table shipped with the package answers, and the quote says so.

The rule of one quote is `quote_node`, pure: an agent's explicit `price_per_hour` overrides the
book (a machine whose price the operator knows better); otherwise the book's price in the
node's market (spot for spot nodes, on-demand for on-demand ones); the on-demand price of the
same type is carried along for the saving report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from spotwise.cloud.pricing import OfflineTable, Price, PriceBook, load_offline_table
from spotwise.daemon.budget import NodePrice

log = logging.getLogger(__name__)

OVERRIDE_SOURCE = "agent price_per_hour"
PROVIDER_SOURCE = "provider price_per_hour"


@dataclass(frozen=True, kw_only=True)
class Quote:
    """One node's price and where it came from."""

    price: NodePrice
    source: str
    """"agent price_per_hour", "spot api", "on-demand cache (40 s old)", "offline table <date>",
    or "no price for <type> (charged the upper bound ...)"; followed by "(on-demand reference: ...)" when the
    on-demand price of the saving report came from elsewhere."""


def market_of(lifecycle: str) -> str:
    """The price market of a node's lifecycle ("on-demand" stays, anything else is spot)."""
    return "on-demand" if lifecycle == "on-demand" else "spot"


def describe_source(price: Price, now: float) -> str:
    """Where a price came from, for GetCost: "<market> api", "<market> cache (N s old)" or the
    offline table's name."""
    if price.source == "api":
        return f"{price.market} api"
    if price.source == "cache":
        return f"{price.market} cache ({price.age_s(now):.0f} s old)"
    return price.source


def quote_node(
    *,
    instance_type: str,
    override_usd_per_hour: float,
    override_source: str = OVERRIDE_SOURCE,
    market_price: Price | None,
    on_demand_price: Price | None,
    now: float,
    unpriced_usd_per_hour: float,
) -> Quote:
    """The price a node is charged (pure).

    `override_usd_per_hour` > 0 (the agent said what it costs) wins; otherwise `market_price`
    (the book's price in the node's market); with neither, the node is charged the stated
    upper bound `unpriced_usd_per_hour` (never $0: a budget must stop a job on machines
    nobody priced) and the source says so. `on_demand_price` (None: unknown) only feeds the
    on-demand equivalent.
    """
    on_demand = on_demand_price.usd_per_hour if on_demand_price is not None else None
    if override_usd_per_hour > 0:
        usd, source = override_usd_per_hour, override_source
    elif market_price is not None:
        usd, source = market_price.usd_per_hour, describe_source(market_price, now)
    else:
        usd = unpriced_usd_per_hour
        source = (f"no price for {instance_type or 'an unknown type'} (charged the upper bound "
                  f"${usd:.2f}/h, [daemon.pricing] unpriced_usd_per_hour)")
    if on_demand_price is not None and on_demand_price is not market_price:
        reference = describe_source(on_demand_price, now)
        if reference != source:
            source += f" (on-demand reference: {reference})"
    return Quote(price=NodePrice(usd_per_hour=usd, on_demand_usd_per_hour=on_demand), source=source)


def combined_source(sources: set[str]) -> str:
    """Several nodes' sources as one line (sorted, so it is stable)."""
    return "; ".join(sorted(sources))


class NodePricer:
    """Quotes without blocking; `refresh` fills them from the price book.

    `book` None means offline: only the shipped table answers, and nothing reaches AWS.
    Thread-safe: quotes are read on the event loop while a refresh runs in a worker thread.
    """

    def __init__(
        self,
        book: PriceBook | None = None,
        *,
        offline: OfflineTable | None = None,
        refresh_s: float = 60.0,
        unpriced_usd_per_hour: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`unpriced_usd_per_hour`: what a node no source prices is charged; None: the
        offline table's dearest on-demand price."""
        self.book = book
        self.offline = offline or (book.offline if book is not None else load_offline_table())
        if unpriced_usd_per_hour is None:
            unpriced_usd_per_hour = max(self.offline.on_demand.values())
        if not (unpriced_usd_per_hour > 0 and math.isfinite(unpriced_usd_per_hour)):
            raise ValueError("unpriced_usd_per_hour must be a positive number, got "
                             f"{unpriced_usd_per_hour}")
        self.unpriced_usd_per_hour = unpriced_usd_per_hour
        self.refresh_s = refresh_s
        self.clock = clock
        self._lock = threading.Lock()
        self._prices: dict[tuple[str, str, str], Price] = {}
        self._wanted: set[tuple[str, str, str]] = set()
        self._new_wanted = False
        self._refreshed_at: float | None = None
        self._refreshing = threading.Lock()
        self._closed = threading.Event()

    # ---- answering (event loop) ----------------------------------------------------------

    def _known(self, instance_type: str, market: str, zone: str) -> Price | None:
        """The last refreshed price, else the offline table's; registers the key for refresh."""
        if not instance_type:
            return None
        key = (instance_type, market, zone if market == "spot" else "")
        with self._lock:
            if key not in self._wanted:
                self._wanted.add(key)
                self._new_wanted = True
            found = self._prices.get(key)
        if found is not None:
            return found
        usd = (self.offline.spot_price(instance_type) if market == "spot"
               else self.offline.on_demand_price(instance_type))
        if usd is None:
            return None
        return Price(instance_type=instance_type, market=market, usd_per_hour=usd, zone=zone,
                     source=self.offline.source)

    def quote(self, *, instance_type: str, zone: str, lifecycle: str,
              override_usd_per_hour: float = 0.0, override_source: str = OVERRIDE_SOURCE
              ) -> Quote:
        """What a node with these properties is charged now."""
        market = market_of(lifecycle)
        on_demand = self._known(instance_type, "on-demand", "")
        market_price = on_demand if market == "on-demand" else (
            None if override_usd_per_hour > 0 else self._known(instance_type, "spot", zone))
        return quote_node(instance_type=instance_type, override_usd_per_hour=override_usd_per_hour,
                          override_source=override_source, market_price=market_price,
                          on_demand_price=on_demand, now=self.clock(),
                          unpriced_usd_per_hour=self.unpriced_usd_per_hour)

    def type_price(self, instance_type: str, market: str) -> float | None:
        """A type's hourly price in a job's market ("spot-with-fallback" counts as spot), for
        ranking types and pricing nodes not launched yet; None if no source knows it."""
        found = self._known(instance_type, "on-demand" if market == "on-demand" else "spot", "")
        return found.usd_per_hour if found is not None else None

    # ---- refreshing (worker thread) --------------------------------------------------------

    def refresh_due(self, now: float) -> bool:
        """A refresh is worth running: a new key was asked for, or the last one is old."""
        if self.book is None:
            return False
        with self._lock:
            if self._new_wanted:
                return True
            return bool(self._wanted) and (self._refreshed_at is None
                                           or now - self._refreshed_at >= self.refresh_s)

    def refresh(self) -> int:
        """Ask the book for every key quoted so far (blocking: may call AWS, each call bounded
        by the book's timeouts). Returns how many keys got a price; keys that no source knows
        keep their previous price."""
        if self.book is None or not self._refreshing.acquire(blocking=False):
            return 0  # offline, or an earlier (abandoned, slow) refresh still runs
        try:
            with self._lock:
                keys = sorted(self._wanted)
                self._new_wanted = False
            found: dict[tuple[str, str, str], Price] = {}
            for itype, market, zone in keys:
                if self._closed.is_set():
                    break
                try:
                    found[(itype, market, zone)] = self.book.price(itype, market, zone or None)
                except LookupError as exc:
                    log.info("pricing: %s", exc)
            with self._lock:
                self._prices.update(found)
                self._refreshed_at = self.clock()
        finally:
            self._refreshing.release()
        if found:
            log.info("pricing: refreshed %s", ", ".join(
                f"{k[0]} {k[1]}{' ' + k[2] if k[2] else ''} ${p.usd_per_hour:.4f}/h ({p.source})"
                for k, p in sorted(found.items())))
        return len(found)

    def close(self) -> None:
        """Make a refresh in flight stop after its current call (the daemon is stopping)."""
        self._closed.set()


async def refresh_loop(pricer: NodePricer, stop: asyncio.Event, *, poll_s: float = 1.0,
                       timeout_s: float = 60.0) -> None:
    """Refresh `pricer` in a worker thread whenever it is due, until `stop` is set. A refresh
    that takes longer than `timeout_s` is abandoned (its thread finishes on its own; the next
    refresh waits for it), and quotes go on from what is known."""
    while not stop.is_set():
        if pricer.refresh_due(pricer.clock()):
            refresh = asyncio.ensure_future(asyncio.to_thread(pricer.refresh))
            try:
                await asyncio.wait_for(asyncio.shield(refresh), timeout_s)
            except asyncio.CancelledError:
                # The daemon stops: no AWS call may outlive it, so let the one in flight end
                # (each is bounded by the book's timeouts) and skip the rest.
                pricer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(refresh, timeout_s)
                raise
            except asyncio.TimeoutError:
                log.warning("pricing: refresh took longer than %.0fs; quoting known prices", timeout_s)
            except Exception:
                # A bug in one refresh must not stop pricing for good; logged with its traceback.
                log.exception("pricing: refresh failed")
        try:
            await asyncio.wait_for(stop.wait(), poll_s)
        except asyncio.TimeoutError:
            pass
