"""imap, progress reporting and stats()."""
from __future__ import annotations

import builtins
import itertools
import json
import logging
import os
import sys
import time

import gevent
import pytest

import gprocpool
from gp_tasks import boom, busy, die_exit, double, sleep_then


def test_imap_ordered_yields_in_input_order(pool):
    assert list(pool.imap(double, range(20))) == [2 * i for i in range(20)]


def test_imap_empty_input_spawns_nothing(pool):
    assert list(pool.imap(double, [])) == []
    assert pool.stats()["workers_started"] == 0


def test_imap_endless_generator_with_break_stays_bounded(pool):
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield i

    results = []
    for value in pool.imap(double, endless(), max_inflight=4):
        results.append(value)
        if len(results) == 10:
            break
    assert results == [2 * i for i in range(10)]
    assert len(consumed) <= 10 + 4


def test_imap_unordered_yields_fast_tasks_first(pool):
    delays = [0.6, 0.01, 0.02, 0.03]
    got = list(pool.imap(sleep_then, delays, ordered=False))
    assert got == [None] * 4
    order = list(pool.imap(_delay_and_return, delays, ordered=False))
    assert order[-1] == 0.6
    assert sorted(order) == sorted(delays)


def _delay_and_return(seconds):
    time.sleep(seconds)
    return seconds


def test_imap_error_raised_at_its_turn_and_pool_usable(pool):
    it = pool.imap(_fail_on_three, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(it)
    it.close()
    assert pool.process(double, (4,)) == 8


def _fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


def test_imap_input_iterator_error_propagates(pool):
    def bad_input():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        list(pool.imap(double, bad_input()))
    assert pool.join(timeout=10)


def test_imap_break_cancels_queued_tasks(tmp_path):
    with gprocpool.Pool(1) as pool:
        it = pool.imap(_touch_after, [(str(tmp_path / f"m{i}"), 0.2) for i in range(6)], max_inflight=6)
        next(it)
        it.close()
        pool.join(timeout=10)
    # The first ran; at most the one running at close time also finished; the rest never ran.
    assert len(os.listdir(tmp_path)) <= 2


def _touch_after(arg):
    path, delay = arg
    time.sleep(delay)
    open(path, "w").close()
    return path


def test_imap_million_items_memory_bounded(pool):
    # Lazily consumed: only max_inflight items exist at a time; stop early to keep it quick.
    total = 0
    for n, value in enumerate(pool.imap(double, range(10 ** 6))):
        total += value
        if n == 300:
            break
    assert total == sum(2 * i for i in range(301))


def test_map_progress_callable_reaches_total(pool):
    seen = []
    assert pool.map(double, range(50), progress=lambda done, total: seen.append((done, total))) == \
        [2 * i for i in range(50)]
    assert seen[-1] == (50, 50)
    assert all(t == 50 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_imap_progress_callable(pool):
    seen = []
    assert list(pool.imap(double, range(7), progress=lambda d, t: seen.append((d, t)))) == \
        [2 * i for i in range(7)]
    assert seen[-1] == (7, 7)


def test_progress_true_uses_tqdm(pool, capsys):
    pytest.importorskip("tqdm")
    assert pool.map(double, range(10), progress=True) == [2 * i for i in range(10)]
    assert "10/10" in capsys.readouterr().err


def test_progress_true_without_tqdm_names_the_extra(pool, monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with pytest.raises(ImportError, match="progress"):
        pool.map(double, [1], progress=True)


def test_progress_rejects_bad_type(pool):
    with pytest.raises(TypeError, match="progress"):
        pool.map(double, [1], progress="yes")


def test_stats_is_json_and_counts():
    with gprocpool.Pool(2, max_reqs=3) as pool:
        empty = pool.stats()
        assert empty["workers"] == 0 and empty["max_procs"] == 2
        pool.map(double, range(10))
        with pytest.raises(ValueError):
            pool.process(boom)
        with pytest.raises(gprocpool.WorkerLost):
            pool.process(die_exit, (3,))
        with pytest.raises(gprocpool.TaskTimeout):
            pool.process(sleep_then, (5,), task_timeout=0.2)
        stats = json.loads(json.dumps(pool.stats()))
        assert stats["tasks_completed"] == 10
        assert stats["tasks_failed"] == 3
        assert stats["workers_replaced"]["crash"] == 1
        assert stats["workers_replaced"]["timeout"] == 1
        assert stats["workers_replaced"]["max_reqs"] >= 2
        assert stats["workers_started"] >= 5
        assert stats["workers"] <= 2
        for w in stats["per_worker"]:
            assert w["tasks"] <= 3 and w["rss"] > 0 and w["busy"] is False


def test_stats_shows_busy_and_queued_workers():
    with gprocpool.Pool(1) as pool:
        pool.process(double, (1,))
        running = [gevent.spawn(pool.process, busy, (0.5,)) for _ in range(3)]
        gevent.sleep(0.2)
        stats = pool.stats()
        assert stats["busy"] == 1 and stats["idle"] == 0
        assert stats["queued"] == 2
        assert stats["per_worker"][0]["busy"] is True
        gevent.joinall(running, raise_error=True)


def test_worker_lifecycle_is_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="gprocpool")
    with gprocpool.Pool(1, max_reqs=1) as pool:
        pool.process(double, (1,))
        with pytest.raises(gprocpool.WorkerLost):
            pool.process(die_exit, (2,))
    messages = [r.getMessage() for r in caplog.records if r.name == "gprocpool"]
    assert any("started" in m for m in messages)
    assert any("max_reqs" in m for m in messages)
    assert any("exited with code 2" in m for m in caplog.messages if "while running" in m)
    assert [r for r in caplog.records if "exited with code 2" in r.getMessage()][0].levelno == logging.WARNING
