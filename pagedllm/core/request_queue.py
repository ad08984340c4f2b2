"""The waiting queue, one class per scheduling policy (vLLM's ``--scheduling-policy``).

``fcfs``: arrival order; a preempted request goes back to the front (it was admitted before
everything still waiting). ``priority``: the smallest ``(priority, arrival_time)`` first, a
preempted request included: it goes back in by its key, not to the front. The policy also
chooses whom to preempt when the KV cache runs out (``victim``): under fcfs the latest admitted,
under priority the running request with the largest ``(priority, arrival_time)``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Protocol

from pagedllm.config import SCHEDULING_POLICIES
from pagedllm.core.request import Request


class RequestQueue(Protocol):
    """What the scheduler needs of its waiting queue."""

    def add(self, request: Request) -> None:
        """A new request."""

    def prepend(self, request: Request) -> None:
        """A preempted request, back in line ahead of those it was admitted before."""

    def put_back(self, requests: list[Request]) -> None:
        """Requests taken out this step but not admitted (not ready), in the order taken."""

    def peek_next(self) -> Request: ...

    def pop_next(self) -> Request: ...

    def remove(self, request: Request) -> None: ...

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt when the KV cache is full."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue(deque[Request]):
    """Arrival order (a deque, so tests and tools may look at ``queue[0]``)."""

    def add(self, request: Request) -> None:
        self.append(request)

    def prepend(self, request: Request) -> None:
        self.appendleft(request)

    def put_back(self, requests: list[Request]) -> None:
        self.extendleft(reversed(requests))

    def peek_next(self) -> Request:
        return self[0]

    def pop_next(self) -> Request:
        return self.popleft()

    def victim(self, running: list[Request]) -> Request:
        return running[-1]  # the latest admitted: it has the least computed


class PriorityQueue:
    """A heap on ``(priority, arrival_time)``: a lower priority value is served first, ties by
    arrival; requests with equal keys (samples of one request) in the order they were queued."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._order = itertools.count()  # the tiebreak: a heap must never compare Requests

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time,
                                    next(self._order), request))

    prepend = add  # a preempted request goes back by its key

    def put_back(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add(request)

    def peek_next(self) -> Request:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][3]

    def pop_next(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        self._heap = [e for e in self._heap if e[3] is not request]
        heapq.heapify(self._heap)

    def victim(self, running: list[Request]) -> Request:
        # The largest key; among equal keys the latest admitted (max keeps the first maximum).
        return max(reversed(running), key=lambda r: (r.priority, r.arrival_time))

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Request]:
        """In serving order."""
        return (e[3] for e in sorted(self._heap))

    def __contains__(self, request: object) -> bool:
        return any(e[3] is request for e in self._heap)


def make_request_queue(policy: str) -> FCFSQueue | PriorityQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"Unknown scheduling policy {policy!r}: expected one of "
                     f"{', '.join(SCHEDULING_POLICIES)}")
