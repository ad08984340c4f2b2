"""Block tables on the host, kept from step to step so that a step copies only new block ids.

A request's block list (``ScheduledRequest.block_ids``, the KV cache manager's own list) only
grows, one block every ``block_size`` tokens, until its blocks are freed; the manager then starts
a new list. So a row filled from the same list object needs only the ids appended since, and a
row whose list object changed is written again from the first id that differs (a
tensor-parallel worker decodes a new list object every step, with the same leading ids).
(Converting every id of every request each step cost about as much as the rest of the input
preparation.)
"""

from __future__ import annotations

import numpy as np

from pagedllm.core.scheduler import ScheduledRequest


class _Row:
    __slots__ = ("source", "index")

    def __init__(self, source: list[int] | None, index: int) -> None:
        self.source, self.index = source, index


class BlockTables:
    """A row per recently scheduled request in one growing int32 array."""

    def __init__(self, num_rows: int = 64, width: int = 64) -> None:
        self._table = np.zeros((num_rows, width), np.int32)
        self._filled = [0] * num_rows  # leading ids written in each row; the rest are 0
        self._rows: dict[str, _Row] = {}  # request id -> its row
        self._free = list(range(num_rows - 1, -1, -1))

    def gather(self, scheduled: list[ScheduledRequest]) -> np.ndarray:
        """The step's block tables, [num_reqs, longest table] int32, padded with block 0."""
        index, width = [], 1
        rows, filled = self._rows, self._filled
        for s in scheduled:
            ids, n = s.block_ids, len(s.block_ids)
            row = rows.get(s.request_id)
            if row is None:
                row = rows[s.request_id] = _Row(None, self._take_row())
            if row.source is not ids:
                kept = filled[row.index]
                same = row.source is not None and ids[:kept] == row.source[:kept]
                row.source = ids
                self._write(row.index, ids, kept if same else 0)
            elif n > filled[row.index]:
                self._write(row.index, ids, filled[row.index])
            index.append(row.index)
            if n > width:
                width = n
        if len(rows) > len(scheduled):
            self._drop_unscheduled(scheduled)
        return self._table[index, :width]

    def _write(self, row: int, ids: list[int], start: int) -> None:
        """Writes ``ids[start:]`` at their places and zeroes what an older list left after."""
        n, width = len(ids), self._table.shape[1]
        if n > width:
            self._table = np.pad(self._table, ((0, 0), (0, max(n, 2 * width) - width)))
        self._table[row, start:n] = ids[start:]
        self._table[row, n:self._filled[row]] = 0
        self._filled[row] = n

    def _take_row(self) -> int:
        if not self._free:
            old = self._table.shape[0]
            self._table = np.pad(self._table, ((0, old), (0, 0)))
            self._filled.extend([0] * old)  # in place: gather holds the list
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _drop_unscheduled(self, scheduled: list[ScheduledRequest]) -> None:
        # Finished, preempted or waiting requests: a row comes back when it is next scheduled.
        live = {s.request_id for s in scheduled}
        for request_id in [r for r in self._rows if r not in live]:
            self._free.append(self._rows.pop(request_id).index)
