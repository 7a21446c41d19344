"""Rank processes for ``--devices``: start one conversion process per device, as ``torchrun`` would
(``spawn_ranks``), gate them until the arguments are checked (``wait_gate``), supervise them
(``_supervise``), and the interrupt handling every process of a run shares (``arm_interrupts``).

Imported by the launcher (the entry), the CLI and ``distributed``; imports nothing of the package but
``errors``, and no torch.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from .errors import PlanError

GATE_ENV = "CTQ_LAUNCH_GATE"
PARENT_ENV = "CTQ_LAUNCHER_PID"


def parse_devices(spec: str) -> List[str]:
    """``--devices``: ``0,1`` / ``cuda:0,cuda:1`` (GPUs) or ``cpu,cpu`` (CPU processes)."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if len(items) < 2:
        raise PlanError(f"--devices needs at least two devices, e.g. 0,1 (got {spec!r}); for one GPU use --device")
    out = []
    for it in items:
        if it == "cpu":
            out.append("cpu")
            continue
        idx = it[5:] if it.startswith("cuda:") else it
        if not idx.isdigit():
            raise PlanError(f"--devices: {it!r} is not a GPU index (0, 1, cuda:2) or cpu")
        out.append(f"cuda:{int(idx)}")
    if len({d for d in out if d != "cpu"}) != len([d for d in out if d != "cpu"]):
        raise PlanError(f"--devices lists a GPU twice: {spec}")
    if any(d != "cpu" for d in out) and any(d == "cpu" for d in out):
        raise PlanError("--devices mixes GPUs and cpu: every rank must compute on the same kind of device "
                        "for the output to be identical to a one-device run")
    return out


