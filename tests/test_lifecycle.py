"""Process lifecycle: no orphans, Ctrl-C, inherited file descriptors, fork safety.

Tests that kill or interrupt "the parent" run it as a separate program, under a small
supervisor that is a child subreaper (PR_SET_CHILD_SUBREAPER): the parent's orphaned
template and workers are re-parented to the supervisor, which reaps them and records
when each one exited.  Without it they would become zombies of PID 1 (which, in a
container, may never reap them) and nothing could tell when they died.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import gevent
import gevent.subprocess as subprocess
import psutil
import pytest

import fault_tasks as ft
import gprocpool
from conftest import HERE, LARGE_TICK, SMALL_TICK, run_script

# The spec: every worker exits within 2 s of the parent's death.
ORPHAN_DEADLINE = 2.0

SUPERVISOR = r"""
import ctypes, json, os, signal, sys, time
import psutil
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
code = os.environ.pop("GP_PARENT_CODE")
setsid = os.environ.pop("GP_NEW_SESSION") == "1"
linger = float(os.environ.pop("GP_LINGER"))
main = os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ, setsid=setsid)
print(f"PARENT {main}", flush=True)
reaped, deadline = {}, None
while True:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        reaped[pid] = (os.waitstatus_to_exitcode(status), time.monotonic())
        if pid == main:
            deadline = time.monotonic() + linger
        continue
    if deadline is not None and time.monotonic() > deadline:
        break
    time.sleep(0.002)
leftover = [p.pid for p in psutil.Process().children(recursive=True)]
for pid in leftover:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
print("RESULT " + json.dumps({"main": main, "reaped": reaped, "leftover": leftover}), flush=True)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


class Supervised:
    """A parent program run under the subreaper supervisor; its stdout is read line by line."""

    def __init__(self, code: str, new_session: bool = False, linger: float = 10.0) -> None:
        env = _env()
        env.update(GP_PARENT_CODE=code, GP_NEW_SESSION="1" if new_session else "0",
                   GP_LINGER=str(linger))
        self.proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True)
        self.lines = []
        self.parent_pid = int(self.expect("PARENT")[0])

    def expect(self, prefix: str, timeout: float = 30.0) -> list:
        """Reads stdout until a line starting with prefix; returns the rest of its words."""
        with gevent.Timeout(timeout, AssertionError(f"no {prefix!r} line; got {self.lines}")):
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"EOF before {prefix!r}; got {self.lines}; "
                                         f"stderr {self.proc.stderr.read()}")
                self.lines.append(line.rstrip("\n"))
                if line.startswith(prefix + " ") or line.rstrip("\n") == prefix:
                    return line.split()[1:]

    def words(self, prefix: str) -> list:
        """The words after prefix of every line read so far that starts with it."""
        return [line.split()[1:] for line in self.lines if line.startswith(prefix + " ")]

    def worker_pids(self, count: int) -> list:
        """Reads on until count WORKER lines have arrived; returns their pids."""
        while len(self.words("WORKER")) < count:
            self.expect("WORKER")
        return [int(w[0]) for w in self.words("WORKER")]

    def finish(self, timeout: float = 30.0):
        """Waits for the supervisor; returns (result dict, stdout lines, stderr text)."""
        out, err = self.proc.communicate(timeout=timeout)
        self.lines.extend(out.splitlines())
        result = [json.loads(line[len("RESULT "):]) for line in self.lines if line.startswith("RESULT ")]
        assert result, f"supervisor gave no result; stdout {self.lines}; stderr {err}"
        result = result[0]
        result["reaped"] = {int(k): v for k, v in result["reaped"].items()}
        return result, self.lines, err

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_all_gone(pids, since: float, limit: float) -> float:
    """Polls (psutil) until every pid has exited; asserts that happened within limit of since."""
    while True:
        alive = [p for p in pids if not is_gone(p)]
        if not alive:
            return time.monotonic() - since
        assert time.monotonic() - since < limit, f"still alive {limit} s later: {alive}"
        gevent.sleep(SMALL_TICK)


