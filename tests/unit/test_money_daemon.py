"""Money in the daemon: node quotes, the growth cap, the coordinator's billing at price-book
prices, its growth refusal and GetCost, the instance-type ranking the fleet asks for, and the
config/spec fields that feed them. Pure rules get the clock passed in; the coordinator runs on
a real SQLite store with a fake clock; the price book's AWS clients are real botocore clients
fed by Stubber with responses in AWS's shapes (moto has no Pricing API)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from spotwise.cloud.pricing import Price, PriceBook, PricingConfig, load_offline_table
from spotwise.config import ConfigError, DaemonConfig
from spotwise.daemon.budget import (
    BudgetJob,
    Ledger,
    NodePrice,
    plan_budget,
    plan_growth_cap,
    project_cost,
)
from spotwise.daemon.controller import JobState, NodeState, Policy
from spotwise.daemon.coordinator import Coordinator
from spotwise.daemon.fleet import demands_of
from spotwise.daemon.prices import OVERRIDE_SOURCE, NodePricer, describe_source, quote_node
from spotwise.daemon.store import Store
from spotwise.proto.v1 import agent_pb2, jobs_pb2
from spotwise.spec import JobSpec, SpecError, validate_spec_proto
from tests.support import agents

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pricing"
OFFLINE = load_offline_table()
G4_OD = OFFLINE.on_demand["g4dn.xlarge"]
G4_SPOT = OFFLINE.spot_price("g4dn.xlarge")


SECRETS: dict[str, str] = {}
"""Node id -> the credential its Register issued."""


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- quote_node (pure) --------------------------------------------------------------------


def _price(usd: float, market: str = "spot", source: str = "api", fetched_at: float = 100.0) -> Price:
    return Price(instance_type="g4dn.xlarge", market=market, usd_per_hour=usd, zone="us-east-1a",
                 source=source, fetched_at=fetched_at)


def test_an_agents_price_overrides_the_book_and_keeps_the_on_demand_reference() -> None:
    q = quote_node(instance_type="g4dn.xlarge", override_usd_per_hour=0.3,
                   market_price=_price(0.2), on_demand_price=_price(0.526, "on-demand"), now=100.0,
                   unpriced_usd_per_hour=99.0)
    assert q.price == NodePrice(usd_per_hour=0.3, on_demand_usd_per_hour=0.526)
    assert q.source == f"{OVERRIDE_SOURCE} (on-demand reference: on-demand api)"


def test_without_override_the_market_price_is_charged_and_its_source_named() -> None:
    q = quote_node(instance_type="g4dn.xlarge", override_usd_per_hour=0.0,
                   market_price=_price(0.2, source="cache"), on_demand_price=None, now=140.0,
                   unpriced_usd_per_hour=99.0)
    assert q.price == NodePrice(usd_per_hour=0.2, on_demand_usd_per_hour=None)
    assert q.source == "spot cache (40 s old)"
    assert describe_source(_price(0.5, "on-demand"), 100.0) == "on-demand api"
    assert describe_source(_price(0.5, source=OFFLINE.source), 100.0) == OFFLINE.source


def test_a_node_no_source_prices_is_charged_the_stated_upper_bound_never_nothing() -> None:
    q = quote_node(instance_type="local", override_usd_per_hour=0.0, market_price=None,
                   on_demand_price=None, now=0.0, unpriced_usd_per_hour=98.32)
    assert q.price.usd_per_hour == 98.32
    assert "no price for local" in q.source and "upper bound $98.32/h" in q.source


def test_the_pricers_upper_bound_is_the_dearest_offline_price_unless_set() -> None:
    dearest = max(OFFLINE.on_demand.values())
    unknown = {"instance_type": "x9.nothing", "zone": "", "lifecycle": "spot"}
    assert NodePricer(clock=Clock()).quote(**unknown).price.usd_per_hour == dearest
    assert NodePricer(clock=Clock(), unpriced_usd_per_hour=7.5).quote(
        **unknown).price.usd_per_hour == 7.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="unpriced_usd_per_hour"):
            NodePricer(clock=Clock(), unpriced_usd_per_hour=bad)


# ---- NodePricer ---------------------------------------------------------------------------


def test_offline_pricer_quotes_the_dated_table_and_never_refreshes() -> None:
    pricer = NodePricer(clock=Clock())
    spot = pricer.quote(instance_type="g4dn.xlarge", zone="us-east-1a", lifecycle="spot")
    assert spot.price.usd_per_hour == pytest.approx(G4_SPOT)
    assert spot.price.on_demand_usd_per_hour == G4_OD
    assert spot.source == OFFLINE.source and spot.source.startswith("offline table 20")
    od = pricer.quote(instance_type="g4dn.xlarge", zone="us-east-1a", lifecycle="on-demand")
    assert od.price == NodePrice(usd_per_hour=G4_OD, on_demand_usd_per_hour=G4_OD)
    assert not pricer.refresh_due(Clock()()) and pricer.refresh() == 0


def _spot_page() -> dict:
    page = json.loads((FIXTURES / "describe_spot_price_history.json").read_text())
    page.pop("NextToken", None)
    return page


def test_pricer_refresh_replaces_the_offline_quote_with_api_prices_then_cache() -> None:
    clock = Clock()
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t")
    pricing = boto3.client("pricing", region_name="us-east-1", aws_access_key_id="t",
                           aws_secret_access_key="t")
    book = PriceBook(PricingConfig(spot_max_age_s=300), ec2_client=ec2, pricing_client=pricing,
                     clock=clock)
    pricer = NodePricer(book, refresh_s=60, clock=clock)
    before = pricer.quote(instance_type="g4dn.xlarge", zone="us-east-1a", lifecycle="spot")
    assert before.source == OFFLINE.source  # nothing fetched yet: never blocks on the API
    assert pricer.refresh_due(clock.now)
    products = json.loads((FIXTURES / "get_products_g4dn.xlarge.json").read_text())
    with Stubber(ec2) as ec2_stub, Stubber(pricing) as pricing_stub:
        pricing_stub.add_response("get_products", copy.deepcopy(products))
        ec2_stub.add_response("describe_spot_price_history", _spot_page())
        assert pricer.refresh() == 2
        ec2_stub.assert_no_pending_responses()
        pricing_stub.assert_no_pending_responses()
    after = pricer.quote(instance_type="g4dn.xlarge", zone="us-east-1a", lifecycle="spot")
    # the newest us-east-1a entry of the history, the on-demand price from the PriceList
    assert after.price == NodePrice(usd_per_hour=0.2075, on_demand_usd_per_hour=0.526)
    assert after.source == "spot api (on-demand reference: on-demand api)"
    assert not pricer.refresh_due(clock.now + 30)
    clock.now += 61
    assert pricer.refresh_due(clock.now)
    with Stubber(ec2), Stubber(pricing):  # fresh in the book's cache: no call may be made
        assert pricer.refresh() == 2
    cached = pricer.quote(instance_type="g4dn.xlarge", zone="us-east-1a", lifecycle="spot")
    assert cached.source == ("spot cache (61 s old) (on-demand reference: on-demand cache (61 s old))")
    assert cached.price.usd_per_hour == 0.2075


# ---- the growth cap (pure) ----------------------------------------------------------------


def _ledger(now: float, nodes: int, usd_per_hour: float, spent: float = 0.0) -> Ledger:
    return Ledger(last_tick=now, spent_usd=spent,
                  billing={f"n{i}": NodePrice(usd_per_hour=usd_per_hour) for i in range(nodes)})


def test_growth_is_capped_where_the_projection_to_completion_exceeds_the_budget() -> None:
    # 1 node at $36/h = $0.01/s, 100 samples/s, 10_000 samples left: 100 s at 1 node -> $1.
    # Linear scaling: n nodes finish in 100/n s at $0.01*n/s -> $1 whatever n, so the spend
    # decides: with $2 spent, a $3.5 budget carries any size; a $2.9 budget carries none more.
    job = BudgetJob(job_id="j", budget_usd=3.5, remaining_samples=10_000,
                    samples_per_second=100.0, nodes=1)
    ledger = _ledger(0.0, 1, 36.0, spent=2.0)
    cap = plan_growth_cap(0.0, job, ledger, tick_s=1.0, max_nodes=4, added_usd_per_hour=[36.0] * 3)
    assert cap.max_nodes == 4 and not cap.refused
    tight = BudgetJob(job_id="j", budget_usd=2.9, remaining_samples=10_000,
                      samples_per_second=100.0, nodes=1)
    cap = plan_growth_cap(0.0, tight, ledger, tick_s=1.0, max_nodes=4, added_usd_per_hour=[36.0] * 3)
    assert cap.max_nodes == 1 and cap.refused and "projection" in cap.reason


def test_a_costlier_added_node_is_refused_where_a_cheap_one_fits() -> None:
    # 2 nodes at $3.6/h, 10 samples/s, 3600 samples left -> 360 s -> $0.72 more at this size.
    job = BudgetJob(job_id="j", budget_usd=1.0, remaining_samples=3600, samples_per_second=10.0,
                    nodes=2)
    ledger = _ledger(0.0, 2, 3.6)
    cheap = plan_growth_cap(0.0, job, ledger, tick_s=1.0, max_nodes=3, added_usd_per_hour=[3.6])
    assert cheap.max_nodes == 3 and not cheap.refused  # 240 s at $10.8/h = $0.72
    dear = plan_growth_cap(0.0, job, ledger, tick_s=1.0, max_nodes=3, added_usd_per_hour=[36.0])
    assert dear.max_nodes == 2 and dear.refused  # 240 s at $43.2/h = $2.88 > $1


def test_no_cap_without_budget_for_a_job_without_nodes_or_of_unknown_length() -> None:
    ledger = _ledger(0.0, 1, 3600.0, spent=0.5)
    free = BudgetJob(job_id="j", budget_usd=0.0, remaining_samples=10, samples_per_second=1.0, nodes=1)
    assert plan_growth_cap(0.0, free, ledger, tick_s=1, max_nodes=3, added_usd_per_hour=[]).max_nodes == 3
    pending = BudgetJob(job_id="j", budget_usd=1.0, remaining_samples=10, samples_per_second=0.0, nodes=0)
    assert not plan_growth_cap(0.0, pending, Ledger(last_tick=0.0), tick_s=1, max_nodes=3,
                               added_usd_per_hour=[1e6]).refused
    unknown = BudgetJob(job_id="j", budget_usd=100.0, remaining_samples=None,
                        samples_per_second=1.0, nodes=1)
    assert project_cost(spent_usd=1, rate_usd_per_hour=1, samples_per_second=1,
                        remaining_samples=None).projected_usd is None
    cap = plan_growth_cap(0.0, unknown, ledger, tick_s=1, max_nodes=3, added_usd_per_hour=[1.0])
    assert cap.max_nodes == 3 and not cap.refused  # no length, no projection: only the tick rule
    # ... which still refuses a node whose one tick would overrun the budget
    cap = plan_growth_cap(0.0, unknown, ledger, tick_s=1, max_nodes=3, added_usd_per_hour=[1e6])
    assert cap.max_nodes == 1 and cap.refused and "within one tick" in cap.reason
    decision = plan_budget(0.0, unknown, ledger, tick_s=1)
    assert "nothing to project" in decision.reason


# ---- the coordinator ----------------------------------------------------------------------


def make(tmp_path: Path, clock: Clock, **kw: object) -> Coordinator:
    policy = Policy(lease_s=1e9, settle_s=0.5, settle_max_s=1.5, grow_checkpoint_timeout_s=0)
    return Coordinator(Store(tmp_path / "db"), policy=policy, heartbeat_interval_s=0.5,
                       accounting_interval_s=10.0, clock=clock, agent_prices=True, **kw)


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                               "global_batch_size": 10, "nodes": {"min": 1, "max": 2}}
    base.update(kw)
    return JobSpec.model_validate(base)


def join(coord: Coordinator, address: str, **kw: object) -> str:
    fields: dict[str, object] = {"instance_type": "g4dn.xlarge", "zone": "us-east-1a",
                                 "lifecycle": "spot"}
    fields.update(kw)
    resp = agents.join(coord, address=address, **fields)
    SECRETS[resp.node_id] = resp.node_secret
    return resp.node_id


def progress(coord: Coordinator, node: str, job_id: str, generation: int, step: int,
             sps: float) -> None:
    report = agent_pb2.ReportEventRequest(node_id=node, node_secret=SECRETS[node], job_id=job_id, generation=generation)
    report.progress.step = step
    report.progress.samples_per_second = sps
    report.progress.world_size = 1
    assert coord.report(report).accepted


def test_nodes_are_charged_at_book_prices_and_getcost_says_where_they_came_from(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 2, "max": 2}).to_proto())
    join(coord, "10.0.0.1")  # spot g4dn.xlarge: the table's spot price
    join(coord, "10.0.0.2", lifecycle="on-demand")  # the on-demand price
    clock.now += 1
    coord.tick()
    assert job.row.generation == 1
    clock.now += 3600
    report = coord.cost_report(job)
    assert report.rate_usd_per_hour == pytest.approx(G4_SPOT + G4_OD)
    assert report.spent_usd == pytest.approx(G4_SPOT + G4_OD)
    assert report.on_demand_equivalent_usd == pytest.approx(2 * G4_OD)
    assert report.savings_usd == pytest.approx(G4_OD - G4_SPOT)
    assert report.price_source == OFFLINE.source
    assert report.projected_usd == 0.0  # no total_steps: nothing to project


def test_the_time_the_daemon_was_down_is_charged_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 1, "max": 1}).to_proto())
    join(coord, "10.0.0.1")
    clock.now += 1
    coord.tick()
    clock.now += 3600
    coord.account(clock.now)  # one hour charged and stored
    assert job.row.cost_usd == pytest.approx(G4_SPOT)
    # The daemon is down for half an hour; its node goes on running (and costing).
    clock.now += 1800
    again = make(tmp_path, clock)
    again.tick()
    restored = again.jobs[job.row.id]
    assert restored.row.cost_usd == pytest.approx(1.5 * G4_SPOT)
    report = again.cost_report(restored)
    assert report.spent_usd == pytest.approx(1.5 * G4_SPOT)
    assert report.on_demand_equivalent_usd == pytest.approx(1.5 * G4_OD)


def test_a_budget_spent_while_the_daemon_was_down_stops_the_job_at_restart(
        tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 1, "max": 1}, budget_usd=2 * G4_SPOT).to_proto())
    join(coord, "10.0.0.1")
    clock.now += 1
    coord.tick()
    clock.now += 3600
    coord.account(clock.now)
    assert job.state is JobState.RUNNING
    clock.now += 3 * 3600  # down for three hours: the budget ran out meanwhile
    again = make(tmp_path, clock)
    again.tick()
    restored = again.jobs[job.row.id]
    assert restored.state is JobState.BUDGET_EXHAUSTED
    assert restored.row.cost_usd == pytest.approx(4 * G4_SPOT)


def test_an_agent_price_is_an_override_and_reported_as_such(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 2, "max": 2}).to_proto())
    join(coord, "10.0.0.1", price_per_hour=0.1)
    join(coord, "10.0.0.2")
    clock.now += 1
    coord.tick()
    clock.now += 3600
    report = coord.cost_report(job)
    assert report.rate_usd_per_hour == pytest.approx(0.1 + G4_SPOT)
    assert report.on_demand_equivalent_usd == pytest.approx(2 * G4_OD)  # from the book still
    assert report.price_source == (
        f"{OVERRIDE_SOURCE} (on-demand reference: {OFFLINE.source}); {OFFLINE.source}")


def test_growth_the_projection_cannot_carry_is_refused_and_said(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    # 1 node at $1/s (override); 10 samples/s and 10 samples per step: 1 step/s. 200 steps
    # left -> 200 s -> $200 more; a budget of $300 carries it at one node, and at two (linear
    # scaling: 100 s at $2/s); with node b at $5/s growth would cost 100 s x $6/s = $600.
    job = coord.submit(spec(budget_usd=300.0, total_steps=200).to_proto())
    a = join(coord, "10.0.0.1", price_per_hour=3600.0)
    clock.now += 1
    coord.tick()
    assert job.members == [a] and job.state is JobState.RUNNING
    progress(coord, a, job.row.id, 1, 0, 10.0)
    b = join(coord, "10.0.0.2", price_per_hour=5 * 3600.0)
    clock.now += 1
    coord.tick()  # b becomes free in this tick; the cap, priced with b, comes before the plan
    assert coord.nodes[b].state is NodeState.READY and job.members == [a]  # not grown
    assert coord.job_view(job).budget_max_nodes == 1
    coord.account(clock.now)  # the accounting tick tells the user
    assert job.row.message.startswith("budget: growth beyond 1 node(s) refused")
    clock.now += 1
    coord.tick()
    coord.account(clock.now)
    assert job.members == [a]
    events = [e.message for e in coord.store.events(job.row.id) if e.kind == "cost"]
    assert len(events) == 1 and "projection" in events[0] and "> budget $300" in events[0]
    report = coord.cost_report(job)
    # spent $2 so far (2 s at $1/s), 200 steps left at 1 step/s at $1/s
    assert report.projected_usd == pytest.approx(report.spent_usd + 200.0)
    # the price falls (the agent re-registers cheaper): growth is allowed again, and happens
    coord.register(agent_pb2.RegisterRequest(node_id=b, node_secret=SECRETS[b], address="10.0.0.2", store_port=7000,
                                             slots=1, price_per_hour=3600.0))
    coord.heartbeat(agent_pb2.HeartbeatRequest(node_id=b, node_secret=SECRETS[b]))
    clock.now += 1
    coord.tick()
    clock.now += 10
    coord.tick()  # accounting
    assert coord.job_view(job).budget_max_nodes is None
    assert "growth allowed again" in [e.message for e in coord.store.events(job.row.id)
                                      if e.kind == "cost"][-1]
    clock.now += 1
    coord.tick()
    assert sorted(job.members) == sorted([a, b])


def test_instance_types_ranked_by_price_per_measured_throughput_feed_the_fleet(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(instance_types=["g5.xlarge", "g4dn.xlarge", "x9.unknown"],
                            nodes={"min": 1, "max": 3}).to_proto())
    # unmeasured: cheapest per hour first, types without a price last
    assert coord.instance_types_for(job) == ("g4dn.xlarge", "g5.xlarge", "x9.unknown")
    a = join(coord, "10.0.0.1", instance_type="g5.xlarge")
    clock.now += 1
    coord.tick()
    # g5 measured at 100 samples/s per node: cheaper per sample than an unmeasured g4dn
    progress(coord, a, job.row.id, 1, 5, 100.0)
    assert job.type_samples_per_second == {"g5.xlarge": 100.0}
    demand = demands_of(coord, daemon_address="127.0.0.1:1")
    assert demand[0].request.instance_types == ("g5.xlarge", "g4dn.xlarge", "x9.unknown")
    assert demand[0].wanted == 3
    # a measured g4dn at 80 samples/s per node costs less per sample than g5 at 100
    job.type_samples_per_second["g4dn.xlarge"] = 80.0
    assert coord.instance_types_for(job)[0] == "g4dn.xlarge"
    # the fleet asks only for what the budget lets the job grow to
    job.budget_cap = 1
    assert demands_of(coord, daemon_address="127.0.0.1:1")[0].wanted == 1


# ---- config and spec ----------------------------------------------------------------------


def test_daemon_ec2_and_pricing_tables_map_onto_the_provider_and_price_book(tmp_path: Path) -> None:
    path = tmp_path / "spotwise.toml"
    path.write_text(
        '[daemon]\nprovider = "ec2"\n'
        '[daemon.ec2]\nregion = "eu-west-1"\nlaunch_template = "lt-0abc"\n'
        'zones = ["eu-west-1a", "eu-west-1b"]\ncluster = "prod"\nendpoint_url = "http://127.0.0.1:9"\n'
        '[daemon.pricing]\nspot_max_age_s = 60\nrefresh_s = 15\n')
    config = DaemonConfig.load(path, state_dir=tmp_path)
    ec2 = config.ec2.ec2_config()
    assert (ec2.region, ec2.launch_template, ec2.zones, ec2.cluster, ec2.endpoint_url) == (
        "eu-west-1", "lt-0abc", ("eu-west-1a", "eu-west-1b"), "prod", "http://127.0.0.1:9")
    assert not config.pricing_offline and config.pricing.spot_max_age_s == 60
    from spotwise.daemon.server import make_pricer, make_provider

    pricer = make_pricer(config)
    assert pricer.book is not None and pricer.refresh_s == 15
    assert pricer.book.config.region == "eu-west-1"  # follows the fleet's region
    assert pricer.book.config.ec2_endpoint_url == "http://127.0.0.1:9"
    assert make_provider(config).name == "ec2"
    # local daemons price offline unless told otherwise; offline = false forces the API
    assert DaemonConfig.load(None, state_dir=tmp_path, provider="local").pricing_offline
    assert make_pricer(DaemonConfig.load(None, state_dir=tmp_path)).book is None
    assert not DaemonConfig.load(None, state_dir=tmp_path, pricing={"offline": False}).pricing_offline
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nprovider = "ec2"\n[daemon.pricing]\nrefresh_s = 0\n')
    with pytest.raises(ConfigError, match="pricing.refresh_s"):
        DaemonConfig.load(bad)
    bad.write_text('[daemon]\nprovider = "ec2"\n[daemon.ec2]\nzones = ["us-east-1a"]\n')
    with pytest.raises(ConfigError, match="launch_template"):
        DaemonConfig.load(bad)


def test_total_steps_travels_yaml_to_proto_and_back_and_is_checked() -> None:
    s = spec(total_steps=1200)
    msg = s.to_proto()
    assert msg.total_steps == 1200 and validate_spec_proto(msg).total_steps == 1200
    assert JobSpec.from_proto(jobs_pb2.JobSpec.FromString(msg.SerializeToString())) == s
    assert spec().total_steps == 0
    with pytest.raises(Exception) as err:
        spec(total_steps=-1)
    assert "total_steps" in str(err.value)
    with pytest.raises(SpecError):
        validate_spec_proto(jobs_pb2.JobSpec(entrypoint=["x"], total_steps=5))  # no checkpoint


def test_a_node_finishing_an_ended_jobs_final_checkpoint_is_kept_for_a_bounded_time() -> None:
    from spotwise.daemon.fleet import FleetNode, plan_fleet

    ended = FleetNode(handle="i-1", launched_for="job-gone", first_seen=0.0,
                      daemon_state=NodeState.READY, winding_down_since=100.0)
    idle = FleetNode(handle="i-2", launched_for="job-gone", first_seen=0.0,
                     daemon_state=NodeState.READY)
    plan = plan_fleet(130.0, [], [ended, idle], wind_down_s=60.0)
    assert plan.terminate == ("i-2",) and any("final checkpoint" in r for r in plan.reasons)
    assert plan_fleet(161.0, [], [ended, idle], wind_down_s=60.0).terminate == ("i-1", "i-2")


def test_throughput_of_another_world_size_is_not_projected_from(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(budget_usd=10.0, total_steps=100).to_proto())
    a = join(coord, "10.0.0.1")
    clock.now += 1
    coord.tick()
    progress(coord, a, job.row.id, 1, 3, 50.0)  # world size 1, as the job runs now
    assert coord.budget_job(job).samples_per_second == 50.0
    assert coord.budget_job(job).remaining_samples == 97 * 10
    job.progress_world_size = 2  # measured before a rescale to another size
    assert coord.budget_job(job).samples_per_second == 0.0
    assert coord.cost_report(job).projected_usd == 0.0  # unknown, shown as "-"


def test_idle_nodes_launched_for_a_job_are_billed_to_it_until_it_ends(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 1, "max": 1}).to_proto())
    a = join(coord, "10.0.0.1", price_per_hour=1.0)
    clock.now += 1
    coord.tick()
    assert job.members == [a]
    spare = join(coord, "10.0.0.2", price_per_hour=2.0)  # the fleet launched it for the job
    coord.nodes[spare].launched_for = job.row.id
    stranger = join(coord, "10.0.0.3", price_per_hour=4.0)  # nobody's: not the job's cost
    clock.now += 1
    coord.tick()
    coord.account(clock.now)
    assert coord.cost_report(job).rate_usd_per_hour == 3.0
    assert coord.nodes[stranger].state is NodeState.READY
    clock.now += 1
    coord.cancel(job.row.id)
    clock.now += 3600  # nothing is billed once the job ended
    ended = coord.cost_report(job)
    assert ended.rate_usd_per_hour == 0.0 and ended.spent_usd == pytest.approx(
        1.0 * 1 / 3600 + 3.0 * 1 / 3600)  # a alone for 1 s, then a and the spare for 1 s


def test_a_spec_without_types_gets_the_providers_defaults_ranked(tmp_path: Path) -> None:
    coord = make(tmp_path, Clock(), default_instance_types=("g5.xlarge", "g4dn.xlarge"))
    job = coord.submit(spec().to_proto())
    assert coord.instance_types_for(job) == ("g4dn.xlarge", "g5.xlarge")
    assert make(tmp_path / "x", Clock()).instance_types_for(job) == ()


def test_a_node_is_priced_by_its_provider_or_the_book_never_by_its_own_word(tmp_path: Path) -> None:
    clock = Clock()
    policy = Policy(lease_s=1e9, settle_s=0.5, settle_max_s=1.5, grow_checkpoint_timeout_s=0)
    coord = Coordinator(Store(tmp_path / "db"), policy=policy, heartbeat_interval_s=0.5,
                        accounting_interval_s=10.0, clock=clock,
                        provider_price=lambda handle: 2.0 if handle == "local-1" else None)
    job = coord.submit(spec(nodes={"min": 2, "max": 2}).to_proto())
    launched = agents.join(coord, address="10.0.0.1", provider_node="local-1",
                           instance_type="g4dn.xlarge", price_per_hour=99.0).node_id
    stranger = agents.join(coord, address="10.0.0.2", instance_type="g4dn.xlarge",
                           zone="us-east-1a", price_per_hour=0.01).node_id  # says it is nearly free
    clock.now += 1
    coord.tick()
    assert sorted(job.members) == sorted([launched, stranger])
    assert coord.nodes[launched].row.price_per_hour == 0.0  # the agent's word is not stored
    report = coord.cost_report(job)
    assert report.rate_usd_per_hour == pytest.approx(2.0 + G4_SPOT)
    assert "provider price_per_hour" in report.price_source
    assert OFFLINE.source in report.price_source and "agent price_per_hour" not in report.price_source
