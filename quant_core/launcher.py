"""``--devices``: start one conversion process per device, as ``torchrun`` would -- without importing torch.

``python -m convert_to_quant ... --devices 0,1`` (and the ``convert_to_quant`` command) come here first.
The ranks are started at once; while they import torch and initialise CUDA (seconds each), this process
checks the arguments (``cli.check_args``). Each rank waits for one byte on an inherited pipe before it
reads its own arguments: if the check failed, the pipe closes empty, the ranks leave quietly and the
error is printed once, here. Then this process only supervises (``_supervise``): if any rank fails the
others are stopped, and its exit code is rank 0's (or the first failure's).

The processes themselves (spawning, the gate, supervision, interrupts) are in ``ranks.py``; this module
is the entry and decides ``--devices`` once.

Kept free of torch (and of everything that imports it) so that starting N ranks costs one torch import
per rank, not one more in front of them all.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

from .errors import PlanError, terminal_text
from .ranks import (GATE_ENV, INTERRUPTED_LINE, PARENT_ENV, _free_port, _interrupted_exit, _received,  # noqa: F401
                    _supervise, arm_interrupts, disarm_interrupts, launch, parse_devices, raise_interrupt,
                    spawn_ranks, strip_devices_flag, wait_gate, watch_parent)

_NOT_EARLY = ("-h", "--help", "--dry-run", "--dry_run", "--list-presets", "--list_presets", "--example")


def devices_value(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--devices`` when this command should start ranks (not inside a rank already, not
    for help, a dry run, the preset list or the example); else ``None``."""
    if "RANK" in os.environ or any(a.split("=", 1)[0] in _NOT_EARLY for a in argv):
        return None
    for i, a in enumerate(argv):
        if a == "--devices":
            return argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith("--devices="):
            return a.split("=", 1)[1]
    return None


def launch_checked(devices_spec: str, argv: Sequence[str]) -> int:
    """Start the ranks behind a gate, check the arguments meanwhile, then open the gate (or close it
    and report the error) and supervise.

    While the check imports torch, an interrupt is only noted, not raised: raised inside a library's
    import it can be swallowed there (numpy turns it into an ImportError that torch treats as "no
    numpy"), and the run would go on. It is acted on before the gate opens: the ranks, which have read
    nothing and hold no file yet, are killed."""
    try:
        devices = parse_devices(devices_spec)
    except PlanError as e:
        print(f"error: {terminal_text(str(e))}", file=sys.stderr)
        return 2
    noted: List[int] = []
    old_int = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    r, w = os.pipe()
    procs: List[subprocess.Popen] = []
    try:
        try:
            procs = spawn_ranks(devices, argv, gate_fd=r)
        finally:
            os.close(r)
        from .cli import check_args  # imports torch: overlaps the ranks' own start
        rc = None if noted else check_args(list(argv))
        if noted or rc is not None:
            os.close(w)  # the gate closes empty: ranks still waiting leave quietly
            w = -1
            for p in procs:
                if noted and p.poll() is None:
                    p.kill()
                p.wait()
            if noted:
                print(INTERRUPTED_LINE, file=sys.stderr)
                return 130
            return rc
        # from here the first interrupt raises; _supervise forwards it to the ranks (rank 0 reports),
        # later ones are ignored while it waits for them to clean up
        arm_interrupts()
        os.write(w, b"1" * len(procs))
        os.close(w)
        w = -1
        return _supervise(procs)
    finally:
        if w >= 0:
            os.close(w)
        if not _received:  # after an interrupt, later signals stay ignored until the process exits
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


def console_main(argv: Optional[List[str]] = None) -> int:
    """``convert_to_quant`` / ``python -m convert_to_quant``: ranks for ``--devices``, else the CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    watch_parent()
    spec = devices_value(argv)
    if spec is not None:
        return launch_checked(spec, argv)
    # while the CLI imports torch an interrupt is only noted (raised inside a library's import it can be
    # swallowed there), then the handlers are armed in one step: no moment with the default ones
    noted: List[int] = []
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from .cli import main
    finally:
        if noted:
            _received[:] = noted  # from here on every signal is ignored
        for s in old:
            signal.signal(s, raise_interrupt)
    if noted:
        return _interrupted_exit()
    return main(argv)


def entry_point() -> None:
    """The process entry (``convert_to_quant`` and ``python -m convert_to_quant``): ``console_main``, then
    leave without the interpreter's teardown of torch (~0.5 s, more with CUDA). Everything this
    program writes is complete and closed by then (outputs are renamed into place, reports written,
    the process group destroyed); only the standard streams need a flush."""
    try:
        rc = console_main()
    except SystemExit as e:  # argparse: --help
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:  # a signal outside the CLI's own handling (a rank waiting at its gate)
        rc = _interrupted_exit()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc if isinstance(rc, int) else 1)
