"""Trace replay on the local provider: spot capacity that comes and goes as a real trace says.

A `TraceReplayer` carries out a `ReplaySchedule` (spotwise.cloud.trace) on a `LocalProvider`:

- "add": launch that many node agents, each with its own fake instance metadata service
  (spotwise.cloud.fake_imds, IMDSv2) passed as `--imds-endpoint`, as every EC2 instance has one;
- "notice": pick that many live nodes (seeded) and make their metadata service answer
  `spot/instance-action` with `{"action": "terminate", "time": <the removal time>}`, exactly
  as AWS does about two minutes (here `notice_lead_s`) before it takes the instance;
- "remove": SIGKILL that many nodes (`LocalProvider.kill`: the agent and its training
  processes), the noticed ones first (their deadline has come), then others chosen at random.

The replayer owns the nodes: the daemon runs without a provider (`provider = "none"`), so no
fleet reconciler launches or terminates nodes against the trace. An availability trace is the
cloud's answer to "how many can I have": the replay never runs more nodes than the trace's level.

Which nodes go is decided by `pick_notice` and `pick_removal` (pure, seeded). The clock runs in
a background thread (`start`), or a caller drives it with `advance(elapsed)` (tests).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spotwise.cloud.fake_imds import FakeImds
from spotwise.cloud.local import LocalProvider
from spotwise.cloud.provider import NodeRequest
from spotwise.cloud.trace import ReplayEvent, ReplaySchedule

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ReplayNode:
    """A node the replay launched."""

    handle: str
    imds: FakeImds | None
    """Its own metadata service (None when the replay gives no notices)."""
    deadline: float | None = None
    """Replay seconds at which a noticed node is removed; None without a notice."""


@dataclass(frozen=True, kw_only=True)
class ReplayAction:
    """One thing the replay did, for the caller's log and tests."""

    t: float
    """Replay seconds when it was done."""
    kind: str
    """"add", "notice" or "remove"."""
    handles: tuple[str, ...]
    reason: str


@dataclass(kw_only=True)
class ReplayStats:
    """Counts of what the replay did."""

    added: int = 0
    noticed: int = 0
    removed_with_notice: int = 0
    removed_without_notice: int = 0
    actions: list[ReplayAction] = field(default_factory=list)


def pick_notice(live: Sequence[str], noticed: Sequence[str], count: int,
                rng: random.Random) -> list[str]:
    """`count` live nodes that have no notice yet, chosen at random (fewer if there are not
    enough)."""
    candidates = sorted(h for h in live if h not in set(noticed))
    rng.shuffle(candidates)
    return candidates[:max(0, count)]


def pick_removal(live: Sequence[str], noticed: Sequence[str], count: int,
                 rng: random.Random) -> list[str]:
    """`count` live nodes to remove: those under notice first (oldest notice first), then
    others chosen at random."""
    alive = set(live)
    first = [h for h in noticed if h in alive][:max(0, count)]
    rest = sorted(h for h in alive if h not in set(first))
    rng.shuffle(rest)
    return first + rest[:max(0, count - len(first))]


def _removal_times(events: Sequence[ReplayEvent]) -> dict[int, float]:
    """For each notice (by index), the time of the removal it announces: the next "remove"."""
    out: dict[int, float] = {}
    for i, event in enumerate(events):
        if event.kind == "notice":
            later = [e.t for e in events[i + 1:] if e.kind == "remove"]
            out[i] = later[0] if later else event.t
    return out


