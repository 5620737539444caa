"""200 users submit at once, from a cold start, through the real CLI: every submission is
stored once with a unique id, admitted once, and nobody sees an error.

Runs on SQLite and on PostgreSQL. The control plane is the real `orch server` process the
CLIs auto-start (they race for it; exactly one must result), with the no-op executor
(`ORCH_EXECUTOR=noop`), so no Ray is needed and jobs succeed as soon as they are admitted.

Cost: nearly all of it the 200 CLI interpreters starting up. Measured for SQLite on 2 cores
shared with other test runs (load average over 100): clients 180 CPU-s (0.9 s each), server
21 s, 387 s wall; the same run of the CLI before it imported lazily: clients 235 CPU-s
(1.2 s each), 463 s wall. CPU per process grows with the load: one `orch submit -q` alone
cost about 0.7 CPU-s at a load average near 10 (1.0 before).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.support import REPO, postgres_schema, require_postgres, run_orch

SUBMITTERS = 200
SPEC = "jobs/bert_mlm.yaml"
# Ports of its own (two test sessions on one machine: ORCH_TEST_PORT_OFFSET, as conftest).
PORTS = {"sqlite": 8781, "postgresql": 8782}
# Run with `python -S -c`: block until the gate pipe is closed, then exec the real command.
_GATE = ("import os, sys\n"
         "os.read(int(sys.argv[1]), 1)\n"
         "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(name, database URL) of a fresh, empty database."""
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{tmp_path}/db/orch.db"
    else:
        require_postgres()
        with postgres_schema(f"orch_conc_{os.getpid()}") as url:
            yield "postgresql", url


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pids(port: int) -> list[int]:
    """Live `orch server` processes listening (or trying to) on `port`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"orchestrator.cli" in argv and b"server" in argv and b"--port" in argv
                and argv[argv.index(b"--port") + 1] == str(port).encode()):
            pids.append(int(entry.name))
    return pids


def test_200_concurrent_submits_from_a_cold_start(backend: tuple[str, str], tmp_path: Path) -> None:
    name, db_url = backend
    port = PORTS[name] + int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
    assert _port_free(port), f"port {port} is taken: a stray orch server? (test needs it free)"
    home = tmp_path / "orch_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(
        ORCH_HOME=str(home),
        ORCH_SERVER_PORT=str(port),
        ORCH_DATABASE_URL=db_url,
        ORCH_EXECUTOR="noop",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = ["-m", "orchestrator.cli", "submit", SPEC, "-q"]
    procs: list[subprocess.Popen[str]] = []
    gate_r, gate_w = os.pipe()
    gate = {gate_r, gate_w}  # still open

    def close(fd: int) -> None:
        gate.discard(fd)
        os.close(fd)

    try:
        # Spawning 200 interpreters one by one takes longer than the first ones need to
        # start a server, so the race would hardly happen. Each child therefore waits at
        # a starting gate (a pipe) and then becomes the real CLI (exec: same process,
        # same pipes); closing the gate releases all 200 at once.
        for _ in range(SUBMITTERS):
            procs.append(subprocess.Popen(
                [sys.executable, "-S", "-c", _GATE, str(gate_r), *cmd], pass_fds=(gate_r,),
                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        close(gate_r)
        cpu_before = _children_cpu()
        start = time.monotonic()
        close(gate_w)
        deadline = start + 600
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
        submit_s = time.monotonic() - start
        clients_cpu = _children_cpu() - cpu_before

        # What users saw: exit 0, one id each on stdout, nothing at all on stderr.
        failures = [(rc, out, err) for rc, out, err in results if rc != 0 or err.strip()]
        log = home / "server.log"
        assert not failures, (
            f"{len(failures)} of {SUBMITTERS} submits failed or printed to stderr; first: "
            f"{failures[0]}\nserver log tail:\n"
            f"{log.read_text(errors='replace')[-3000:] if log.exists() else '(none)'}"
        )
        printed = [out.strip() for _, out, _ in results]
        assert all(p.isdigit() for p in printed), printed
        ids = [int(p) for p in printed]
        assert len(set(ids)) == SUBMITTERS, Counter(ids).most_common(3)

        # Exactly one control plane came out of the race.
        servers = _server_pids(port)
        assert len(servers) == 1, f"expected one orch server on port {port}, found {servers}"
        assert (home / "server.pid").read_text().strip() == str(servers[0]), (
            "server.pid does not name the running server (a second one was started?)")

        # The store: 200 rows, each admitted exactly once, all run to completion.
        with Store(db_url) as store:
            deadline = time.monotonic() + 60
            while True:
                jobs = store.list_jobs()
                if all(j.state == "succeeded" for j in jobs) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert len(jobs) == SUBMITTERS
            assert sorted(j.id for j in jobs) == sorted(ids)
            assert Counter(j.state for j in jobs) == {"succeeded": SUBMITTERS}
            assert [j.id for j in jobs if j.attempts != 1] == []
            for job in jobs:
                moves = [(e.from_state, e.to_state) for e in store.events(job.id)]
                assert moves.count(("queued", "pending")) == 1, (job.id, moves)
                assert moves == [(None, "queued"), ("queued", "pending"),
                                 ("pending", "running"), ("running", "succeeded")], (job.id, moves)
        server_log = log.read_text(errors="replace")
        for bad in ("Traceback", "database is locked", "ERROR", "address already in use"):
            assert bad not in server_log, server_log[-3000:]
        print(f"\n{name}: {SUBMITTERS} concurrent submits done in {submit_s:.1f}s wall; CPU: "
              f"clients {clients_cpu:.1f}s, server {_process_cpu(servers[0]):.1f}s")
    finally:
        for fd in list(gate):
            close(fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        down = run_orch(env, "down", "--keep-ray", timeout=60)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 20
    while _server_pids(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _server_pids(port), "orch down left the server running"
