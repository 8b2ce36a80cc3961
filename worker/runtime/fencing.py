"""Which commits are visible: the fencing rule that no pause can get around.

Layout under the checkpoint URI (names only; `spotwise.worker.runtime.checkpoint` writes the files)::

    manifests/step-0000000120-g0000000003.json   step 120 committed by generation 3
    generations/g-0000000004                     generation 4's fence: what it saw

**The rule.** Generation g's commit of step N is the create-only write of its manifest, whose
key carries g. A fence marker is written create-only, once per generation h, by whoever learns
of h first (the agent of any of h's nodes, or h's rank 0); before writing it, the writer lists
`manifests/` and records in the marker, for every older generation g, the highest step of g it
saw (`seen[g]`, -1 when none). A manifest (N, g) is *visible* iff for every fence h > g,
``N <= seen_h[g]``. Restore takes the newest visible manifest (see `Checkpointer.choose`).

**Why there is no window.** A generation commits its steps one at a time, in increasing order
(rank 0 writes manifests sequentially). Take a fence h > g and the listing its writer made just
before writing it. If g's manifest of step N was complete before that listing began, the listing
shows it (local files, and S3 LIST since 2020, are strongly consistent), so N <= seen_h[g]: it is
visible, and it existed before h existed, so h's restore (which lists after its fence exists)
can take it. If it was not complete then, the listing saw only g's earlier steps, all below N,
so N > seen_h[g]: invisible, forever, whenever its write lands. The decision is made from what
was written when, by the two create-only writes themselves; no process checks and then acts, so
a process of g that stops between any two of its storage calls (a GC pause, SIGSTOP, a partition)
can delay its manifest but never make it visible after h's fence. Nothing read here depends on
a clock.

A commit's own post-write check (`Checkpointer._commit`) only decides what it *reports*
(committed or fenced); the fence writer may still be between its listing and its write, so that
report can be optimistic. The restore point is decided by storage alone, and the runtime reports
the step it actually restored from (the `restored` event): that report, not the commit report,
is the authority for where a generation starts and how many steps were lost.

**The one conservative corner.** A slow writer of an older fence h1 (< h2) whose listing
predates h2's can record a lower `seen` than h2 did; since every fence counts, a manifest of g
that h2 took becomes invisible again. That can only lose a restore point (a later generation
restores an older commit or h2's own newer ones), never make a stale one visible; the agent
skips writing a fence once a newer one exists, which closes this in all but a race.

**Old layout.** Manifests named ``step-0000000120.json`` (no generation) and empty fence markers
from before this rule are still read: an empty marker records nothing and constrains nothing
(the old check-then-write rule held then), and old manifests count as generation "legacy",
constrained by new fences through ``seen["legacy"]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from spotwise.worker.runtime.storage import AlreadyExists, StorageURI, write_create_only

FENCE_VERSION = 1
LEGACY = "legacy"
"""The `seen` key of manifests in the old layout (their key names no generation)."""


class FenceError(RuntimeError):
    """A fence marker cannot be read (malformed): nothing that depends on it is visible."""


def manifest_name(step: int, generation: int) -> str:
    """The manifest key of `generation`'s commit of `step` (sorts by step, then generation)."""
    return f"step-{step:010d}-g{generation:010d}.json"


def parse_manifest_name(name: str) -> tuple[int, int | None] | None:
    """(step, generation) of a manifest key; generation None for the old layout; None when the
    name is no manifest's."""
    base = os.path.basename(name.rstrip("/"))
    if not (base.startswith("step-") and base.endswith(".json")):
        return None
    parts = base[5:-5].split("-g")
    if not parts[0].isdigit() or len(parts) > 2:
        return None
    if len(parts) == 1:
        return int(parts[0]), None
    return (int(parts[0]), int(parts[1])) if parts[1].isdigit() else None


@dataclass(frozen=True)
class Fence:
    """One generation's fence marker."""

    generation: int
    seen: dict[str, int] | None
    """Highest step of each older generation (str(g), or LEGACY) its writer saw; None for an
    old-layout marker, which constrains nothing."""

    def admits(self, step: int, generation: int | None) -> bool:
        """Whether this fence leaves (step, generation) visible."""
        if self.seen is None or (generation is not None and generation >= self.generation):
            return True
        key = LEGACY if generation is None else str(generation)
        return step <= self.seen.get(key, -1)


def _fence_path(loc: StorageURI, generation: int) -> str:
    return loc.join("generations", f"g-{generation:010d}")


def list_generations(fs, loc: StorageURI) -> list[int]:
    """The generations that have a fence marker, ascending."""
    path = loc.join("generations")
    fs.invalidate_cache(path)
    try:
        names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[2:]) for n in names if n.startswith("g-") and n[2:].isdigit())


def newest_generation(fs, loc: StorageURI) -> int:
    """The newest generation that started on this checkpoint location (-1 if none)."""
    return max(list_generations(fs, loc), default=-1)


def list_manifests(fs, loc: StorageURI) -> list[tuple[str, int, int | None]]:
    """(path, step, generation) of every manifest key, in key order."""
    path = loc.join("manifests")
    fs.invalidate_cache(path)
    try:
        names = sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        parsed = parse_manifest_name(name)
        if parsed is not None:
            out.append((name, *parsed))
    return out


def write_fence(fs, loc: StorageURI, generation: int) -> bool:
    """Fence `generation` at this location: list the manifests, then write the marker
    create-only with what the listing saw (see the module docstring). Idempotent; skipped when
    this or a newer generation is fenced already. Returns whether this call wrote it."""
    fs.makedirs(loc.join("generations"), exist_ok=True)
    if newest_generation(fs, loc) >= generation:
        return False  # ours is there (another node's agent, or our rank 0), or a newer one
    seen: dict[str, int] = {}
    for _path, step, gen in list_manifests(fs, loc):
        if gen is None or gen < generation:
            key = LEGACY if gen is None else str(gen)
            seen[key] = max(seen.get(key, -1), step)
    doc = {"version": FENCE_VERSION, "generation": generation, "seen": seen}
    try:
        write_create_only(fs, _fence_path(loc, generation), json.dumps(doc, sort_keys=True).encode())
    except AlreadyExists:
        return False
    return True


def read_fences(fs, loc: StorageURI, *, above: int) -> list[Fence]:
    """The fence markers of generations > `above`. Raises FenceError for a malformed one: a
    fence that cannot be read cannot be proven to admit anything."""
    out = []
    for gen in list_generations(fs, loc):
        if gen <= above:
            continue
        path = _fence_path(loc, gen)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            continue  # listed, then gone: only a deleted location loses markers
        if not raw.strip():
            out.append(Fence(gen, None))
            continue
        try:
            doc = json.loads(raw)
            seen = doc["seen"]
            if doc.get("version") != FENCE_VERSION or doc.get("generation") != gen:
                raise ValueError(f"version {doc.get('version')!r}, generation {doc.get('generation')!r}")
            if not isinstance(seen, dict) or not all(
                    isinstance(k, str) and type(v) is int for k, v in seen.items()):
                raise ValueError("malformed seen map")
        except (ValueError, KeyError, TypeError) as exc:
            raise FenceError(f"fence marker {loc.url(path)} is unreadable: {exc}") from exc
        out.append(Fence(gen, seen))
    return out


def visible(step: int, generation: int | None, fences: list[Fence]) -> bool:
    """Whether the manifest (step, generation) is visible under `fences` (all of them may be
    passed; only those newer than `generation` constrain it)."""
    return all(f.admits(step, generation) for f in fences)
