"""What is committed at a checkpoint location, and which commit a generation restores.

Storage is the one authority for the restore point: the newest visible (see
`spotwise.worker.runtime.fencing`) and valid (every data file there at its committed size) commit. The
daemon's requested step is a floor, not a choice: it names the newest commit the daemon heard
of, and a newer one may exist (its report died with its node, or the generation being replaced
committed after the daemon chose). The runtime reports the step it actually restored (the
`restored` event, with the manifest's generation and the step it was asked for), and that
report, not the daemon's guess, says where the generation starts and how many steps were lost.
"""

from __future__ import annotations

import logging
import os

from spotwise.worker.runtime.fencing import (
    list_manifests,
    parse_manifest_name,
    read_fences,
    visible,
)
from spotwise.worker.runtime.manifest import CheckpointError, CheckpointMissing, Manifest
from spotwise.worker.runtime.storage import StorageURI

log = logging.getLogger("spotwise.checkpoint")


def _step_name(step: int) -> str:
    return f"step-{step:010d}"


class Commits:
    """Reads one checkpoint location's commits. Every call lists storage afresh."""

    def __init__(self, fs, loc: StorageURI) -> None:
        self.fs = fs
        self.loc = loc

    def list_files(self, data_path: str) -> dict[str, int]:
        """Each file directly under `data_path` and its size ({} when it does not exist)."""
        self.fs.invalidate_cache(data_path)
        try:
            entries = self.fs.ls(data_path, detail=True)
        except FileNotFoundError:
            return {}
        return {
            os.path.basename(e["name"].rstrip("/")): int(e["size"])
            for e in entries
            if e.get("type") == "file"
        }

    def committed(self) -> list[Manifest]:
        """Committed (visible) checkpoints, oldest first, by step then generation. Unreadable
        manifests are skipped with a warning. Raises FenceError when a fence marker that
        decides visibility is unreadable."""
        return [m for _path, m in self.visible_manifests()]

    def visible_manifests(self) -> list[tuple[str, Manifest]]:
        """(key, manifest) of each readable visible commit, by step then generation."""
        keys = list_manifests(self.fs, self.loc)
        if not keys:
            return []
        oldest = min(-1 if gen is None else gen for _p, _s, gen in keys)
        fences = read_fences(self.fs, self.loc, above=oldest)
        out = []
        for path, step, gen in keys:
            if not visible(step, gen, fences):
                continue
            try:
                m = self.read_manifest(path)
            except CheckpointError as exc:
                log.warning("ignoring checkpoint: %s", exc)
                continue
            out.append((path, m))
        return sorted(out, key=lambda pm: (pm[1].step, pm[1].generation))

    def read_manifest(self, path: str) -> Manifest:
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise CheckpointMissing(f"no manifest at {self.loc.url(path)}") from exc
        m = Manifest.from_json(raw, where=self.loc.url(path))
        named = parse_manifest_name(path)
        if named is None or m.step != named[0] or named[1] not in (None, m.generation):
            raise CheckpointError(f"manifest {self.loc.url(path)} holds step {m.step} of "
                                  f"generation {m.generation}, not the step its name says")
        return m

    def validate(self, m: Manifest) -> None:
        """Raise CheckpointError unless every data file is there at its committed size."""
        have = self.list_files(self.loc.join(m.data))
        for name, size in m.files.items():
            if name not in have:
                raise CheckpointError(f"checkpoint step {m.step} is torn: {m.data}/{name} is missing")
            if have[name] != size:
                raise CheckpointError(
                    f"checkpoint step {m.step} is torn: {m.data}/{name} is {have[name]} bytes, "
                    f"the manifest says {size}"
                )

    def choose(self, step: int | None) -> Manifest | None:
        """The checkpoint to restore: the newest valid at or after `step` (an error if there is
        none and `step` itself is unusable), or with no step the newest valid."""
        if step is not None:
            # The daemon names the newest commit it heard of (-1: none). A newer one may exist:
            # its report died with its node, or the generation being replaced committed (and
            # pruned) after the daemon chose. Storage decides what is committed, so the newest
            # valid commit at or after the requested step is restored, even when the daemon
            # asked for a start from scratch; an older one or none would silently repeat or
            # lose work, so a requested step that is unusable stays an error.
            for newer in reversed(self.committed()):
                if newer.step <= step:
                    break
                try:
                    self.validate(newer)
                except CheckpointError as exc:
                    log.warning("skipping %s", exc)
                    continue
                log.warning("restoring the committed step %d, newer than the requested %d", newer.step, step)
                return newer
            if step < 0:
                return None  # nothing committed: a start from scratch
            same = [m for m in self.committed() if m.step == step]
            if not same:
                for path, listed_step, _gen in list_manifests(self.fs, self.loc):
                    if listed_step == step:
                        self.read_manifest(path)  # an unreadable one is the clearer error
                url = self.loc.url(self.loc.join("manifests", f"{_step_name(step)}-g*.json"))
                raise CheckpointMissing(f"no manifest at {url}: step {step} was never committed "
                                        "by a current generation, or was pruned")
            self.validate(same[-1])
            return same[-1]
        for m in reversed(self.committed()):
            try:
                self.validate(m)
                return m
            except CheckpointError as exc:
                log.warning("skipping %s", exc)
        return None