# -- no orphans ---------------------------------------------------------------------------

PARENT_FOR_SIGKILL = """
import gevent, psutil, gprocpool
import fault_tasks as ft
MODE = {mode!r}
pool = gprocpool.Pool(3)
seconds = 0.3 if MODE == "idle" else 600
callers = [gevent.spawn(pool.process, ft.announce_and_sleep, (seconds, MODE == "busy_ignoring_sigterm"))
           for _ in range(3)]
if MODE == "idle":
    gevent.joinall(callers, raise_error=True)
while len(psutil.Process().children(recursive=True)) < 4:   # the template and 3 workers
    gevent.sleep(0.01)
print("TEMPLATE", *[p.pid for p in psutil.Process().children()], flush=True)
print("READY", flush=True)
gevent.sleep(600)
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["idle", "busy", "busy_ignoring_sigterm"])
def test_parent_sigkill_leaves_no_worker_behind(mode):
    sup = Supervised(PARENT_FOR_SIGKILL.format(mode=mode))
    try:
        sup.expect("READY")
        workers = sup.worker_pids(3)
        template = [int(p) for p in sup.words("TEMPLATE")[0]]
        assert len(template) == 1 and len(set(workers)) == 3
        assert all(psutil.Process(p).ppid() == template[0] for p in workers)
        killed_at = time.monotonic()
        os.kill(sup.parent_pid, signal.SIGKILL)
        took = wait_all_gone(workers + template, killed_at, ORPHAN_DEADLINE)
        result, _, err = sup.finish()
    finally:
        sup.close()
    assert result["reaped"][result["main"]][0] == -signal.SIGKILL
    assert result["leftover"] == [], err
    # Those the template did not reap itself were reaped by the supervisor, in time.
    for pid in workers + template:
        if pid in result["reaped"]:
            assert result["reaped"][pid][1] - killed_at < ORPHAN_DEADLINE
    print(f"{mode}: every worker gone {took:.3f} s after the parent's SIGKILL")


# -- Ctrl-C -------------------------------------------------------------------------------

PARENT_FOR_SIGINT = """
import time, gevent, gprocpool
import fault_tasks as ft
API, EXIT = {api!r}, {exit!r}
pool = gprocpool.Pool(2)

def run():
    if API == "map":
        pool.map(ft.announce_and_sleep, [600] * 6, chunksize=1)
    else:
        pool.process(ft.announce_and_sleep, (600,))

try:
    if EXIT == "with":
        with pool:
            run()
    else:
        run()
except KeyboardInterrupt:
    print("INTERRUPTED", time.monotonic(), flush=True)
    raise
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("api, target, exit", [
    ("map", "parent", "bare"),
    ("map", "parent", "with"),
    ("map", "group", "bare"),
    ("map", "group", "with"),
    ("process", "group", "with"),
    ("process", "parent", "bare"),
])
def test_ctrl_c_interrupts_the_parent_promptly_and_workers_go_quietly(api, target, exit):
    """A SIGINT to the parent (or, as a terminal's Ctrl-C does, to its whole process group)
    raises KeyboardInterrupt in the parent promptly; workers print nothing and exit."""
    sup = Supervised(PARENT_FOR_SIGINT.format(api=api, exit=exit), new_session=True)
    try:
        workers = sup.worker_pids(2 if api == "map" else 1)
        gevent.sleep(0.2)   # the tasks are sleeping in the workers
        template = [p.pid for p in psutil.Process(sup.parent_pid).children()
                    if p.pid not in workers]
        sent_at = time.monotonic()
        if target == "group":
            os.killpg(sup.parent_pid, signal.SIGINT)   # the parent leads its own session
        else:
            os.kill(sup.parent_pid, signal.SIGINT)
        interrupted_at = float(sup.expect("INTERRUPTED", timeout=10)[0])
        wait_all_gone(workers + template, sent_at, ORPHAN_DEADLINE + 3)
        result, _, err = sup.finish()
    finally:
        sup.close()
    assert interrupted_at - sent_at < 1.0, f"KeyboardInterrupt took {interrupted_at - sent_at:.2f} s"
    main_code, main_exited = result["reaped"][result["main"]]
    assert main_code == -signal.SIGINT   # Python re-raises SIGINT on an uncaught KeyboardInterrupt
    assert main_exited - sent_at < 5.0
    assert result["leftover"] == [], err
    # Only the parent's own traceback: no worker (or template) printed anything.
    assert err.count("Traceback (most recent call last)") == 1, err
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "announce_and_sleep" not in err and "_child.py" not in err and "_template.py" not in err, err