class TraceReplayer:
    """Carries out a replay schedule on a local provider (see the module docstring).

    `request` is the NodeRequest every node is launched with (job_id "" for agents the daemon
    may give to any job). `on_action` is called with each ReplayAction (from the replay thread).
    The replayer installs its `node_args` hook on the provider: every node the provider launches
    from then on gets its own metadata service. With `notices=False` nodes get none and
    "notice" events do nothing (a system that ignores notices, for baselines): a noticed
    removal is then a plain SIGKILL at the same moment.
    """

    def __init__(self, provider: LocalProvider, schedule: ReplaySchedule, request: NodeRequest,
                 *, seed: int = 0, on_action: Callable[[ReplayAction], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, notices: bool = True) -> None:
        self.provider = provider
        self.schedule = schedule
        self.request = request
        self.on_action = on_action
        self.clock = clock
        self.stats = ReplayStats()
        self._rng = random.Random(seed)
        self._removal_at = _removal_times(schedule.events)
        self._next = 0
        self._nodes: dict[str, ReplayNode] = {}
        self._noticed: list[str] = []
        self._pending_imds: dict[str, FakeImds] = {}
        self._lock = threading.RLock()
        self._t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        """What stopped the replay thread, if it failed."""
        self.notices = notices
        if notices:
            provider.node_args = self.node_args

    # ---- the provider hook ------------------------------------------------------------------

    def node_args(self, handle: str) -> list[str]:
        """LocalProvider's `node_args`: a fresh metadata service for the node being launched."""
        digest = hashlib.sha256(f"{self.provider.cluster}/{handle}".encode()).hexdigest()[:17]
        imds = FakeImds(instance_id=f"i-{digest}", instance_type=self.provider.instance_type,
                        zone="local").start()
        self._pending_imds[handle] = imds
        return ["--imds-endpoint", imds.url]

    # ---- the clock --------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Replay seconds since `start` (0 before it)."""
        return 0.0 if self._t0 is None else self.clock() - self._t0

    @property
    def done(self) -> bool:
        """Every event of the schedule has been carried out."""
        return self._next >= len(self.schedule.events)

    def begin(self) -> list[ReplayAction]:
        """Carry out the events at t = 0 (the initial nodes) now, before the clock starts, so
        that a caller can wait for its job to train before the trace moves. Only launches: a
        notice at t = 0 (a drop within notice_lead_s of the start) waits for the clock, so
        that its deadline is the moment its removal really comes."""
        done: list[ReplayAction] = []
        events = self.schedule.events
        while self._next < len(events) and events[self._next].t == 0.0 \
                and events[self._next].kind == "add":
            done += self.advance_one()
        return done

    def start(self) -> None:
        """Start the clock (t = 0 now) and a thread that carries out each event on time."""
        assert self._thread is None, "start() once"
        self._t0 = self.clock()
        self._thread = threading.Thread(target=self._run, name="trace-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.done:
                next_t = self.schedule.events[self._next].t
                wait = next_t - self.elapsed
                if wait > 0:
                    self._stop.wait(min(wait, 0.5))
                    continue
                self.advance(self.elapsed)
        except BaseException as exc:  # handed to the owner, who reads `error`
            log.exception("trace replay failed")
            self.error = exc

    def advance(self, elapsed: float) -> list[ReplayAction]:
        """Carry out every event due at or before `elapsed` replay seconds; returns what was
        done. Raises ProviderError if a launch or kill fails."""
        done: list[ReplayAction] = []
        with self._lock:
            events = self.schedule.events
            while self._next < len(events) and events[self._next].t <= elapsed:
                done += self.advance_one()
        return done

    def advance_one(self) -> list[ReplayAction]:
        """Carry out the next event, whenever it is due; returns what was done."""
        with self._lock:
            if self.done:
                return []
            index = self._next
            self._next += 1
            action = self._apply(index, self.schedule.events[index])
            if action is None:
                return []
            self.stats.actions.append(action)
        log.info("replay t=%.1fs: %s", action.t, action.reason)
        if self.on_action is not None:
            self.on_action(action)
        return [action]

    def _live(self) -> list[str]:
        alive = {n.handle for n in self.provider.list_nodes()}
        for handle in [h for h in self._nodes if h not in alive]:
            self._forget(handle)  # it died on its own (or someone else killed it)
        return sorted(self._nodes)

    def _apply(self, index: int, event: ReplayEvent) -> ReplayAction | None:
        live = self._live()
        if event.kind == "add":
            # The trace's level is the most the cloud gives: never more nodes than that. (Half a
            # sample in, so that float rounding of t cannot read the previous sample's level.)
            level = self._level(event.t)
            count = min(event.count, max(0, level - len(live)))
            started = self.provider.launch(self.request, count)
            for node in started:
                imds = self._pending_imds.pop(node.handle, None)
                assert imds is not None or not self.notices, "the provider lost our node_args hook"
                self._nodes[node.handle] = ReplayNode(handle=node.handle, imds=imds)
            handles = tuple(n.handle for n in started)
            self.stats.added += len(handles)
            return ReplayAction(t=event.t, kind="add", handles=handles,
                                reason=f"trace level {level}: launched {', '.join(handles) or 'nothing'}")
        if event.kind == "notice" and not self.notices:
            return None
        if event.kind == "notice":
            chosen = pick_notice(live, self._noticed, event.count, self._rng)
            removal_t = self._removal_at[index]
            lead = max(0.0, removal_t - event.t)
            now_unix = time.time()
            for handle in chosen:
                node = self._nodes[handle]
                node.deadline = removal_t
                assert node.imds is not None
                node.imds.schedule_instance_action("terminate", at=now_unix, lead_s=lead)
                self._noticed.append(handle)
            self.stats.noticed += len(chosen)
            return ReplayAction(t=event.t, kind="notice", handles=tuple(chosen),
                                reason=f"spot/instance-action terminate for "
                                       f"{', '.join(chosen) or 'nothing'}, {lead:.1f}s ahead")
        if event.kind == "remove":
            victims = pick_removal(live, self._noticed, event.count, self._rng)
            with_notice = [h for h in victims if self._nodes[h].deadline is not None]
            for handle in victims:
                self.provider.kill(handle)
                self._forget(handle)
            self.stats.removed_with_notice += len(with_notice)
            self.stats.removed_without_notice += len(victims) - len(with_notice)
            return ReplayAction(t=event.t, kind="remove", handles=tuple(victims),
                                reason=f"trace level {self._level(event.t)}: SIGKILL "
                                       f"{', '.join(victims) or 'nothing'} "
                                       f"({len(with_notice)} after a notice)")
        raise ValueError(f"unknown replay event kind {event.kind!r}")

    def _level(self, t: float) -> int:
        return self.schedule.level_at(t + self.schedule.step_s / 2)

    def _forget(self, handle: str) -> None:
        node = self._nodes.pop(handle, None)
        if handle in self._noticed:
            self._noticed.remove(handle)
        if node is not None and node.imds is not None:
            node.imds.stop()

    def nodes(self) -> list[str]:
        """Handles of the live nodes the replay launched."""
        with self._lock:
            return self._live()

    def stop(self) -> None:
        """Stop the clock thread and every metadata service; the nodes keep running (the
        provider's `shutdown` stops them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for handle in list(self._nodes):
                self._forget(handle)
            for imds in self._pending_imds.values():
                imds.stop()
            self._pending_imds.clear()

