"""The predictor's batches: a prompt that finds the encoder idle runs alone at once; the prompts that arrive
while a batch runs form the next batch (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.config import PredictorConfig
from deployments.predictor import Predictor
from deployments.waiting_batch import WaitingBatches


class SlowDouble:
    """``run``: doubles each item after ``delay`` s, and records every batch it was given."""

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.seen: list[list[int]] = []

    async def __call__(self, items):
        self.seen.append(list(items))
        await asyncio.sleep(self.delay)
        return [2 * x for x in items]


def test_an_idle_encoder_runs_a_lone_item_at_once_and_the_rest_waits_for_the_running_batch():
    run = SlowDouble()

    async def scenario():
        b = WaitingBatches(run, max_size=32)
        first = asyncio.create_task(b(0))
        await asyncio.sleep(0.005)  # the first batch (item 0) is running now
        rest = [asyncio.create_task(b(i)) for i in range(1, 11)]
        return await asyncio.gather(first, *rest)

    out = asyncio.run(scenario())
    assert out == [2 * i for i in range(11)]
    # Ray Serve's @serve.batch with no wait forms a batch per arrival here ([0], [1], [2], ...).
    assert run.seen == [[0], list(range(1, 11))]


def test_batches_are_capped_and_keep_arrival_order():
    run = SlowDouble()

    async def scenario():
        b = WaitingBatches(run, max_size=4)
        first = asyncio.create_task(b(0))
        await asyncio.sleep(0.005)
        rest = [asyncio.create_task(b(i)) for i in range(1, 11)]
        return await asyncio.gather(first, *rest), b.batches, b.items

    out, batches, items = asyncio.run(scenario())
    assert out == [2 * i for i in range(11)]
    assert run.seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert (batches, items) == (4, 11)


def test_a_wait_fills_the_batch_from_the_first_arrival():
    run = SlowDouble(delay=0.0)

    async def scenario():
        b = WaitingBatches(run, max_size=8, wait_s=0.05)
        tasks = [asyncio.create_task(b(0))]
        await asyncio.sleep(0.01)  # still within the wait
        tasks += [asyncio.create_task(b(i)) for i in (1, 2)]
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == [0, 2, 4]
    assert run.seen == [[0, 1, 2]]


def test_a_failing_batch_fails_its_callers_only_and_the_next_batch_runs():
    seen = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.01)
        if 0 in items:
            raise RuntimeError("encoder down")
        return [x + 100 for x in items]

    async def scenario():
        b = WaitingBatches(run, max_size=8)
        first = asyncio.create_task(b(0))
        await asyncio.sleep(0.002)
        later = [asyncio.create_task(b(i)) for i in (1, 2)]
        first_result = await asyncio.gather(first, return_exceptions=True)
        return first_result[0], await asyncio.gather(*later)

    err, later = asyncio.run(scenario())
    assert isinstance(err, RuntimeError) and str(err) == "encoder down"
    assert later == [101, 102] and seen == [[0], [1, 2]]


def test_a_cancelled_caller_is_left_out_of_the_next_batch():
    run = SlowDouble()

    async def scenario():
        b = WaitingBatches(run, max_size=8)
        first = asyncio.create_task(b(0))
        await asyncio.sleep(0.005)
        gone = asyncio.create_task(b(1))
        kept = asyncio.create_task(b(2))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(first, kept)

    assert asyncio.run(scenario()) == [0, 4]
    assert run.seen == [[0], [2]]


def test_a_result_count_that_does_not_match_fails_the_batch():
    async def run(items):
        return [1]

    async def scenario():
        b = WaitingBatches(run, max_size=8)
        return await asyncio.gather(b(1), b(2), return_exceptions=True)

    errs = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) and "2 items gave 1 results" in str(e) for e in errs)


@pytest.mark.parametrize("size,wait", [(0, 0.0), (4, -1.0)])
def test_bad_limits_are_refused(size, wait):
    with pytest.raises(ValueError):
        WaitingBatches(SlowDouble(), max_size=size, wait_s=wait)


def test_the_predictor_batches_the_prompts_that_wait_outside_a_replica():
    """The ingress's own predictor batches with no Serve replica context (no @serve.batch)."""
    pred = Predictor(PredictorConfig(backend="heuristic"))
    sizes = []
    original = pred.backend.predict

    def counting(prompts, log_sigma=None):
        sizes.append(len(prompts))
        return original(prompts, log_sigma)

    pred.backend.predict = counting

    async def scenario():
        return await asyncio.gather(*(pred.predict("x" * (10 * i + 1)) for i in range(5)))

    preds = asyncio.run(scenario())
    assert [p.threshold_tokens for p in preds] == [
        p.threshold_tokens for p in original(["x" * (10 * i + 1) for i in range(5)])]
    # All five are queued before the drain task first runs: the first batch takes all of them.
    assert sizes == [5]
