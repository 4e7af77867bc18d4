"""Scheduling policies: the order of the waiting queue and of the running list,
and whether a waiting request may displace a running one.

The scheduler serves running requests in list order and always preempts the
last one, so each policy keeps ``running`` sorted with its least important
request last:

* ``fcfs``: arrival order; a preempted request goes back to the front of the
  waiting queue; nothing is preempted to admit a waiting request. The last
  started running request is the victim (as vLLM's v1 scheduler).
* ``priority``: ``(priority, arrival_time)``, lower first, in both the waiting
  queue and the running list. A waiting request that outranks the last running
  one may have it preempted to make room. A request the fairness guard promoted
  (it waited longer than ``max_waiting_time_s``) outranks every unpromoted one.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from ember.request import Request


class SchedulingPolicy(ABC):
    """Ordering of one scheduler's requests. Subclasses are registered in
    :data:`SCHEDULING_POLICIES` by name. Each keeps its waiting queue in
    ``self._waiting`` (a deque or list, head first); the queries below read it."""

    name: str = ""
    _waiting: deque[Request] | list[Request]

    @abstractmethod
    def add_waiting(self, req: Request) -> None:
        """Queue a new request."""

    @abstractmethod
    def requeue_preempted(self, req: Request) -> None:
        """Queue a request that was just preempted."""

    def peek_waiting(self) -> Request:
        """The next request to admit (the queue must not be empty)."""
        return self._waiting[0]

    @abstractmethod
    def pop_waiting(self) -> Request:
        """Remove and return :meth:`peek_waiting`."""

    def remove_waiting(self, req: Request) -> None:
        """Remove a queued request (abort)."""
        self._waiting.remove(req)

    def iter_waiting(self) -> Iterator[Request]:
        """Queued requests in admission order."""
        return iter(self._waiting)

    def num_waiting(self) -> int:
        """Queued requests."""
        return len(self._waiting)

    @abstractmethod
    def add_running(self, running: list[Request], req: Request) -> None:
        """Insert a newly admitted request into ``running`` (least important last)."""

    def outranks(self, a: Request, b: Request) -> bool:
        """Whether ``a`` may take ``b``'s place (preempt it, or start in a step
        that preempted it)."""
        return False

    def promote_starved(self, now: float, max_waiting_time_s: float) -> int:
        """Fairness guard: promote waiting requests that have waited at least
        ``max_waiting_time_s`` seconds since ``waiting_since`` (``now`` on the
        same clock). Returns how many were promoted (none for policies without
        priorities)."""
        return 0


class FCFSPolicy(SchedulingPolicy):
    """First come, first served."""

    name = "fcfs"

    def __init__(self) -> None:
        self._waiting: deque[Request] = deque()

    def add_waiting(self, req: Request) -> None:
        self._waiting.append(req)

    def requeue_preempted(self, req: Request) -> None:
        self._waiting.appendleft(req)

    def pop_waiting(self) -> Request:
        return self._waiting.popleft()

    def add_running(self, running: list[Request], req: Request) -> None:
        running.append(req)


def priority_key(req: Request) -> tuple[bool, int, float]:
    """Sort key of the priority policy: promoted first, then lower
    ``priority``, then earlier ``arrival_time``."""
    return (not req.promoted, req.priority, req.arrival_time)


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` first, ties by arrival; the waiting queue is a list
    kept sorted (equal keys stay in insertion order)."""

    name = "priority"

    def __init__(self) -> None:
        self._waiting: list[Request] = []

    def add_waiting(self, req: Request) -> None:
        bisect.insort_right(self._waiting, req, key=priority_key)

    def requeue_preempted(self, req: Request) -> None:
        self.add_waiting(req)

    def pop_waiting(self) -> Request:
        return self._waiting.pop(0)

    def add_running(self, running: list[Request], req: Request) -> None:
        bisect.insort_right(running, req, key=priority_key)

    def outranks(self, a: Request, b: Request) -> bool:
        return priority_key(a) < priority_key(b)

    def promote_starved(self, now: float, max_waiting_time_s: float) -> int:
        promoted = 0
        for req in self._waiting:
            if not req.promoted and now - req.waiting_since >= max_waiting_time_s:
                req.promoted = True
                promoted += 1
        if promoted:
            self._waiting.sort(key=priority_key)
        return promoted


SCHEDULING_POLICIES: dict[str, type[SchedulingPolicy]] = {
    FCFSPolicy.name: FCFSPolicy,
    PriorityPolicy.name: PriorityPolicy,
}
