"""BlockTables against the plain per-step construction, over growth, frees and reused rows."""

from __future__ import annotations

import random

import numpy as np

from pagedllm.core.scheduler import ScheduledRequest
from pagedllm.worker.block_table import BlockTables


def plain_table(scheduled: list[ScheduledRequest]) -> np.ndarray:
    table = np.zeros((len(scheduled), max(len(s.block_ids) for s in scheduled)), np.int32)
    for i, s in enumerate(scheduled):
        table[i, :len(s.block_ids)] = s.block_ids
    return table


def test_gather_equals_the_plain_table_step_after_step() -> None:
    """Random steps like the KV cache manager's: tables grow in place, freed requests start a
    new list (preemption), requests come and go, so rows are dropped, reused and widened."""
    rng = random.Random(0)
    tables = BlockTables(num_rows=2, width=2)  # small, so that both dimensions grow
    live: dict[str, list[int]] = {}
    requests = [f"r{i}" for i in range(12)]
    for _ in range(300):
        for request_id in rng.sample(sorted(requests), 3):
            action = rng.random()
            if action < 0.6:
                live.setdefault(request_id, []).extend(
                    rng.randrange(1, 1000) for _ in range(rng.choice([0, 0, 1, 5])))
            elif action < 0.8:
                live[request_id] = [rng.randrange(1, 1000)]  # freed, then new blocks
            else:
                live.pop(request_id, None)  # finished
        chosen = [r for r in sorted(live) if live[r] and rng.random() < 0.8]
        if not chosen:
            continue
        scheduled = [ScheduledRequest(r, [0], 1, live[r], 0, True) for r in chosen]
        got = tables.gather(scheduled)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, plain_table(scheduled))


def test_a_new_list_rewrites_the_row_and_clears_its_tail() -> None:
    tables = BlockTables()
    first = [5, 6, 7]
    tables.gather([ScheduledRequest("r", [0], 1, first, 0, True)])
    first.append(8)  # grows in place: only the new id is copied
    np.testing.assert_array_equal(tables.gather([ScheduledRequest("r", [0], 1, first, 0, True)]),
                                  [[5, 6, 7, 8]])
    got = tables.gather([ScheduledRequest("r", [0], 1, [9], 0, True),
                         ScheduledRequest("o", [0], 1, [3, 4], 0, True)])
    np.testing.assert_array_equal(got, [[9, 0], [3, 4]])


def test_equal_lists_decoded_anew_write_only_new_ids() -> None:
    """A tensor-parallel worker gets a new list object every step: equal leading ids are kept,
    a list that differs early is written again."""
    tables = BlockTables()
    tables.gather([ScheduledRequest("r", [0], 1, [5, 6, 7], 0, True)])
    tables._table[0, 0] = -1  # a kept id is not written again
    got = tables.gather([ScheduledRequest("r", [0], 1, [5, 6, 7, 8], 0, True)])
    np.testing.assert_array_equal(got, [[-1, 6, 7, 8]])
    got = tables.gather([ScheduledRequest("r", [0], 1, [9, 6], 0, True)])
    np.testing.assert_array_equal(got, [[9, 6]])