# -- inherited file descriptors -----------------------------------------------------------

def fd_links(pid: int) -> dict:
    links = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return links


def pipes_of(pid: int) -> set:
    return {link for fd, link in fd_links(pid).items() if fd > 2 and link.startswith("pipe:")}


def check_worker_fds(pid: int) -> set:
    """Asserts the worker holds stdio and exactly two pipes; returns the pipes."""
    links = fd_links(pid)
    assert {0, 1, 2} <= set(links)
    assert links[0] == os.devnull
    extra = {fd: link for fd, link in links.items() if fd > 2}
    assert len(extra) == 2, f"worker {pid} holds {extra}"
    assert all(link.startswith("pipe:") for link in extra.values()), extra
    assert not any(link.startswith("socket:") for link in links.values()), links
    return set(extra.values())


def template_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


def test_worker_inherits_only_stdio_and_its_own_pipes():
    inet_before = psutil.Process().net_connections(kind="inet")
    with gprocpool.Pool(1) as pool:
        wpid = pool.process(os.getpid)
        pipes = check_worker_fds(wpid)
        # They are its own pipes: the parent holds their other ends.
        assert pipes <= set(fd_links(os.getpid()).values())
        # Private to the pool: no network socket anywhere (the template's control socket is
        # an unnamed AF_UNIX pair).
        assert psutil.Process(wpid).net_connections(kind="all") == []
        assert psutil.Process(template_of(wpid)).net_connections(kind="inet") == []
        assert psutil.Process().net_connections(kind="inet") == inet_before
        assert pool.process(os.getpid) == wpid


def test_workers_do_not_hold_another_pools_pipes():
    with gprocpool.Pool(2) as a, gprocpool.Pool(1) as b:
        a1 = a.process(os.getpid)
        a1_pipes = check_worker_fds(a1)
        b1 = b.process(os.getpid)        # B's template and worker start while A is alive
        b1_pipes = check_worker_fds(b1)
        assert not a1_pipes & b1_pipes
        assert not pipes_of(template_of(b1)) & a1_pipes
        # A starts a second worker while B is alive (a1 is busy, so a2 is new).
        busy = gevent.spawn(a.process, ft.sleep_return_pid, (0.5,))
        gevent.sleep(LARGE_TICK)
        a2 = a.process(os.getpid)
        assert busy.get(timeout=10) == a1 and a2 != a1
        a2_pipes = check_worker_fds(a2)
        assert not a2_pipes & b1_pipes
        assert not a2_pipes & a1_pipes             # nor its sibling's
        assert not pipes_of(template_of(a2)) & b1_pipes
        # A crash in A does not disturb B.
        with pytest.raises(gprocpool.WorkerLost):
            a.process(ft.kill_self, (signal.SIGKILL,))
        assert b.process(os.getpid) == b1


# -- fork safety --------------------------------------------------------------------------

