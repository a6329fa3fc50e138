"""The training sampler: step batches split over ranks and micro-batches, the single-process stream, resume."""
import itertools
import random
import signal
import time

import numpy as np
import pytest

from detkit.data.loader import TrainBatchSampler, seed_worker


def _original_stream(num_items, batch_size, seed, shuffle, group_ids):
    """The one-process stream as detkit produced it before step batches existed, written out plainly."""
    buckets = {}
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_items) if shuffle else np.arange(num_items)
        for position, index in enumerate(order):
            key = (int(index), int(np.random.SeedSequence([seed, epoch, 0, position]).generate_state(1)[0]))
            bucket = buckets.setdefault(0 if group_ids is None else int(group_ids[index]), [])
            bucket.append(key)
            if len(bucket) == batch_size:
                yield list(bucket)
                bucket.clear()
        epoch += 1


def _take(iterable, n, start=0):
    return list(itertools.islice(iter(iterable), start, start + n))


@pytest.mark.parametrize("num_items,batch_size,seed,shuffle,grouped", [
    (20, 3, 1, True, True), (37, 4, 5, True, False), (10, 1, 0, True, False), (53, 8, 2, True, True),
    (11, 2, 9, False, True), (100, 16, 7, True, True)])
def test_single_process_stream_equals_the_original_algorithm(num_items, batch_size, seed, shuffle, grouped):
    groups = np.random.default_rng(num_items).integers(0, 2, num_items) if grouped else None
    expected = _take(_original_stream(num_items, batch_size, seed, shuffle, groups), 40)
    sampler = TrainBatchSampler(num_items, batch_size, seed=seed, shuffle=shuffle, group_ids=groups)
    assert _take(sampler, 40) == expected
    resumed = TrainBatchSampler(num_items, batch_size, seed=seed, shuffle=shuffle, group_ids=groups, start_step=7)
    assert _take(resumed, 33) == expected[7:]


def _split_steps(num_items, batch_size, world_size, accumulate, groups, steps, start_step=0):
    """Per optimiser step, the keys of all ranks and micro-batches in slot order (m * world_size + r)."""
    streams = [iter(TrainBatchSampler(num_items, batch_size, seed=3, group_ids=groups, rank=r, world_size=world_size,
                                      accumulate=accumulate, start_step=start_step)) for r in range(world_size)]
    out = []
    for _ in range(steps):
        micro = [[next(s) for s in streams] for _ in range(accumulate)]  # [m][r] -> batch_size keys
        assert all(len(batch) == batch_size for row in micro for batch in row)
        out.append([key for row in micro for batch in row for key in batch])
    return out


def test_step_batches_are_the_same_images_whatever_the_split():
    num_items, steps = 37, 30  # several epochs, with group leftovers carried over
    groups = np.random.default_rng(0).integers(0, 2, num_items)
    reference = _split_steps(num_items, 4, 1, 1, groups, steps)
    for step in reference:  # aspect-ratio grouping holds over the whole step batch
        assert len({groups[i] for i, _ in step}) == 1
    for batch_size, world_size, accumulate in [(2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 4, 1), (1, 1, 4)]:
        split = _split_steps(num_items, batch_size, world_size, accumulate, groups, steps)
        assert split == reference, (batch_size, world_size, accumulate)


def test_fast_forward_is_exact_and_cheap():
    groups = np.random.default_rng(1).integers(0, 2, 1000)
    start = time.perf_counter()
    resumed = _take(TrainBatchSampler(1000, 16, seed=2, group_ids=groups, start_step=5000), 3)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"fast-forwarding 5000 steps took {elapsed:.2f} s"
    # the full stream's steps 5000..5002, keys computed lazily in the same way as the original algorithm would
    full = _take(_original_stream(1000, 16, 2, True, groups), 3, start=5000)
    assert resumed == full
    # with ranks and accumulation: the tail of each rank's stream, counted in micro-batches
    for r in range(2):
        whole = _take(TrainBatchSampler(50, 2, seed=2, group_ids=groups[:50], rank=r, world_size=2, accumulate=3), 60)
        tail = _take(TrainBatchSampler(50, 2, seed=2, group_ids=groups[:50], rank=r, world_size=2, accumulate=3,
                                       start_step=11), 27)
        assert tail == whole[33:]


def test_state_names_the_position_in_optimizer_steps():
    sampler = TrainBatchSampler(10, 2, seed=4, rank=1, world_size=2, accumulate=3)
    assert sampler.state(7) == {"scheme": 2, "seed": 4, "step_batch": 12, "steps_consumed": 7}
    with pytest.raises(ValueError, match="rank 2 of 2"):
        TrainBatchSampler(10, 2, rank=2, world_size=2)


def test_workers_ignore_stop_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    rng_states = random.getstate(), np.random.get_state()
    try:
        seed_worker(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in saved)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