# ------------------------------------------------------------------------------------------------
# --devices: launch one process per device (what torchrun does, with a clean exit code)
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_devices_flag(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--devices":
            skip = True
            continue
        if a.startswith("--devices="):
            continue
        out.append(a)
    return out


def launch(devices: Sequence[str], argv: Sequence[str], threads_per_rank: Optional[int] = None,
           python: Optional[str] = None) -> int:
    """Start the ranks and wait for them (see ``spawn_ranks``); returns rank 0's exit code (or the
    first failure's)."""
    return _supervise(spawn_ranks(devices, argv, threads_per_rank, python))


def spawn_ranks(devices: Sequence[str], argv: Sequence[str], threads_per_rank: Optional[int] = None,
                python: Optional[str] = None, gate_fd: Optional[int] = None) -> List[subprocess.Popen]:
    """Run ``python -m convert_to_quant <argv>`` once per device as ranks of one gloo group; each GPU
    rank sees only its GPU. With ``gate_fd`` (the read end of a pipe) each rank imports its modules
    and then waits for one byte from it before it reads its arguments (``wait_gate``)."""
    n = len(devices)
    port = _free_port()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_list = [v.strip() for v in visible.split(",")] if visible else None
    base_argv = strip_devices_flag(argv)
    if threads_per_rank is None and all(d == "cpu" for d in devices) and not os.environ.get("OMP_NUM_THREADS"):
        threads_per_rank = max(1, (os.cpu_count() or 1) // n)  # CPU ranks share the cores
    procs: List[subprocess.Popen] = []
    for r, dev in enumerate(devices):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # c10d's C++ warnings (e.g. "recvValue failed ... Connection reset by peer" with a stack dump, when a
        # peer's store goes away during an interrupt) would reach the user's terminal beside our one-line
        # messages; errors still surface as Python exceptions, which the ranks report
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        if dev.startswith("cuda:"):
            idx = int(dev[5:])
            if visible_list is not None:
                if idx >= len(visible_list):
                    raise PlanError(f"--devices: GPU {idx} is not among CUDA_VISIBLE_DEVICES={visible}")
                env["CUDA_VISIBLE_DEVICES"] = visible_list[idx]
            else:
                env["CUDA_VISIBLE_DEVICES"] = str(idx)
            rank_dev = "cuda:0"
        else:
            rank_dev = "cpu"
        if threads_per_rank:
            env["OMP_NUM_THREADS"] = str(threads_per_rank)
        cmd = [python or sys.executable, "-m", "convert_to_quant"] + list(base_argv) + ["--device", rank_dev]
        if r != 0 and "--verbose" not in base_argv:
            cmd += ["--verbose", "MINIMAL"]
        if gate_fd is not None:
            env[GATE_ENV] = str(gate_fd)
        env[PARENT_ENV] = str(os.getpid())
        # a session of their own: a Ctrl-C in the terminal reaches this process only, which stops the
        # ranks in order (``_supervise``); they stop themselves if this process dies (``watch_parent``)
        procs.append(subprocess.Popen(cmd, env=env, pass_fds=() if gate_fd is None else (gate_fd,),
                                      start_new_session=True))
    return procs


def _supervise(procs: List[subprocess.Popen], grace_s: float = 60.0) -> int:
    """Wait for the ranks. Rank 0 reports every failure (a peer's error is sent to it), so when a peer
    fails rank 0 gets ``grace_s`` to say so and exit; when rank 0 fails the peers are killed (they hold
    no files). Returns rank 0's exit code, or a failed peer's if rank 0 had to be stopped."""
    n = len(procs)
    codes: Dict[int, int] = {}
    peer_failed_at = None
    try:
        while 0 not in codes or len(codes) < n:
            for r, p in enumerate(procs):
                if r not in codes and p.poll() is not None:
                    codes[r] = p.returncode
                    if r != 0 and p.returncode != 0 and peer_failed_at is None:
                        peer_failed_at = time.monotonic()
            if 0 in codes and codes[0] != 0:
                break
            if 0 in codes and len(codes) < n and peer_failed_at is None:
                peer_failed_at = time.monotonic()  # rank 0 done: the peers only wait for its verdict
            if peer_failed_at is not None and time.monotonic() - peer_failed_at > grace_s:
                if procs[0].poll() is None:
                    procs[0].terminate()  # SIGTERM: rank 0 removes its .partial file
                    try:
                        procs[0].wait(30)
                    except subprocess.TimeoutExpired:
                        procs[0].kill()
                    codes[0] = procs[0].wait()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for q in procs:
            if q.poll() is None:
                q.send_signal(signal.SIGINT)
        for q in procs:
            try:
                q.wait(30)
            except subprocess.TimeoutExpired:
                q.kill()
        return 130
    finally:
        for q in procs[1:]:
            if q.poll() is None:
                q.kill()
                q.wait()
        if procs[0].poll() is None:
            procs[0].terminate()
            procs[0].wait()
    rc0 = codes.get(0, procs[0].returncode)
    if rc0 not in (0, None) and rc0 > 0:
        return rc0
    bad = [c for r, c in sorted(codes.items()) if r != 0 and c not in (0, None) and c > 0]
    return bad[0] if bad else (1 if rc0 else 0)


# ------------------------------------------------------------------------------------------------
# the gate, and the entry point of ``python -m convert_to_quant`` / ``convert_to_quant``
# ------------------------------------------------------------------------------------------------
def watch_parent() -> None:
    """In a rank started by ``spawn_ranks``: receive SIGTERM when the launcher dies (Linux
    ``PR_SET_PDEATHSIG``; the rank then stops as on an interrupt, removing its partial file), and leave
    at once if it is already gone."""
    pid = os.environ.pop(PARENT_ENV, None)
    if pid is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(pid):
        os._exit(2)


def wait_gate() -> bool:
    """In a rank started with a gate: wait until the launcher has checked the arguments. ``False``: it
    found them wrong and reports that itself (this rank leaves without a word). No gate: ``True``."""
    fd = os.environ.pop(GATE_ENV, None)
    if fd is None:
        return True
    try:
        return os.read(int(fd), 1) == b"1"
    except (OSError, ValueError):
        return False
    finally:
        try:
            os.close(int(fd))
        except (OSError, ValueError):
            pass


INTERRUPTED_LINE = "error: interrupted; no output file was left behind"
_received: List[int] = []  # signals raise_interrupt got since the handlers were armed


def raise_interrupt(signum, frame):
    """SIGINT/SIGTERM handler: the first signal stops the run as Ctrl-C does (``KeyboardInterrupt``; the
    conversion removes its partial file on the way out). Later ones -- a second Ctrl-C, a SIGTERM from a
    supervisor -- are only noted: raised in the middle of that cleanup they would leave the partial file
    behind and end the process with a traceback instead of exit 130."""
    _received.append(signum)
    if len(_received) == 1:
        raise KeyboardInterrupt(f"signal {signum}")


def arm_interrupts() -> Dict[int, object]:
    """Install ``raise_interrupt`` for SIGINT and SIGTERM (forgetting earlier signals); returns the
    handlers it replaced, for ``disarm_interrupts``. Outside the main thread nothing changes."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    del _received[:]
    return {s: signal.signal(s, raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}


def disarm_interrupts(previous: Dict[int, object]) -> None:
    """Put back the handlers ``arm_interrupts`` replaced -- unless a signal came: then the process is on
    its way out, and a later signal must not find the default handler (which would kill it mid-cleanup
    or print a traceback)."""
    if _received:
        return
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def _interrupted_exit() -> int:
    if os.environ.get("RANK", "0") in ("", "0"):  # of several ranks, rank 0 says it for all
        print(INTERRUPTED_LINE, file=sys.stderr)
    return 130