EXERCISE = """
import os, signal, sys, time, traceback
import gevent, gevent.os, gprocpool
import fault_tasks as ft

def exercise(pool):
    assert pool.process(ft.identity, (1,)) == 1
    assert pool.map(ft.identity, range(20)) == list(range(20))
    try:
        pool.process(ft.kill_self, (signal.SIGKILL,))
    except gprocpool.WorkerLost as e:
        assert e.signal == signal.SIGKILL
    else:
        raise AssertionError("no WorkerLost")
    try:
        pool.process(ft.sleep_return_pid, (30,), task_timeout=0.2)
    except gprocpool.TaskTimeout:
        pass
    else:
        raise AssertionError("no TaskTimeout")
    callers = [gevent.spawn(pool.process, ft.tagged, (i, 0.05)) for i in range(6)]
    gevent.joinall(callers, raise_error=True)
    assert [c.value[0] for c in callers] == list(range(6))
"""


def run_ok(code: str):
    proc = run_script(EXERCISE + code, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.subprocess
def test_pool_created_before_monkey_patch_all():
    run_ok("""
pool = gprocpool.Pool(2)
exercise(pool)
from gevent import monkey
monkey.patch_all()
import threading
exercise(pool)
out = []
t = threading.Thread(target=lambda: out.append(pool.process(ft.identity, ("from a thread",))))
t.start(); t.join()
assert out == ["from a thread"]
pool.shutdown()
print("OK")
""")


@pytest.mark.subprocess
def test_pool_created_after_monkey_patch_all():
    run_ok("""
from gevent import monkey
monkey.patch_all()
import threading
with gprocpool.Pool(2) as pool:
    exercise(pool)
    out = []
    threads = [threading.Thread(target=lambda i=i: out.append(pool.process(ft.tagged, (i, 0.05))[0]))
               for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert sorted(out) == [0, 1, 2, 3]
print("OK")
""")


@pytest.mark.subprocess
def test_pool_in_a_process_with_other_threads():
    """Real threads run while the pool starts workers, one of them holding a lock the whole
    time: a worker forked from this process would inherit that lock held, forever."""
    run_ok("""
import threading
stop = threading.Event()
holding = threading.Event()
def hold_lock():
    with ft.SHARED_LOCK:
        holding.set()
        stop.wait()
def spin():
    n = 0
    while not stop.is_set():
        n += 1
def block():
    while not stop.is_set():
        time.sleep(0.01)
threads = [threading.Thread(target=f) for f in (hold_lock, spin, block)]
for t in threads: t.start()
holding.wait()
try:
    with gprocpool.Pool(2) as pool:
        exercise(pool)
        assert pool.map(ft.take_shared_lock, [2.0] * 4, chunksize=1) == [True] * 4
finally:
    stop.set()
    for t in threads: t.join()
print("OK")
""")


FORKED_CHILD = """
import gevent.os
{setup}
parent_pool = gprocpool.Pool(2, max_reqs=2)   # keeps starting new workers
exercise(parent_pool)
pid = {fork}()
if pid == 0:
    code = 0
    try:
        with gprocpool.Pool(2) as child_pool:
            exercise(child_pool)
            gevent.sleep(1.5)     # stay alive, and cooperative, while the parent works
            exercise(child_pool)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
with gevent.Timeout(10):
    for _ in range(3):
        exercise(parent_pool)
    _, status = gevent.os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
exercise(parent_pool)
parent_pool.shutdown()
print("OK")
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["gevent.fork", "patched os.fork"])
def test_pool_after_the_parent_forked(how):
    """A forked child creates its own pool; both the child's and the parent's pools work."""
    if how == "gevent.fork":
        code = FORKED_CHILD.format(setup="", fork="gevent.fork")
    else:
        code = FORKED_CHILD.format(setup="from gevent import monkey; monkey.patch_all()", fork="os.fork")
    run_ok(code)


@pytest.mark.subprocess
def test_pool_in_a_child_forked_before_any_pool():
    run_ok("""
pid = gevent.fork()
if pid == 0:
    code = 0
    try:
        with gprocpool.Pool(2) as pool:
            exercise(pool)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
with gprocpool.Pool(2) as pool:
    exercise(pool)
_, status = gevent.os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("OK")
""")
