"""Which pod takes a request: consistent hashing with bounded load (CHWBL) over the prompt's leading block,
falling back to the least outstanding requests. Pure: no I/O, no clock; the pool passes in the loads.

Requests that share a leading block (the same system prompt, the same conversation so far) hash to the same
point on a ring of pods, so they meet the pod whose prefix cache already holds that block. The bound keeps a hot
prefix from burying one pod: walking the ring from the hashed point, the first pod whose load, with this request,
stays within `ceil(load_factor * (total load + 1) / pods)` takes it (Mirrokni, Thorup and Zadimoghaddam,
"Consistent Hashing with Bounded Loads"; KubeAI's PrefixHash strategy). The least loaded pod always meets that
bound, so a slow pod, whose requests pile up, stops getting new ones: the walk passes it by. Loads are the
requests this gateway replica has outstanding on each pod.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import Collection, Iterator, Mapping

# Points per pod on the ring: with 100, each of a few pods owns a share of the ring within a few percent of even.
RING_POINTS_PER_POD = 100


def key_hash(data: bytes) -> int:
    """A stable 64-bit hash (the same in every gateway replica and across restarts, unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """The consistent-hashing ring of a set of pods; built when the set changes, read for every request."""

    def __init__(self, members: Collection[str], points_per_member: int = RING_POINTS_PER_POD) -> None:
        self.members = frozenset(members)
        points = sorted((key_hash(f"{member}#{index}".encode()), member)
                        for member in self.members for index in range(points_per_member))
        self._hashes = [point for point, _ in points]
        self._owners = [member for _, member in points]

    def walk(self, point: int) -> Iterator[str]:
        """Every member once, in ring order from `point` clockwise."""
        if not self._owners:
            return
        seen: set[str] = set()
        start = bisect.bisect_left(self._hashes, point)
        for offset in range(len(self._owners)):
            owner = self._owners[(start + offset) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.members):
                    return


def load_bound(total_load: int, members: int, load_factor: float) -> int:
    """The most requests a pod may have, counting this one, and still take a hashed request."""
    return math.ceil(load_factor * (total_load + 1) / members)


def least_loaded(candidates: Collection[str], loads: Mapping[str, int], rng: random.Random) -> str:
    """The candidate with the fewest outstanding requests; ties broken at random, so idle pods share the work."""
    fewest = min(loads.get(member, 0) for member in candidates)
    return rng.choice(sorted(member for member in candidates if loads.get(member, 0) == fewest))


def choose(ring: HashRing, loads: Mapping[str, int], eligible: Collection[str], prefix: bytes | None,
           load_factor: float, rng: random.Random) -> str | None:
    """The pod for a request among `eligible` (ready, with a free slot, not the one that just failed it).

    With a prefix: the first eligible pod on the ring from the prefix's hash whose load stays within the bound,
    else the least loaded eligible pod. Without one: the least loaded eligible pod."""
    if not eligible:
        return None
    if prefix is not None and ring.members:
        bound = load_bound(sum(loads.get(member, 0) for member in ring.members), len(ring.members), load_factor)
        for member in ring.walk(key_hash(prefix)):
            if member in eligible and loads.get(member, 0) + 1 <= bound:
                return member
    return least_loaded(eligible, loads, rng)
