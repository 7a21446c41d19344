"""Multi-process conversion (quant_core/distributed.py) on CPU with gloo: byte-identical to the
one-process run (GPTQ with calibration statistics through --devices; RTN convrot through torchrun),
work assignment (balanced, calibration groups kept together, copies on rank 0), and failures (one error
line naming the rank, exit 2, no file left)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open

from convert_to_quant.quant_core import distributed
from convert_to_quant.quant_core.calibration import CalibrationData, LayerStats
from convert_to_quant.quant_core.distributed import assign_work, layer_cost, parse_devices, strip_devices_flag
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.memory import Prefetcher
from convert_to_quant.quant_core.pipeline import ConversionJob, ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions

from helpers import file_sha256, tiny_dit, write_model

RANK_TIMEOUT = 240


def _env(threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "convert_to_quant"] + args, capture_output=True, text=True,
                          env=_env(), timeout=RANK_TIMEOUT, **kw)


def one_thread_convert(src, out, opts):
    """The one-process reference with the thread count each CPU rank uses (CPU GEMMs split differently
    with more threads: bytes on the CPU depend on the thread count, on a GPU they do not)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return convert_file(src, out, opts)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    sd = tiny_dit(width=128, blocks=2)
    return write_model(d / "dit.safetensors", sd), sd


def _calibration(sd, path):
    """Statistics for every block layer; q/k/v and the first MLP layer read one input (one group)."""
    g = torch.Generator().manual_seed(7)
    layers, groups = {}, {}

    def stats(name, inn):
        x = torch.randn(256, inn, generator=g) * (1 + 3 * (torch.rand(inn, generator=g) > 0.95))
        return LayerStats(name, x.T @ x, x.abs().amax(0), x.mean(0), 256, 256)

    for k, t in sd.items():
        if not k.endswith(".weight") or t.dim() != 2 or not k.startswith(("double_blocks", "single_blocks")):
            continue
        base = k[:-len(".weight")]
        grp = base.replace("img_mlp.0", "img_attn.qkv")  # shares the attention input
        layers[base] = grp
        if grp not in groups:
            groups[grp] = stats(grp, t.shape[1])
    CalibrationData(layers, groups).save(str(path))
    return str(path), layers


# ------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------
def test_parse_devices():
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:2, cuda:3") == ["cuda:2", "cuda:3"]
    assert parse_devices("cpu,cpu,cpu") == ["cpu"] * 3
    for bad, msg in (("0", "at least two"), ("0,0", "twice"), ("0,cpu", "mixes"), ("0,gpu1", "not a GPU")):
        with pytest.raises(PlanError, match=msg):
            parse_devices(bad)
    assert strip_devices_flag(["-i", "a", "--devices", "0,1", "--x"]) == ["-i", "a", "--x"]
    assert strip_devices_flag(["--devices=0,1", "-i", "a"]) == ["-i", "a"]


@pytest.fixture
def gptq_job(model, tmp_path):
    """A GPTQ job with calibration statistics (q/k/v + first MLP layer share a group) and its layer->group map."""
    src, sd = model
    calib, layers = _calibration(sd, tmp_path / "calib.safetensors")
    opts = ConvertOptions(plan=PlanOptions(spec=make_spec()), optimizer="gptq", calibration_data=calib, device="cpu")
    job = ConversionJob(src, str(tmp_path / "o.safetensors"), opts)
    try:
        yield job, layers
    finally:
        job.close()


def test_assignment_is_balanced_and_keeps_groups_and_copies_together(gptq_job):
    job, layers = gptq_job
    for world in (2, 3):
        shares = assign_work(job, world)
        assert shares == assign_work(job, world)  # deterministic
        assert sorted(k for s in shares for k in s) == sorted(job.order)  # every key exactly once
        for s in shares:  # file order within a rank (sequential reads)
            assert s == [k for k in job.order if k in s]
        owner = {k: r for r, s in enumerate(shares) for k in s}
        for k in job.order:
            lp = job.plan.layer_for_key(k)
            if lp is None or lp.spec is None:
                assert owner[k] == 0, k  # biases, norms, kept layers: copied by the writer's rank
        for base, grp in layers.items():  # one calibration group -> one rank (loaded once)
            assert owner[base + ".weight"] == owner[grp + ".weight"], base
        loads = [sum(layer_cost(job.reader.info(k).shape, "gptq") for k in s
                     if job.plan.layer_for_key(k) is not None and job.plan.layer_for_key(k).spec is not None)
                 for s in shares]
        biggest = max(layer_cost(job.reader.info(k).shape, "gptq") * 2 for k in job.order
                      if job.plan.layer_for_key(k) is not None)
        assert max(loads) - min(loads) <= biggest, loads  # greedy LPT: within one unit


def test_work_units_cover_every_key_largest_first(gptq_job):
    job, layers = gptq_job
    w = distributed.work_units(job)
    flat = w.copies + [k for u in w.units for k in u]
    assert sorted(flat) == sorted(job.order) and len(flat) == len(set(flat))
    assert w.costs == sorted(w.costs, reverse=True) and len(w.costs) == len(w.units)
    for u in w.units:
        assert u == [k for k in job.order if k in u]  # file order within a unit
        assert all(job.plan.layer_for_key(k).spec is not None for k in u)
    unit_of = {k: i for i, u in enumerate(w.units) for k in u}
    for base, grp in layers.items():  # one calibration group -> one unit (loaded once)
        assert unit_of[base + ".weight"] == unit_of[grp + ".weight"], base
    assert any(len(u) > 1 for u in w.units)


class _CountingStore:
    """Stands in for the process group's store: ``add`` is atomic (one lock), as the TCP store's is."""

    def __init__(self):
        self.lock, self.values = threading.Lock(), {}

    def add(self, key, n):
        with self.lock:
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]


def test_work_queue_gives_every_unit_once_and_the_slow_rank_less():
    """Two ranks share one counter; rank 0 is 3x slower per unit (as if it also wrote everyone's
    results): every unit is computed exactly once, rank 0 does its copies first and takes fewer units,
    and the two finish within one unit of each other."""
    units = [[f"u{i}.a", f"u{i}.b"] for i in range(40)]
    work = distributed.WorkUnits(copies=["c0", "c1"], units=units, costs=[1.0] * 40)
    store = _CountingStore()
    got = {0: [], 1: []}
    finish = {}
    started = {0: [], 1: []}
    t0 = time.perf_counter()

    def rank(r, per_key_s):
        q = distributed.WorkQueue(store, "q", work, r)
        sizes = {k: 1 for u in units for k in u}
        with Prefetcher(lambda k: torch.zeros(1), q.keys(), sizes, max_bytes=1 << 20, max_items=1) as pf:
            for k, _ in pf:
                got[r].append(k)
                started[r].append(time.perf_counter())
                time.sleep(per_key_s)
        finish[r] = time.perf_counter() - t0

    th = [threading.Thread(target=rank, args=(0, 0.006)), threading.Thread(target=rank, args=(1, 0.002))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert got[0][:2] == ["c0", "c1"]
    assert sorted(got[0][2:] + got[1]) == sorted(k for u in units for k in u)  # each exactly once
    assert 0 < len(got[0]) - 2 < len(got[1])  # the slow rank took fewer units
    # the two finish within about one unit of each other: when the first rank finds the counter empty,
    # the other holds at most the unit it works on and the one its read-ahead claimed (4 keys). Counted
    # in keys, not seconds, so a loaded machine that stretches the sleeps cannot fail it.
    first = min(finish, key=finish.get)
    other = 1 - first
    t_first_done = t0 + finish[first]
    assert sum(1 for t in started[other] if t > t_first_done) <= 4
    assert store.values["q"] == 40 + 2  # one failed claim per rank at the end


# ------------------------------------------------------------------------------------------------
# byte identity
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_devices_cpu_gptq_with_calibration_is_byte_identical(model, tmp_path):
    src, sd = model
    calib, _ = _calibration(sd, tmp_path / "calib.safetensors")
    ref = str(tmp_path / "one.safetensors")
    res = one_thread_convert(src, ref, ConvertOptions(
        plan=PlanOptions(spec=make_spec()), optimizer="gptq", calibration_data=calib, device="cpu",
        report_path=str(tmp_path / "one_report.json")))
    assert res.report.summary["layers_quantized"] > 10
    one = json.load(open(tmp_path / "one_report.json"))
    job = ConversionJob(src, str(tmp_path / "x.safetensors"), ConvertOptions(
        plan=PlanOptions(spec=make_spec()), optimizer="gptq", calibration_data=calib, device="cpu"))
    n_units = len(distributed.work_units(job).units)
    job.close()
    with safe_open(src, "pt") as f:
        n_keys = len(list(f.keys()))
    for schedule in ("dynamic", "static"):
        out = str(tmp_path / f"two_{schedule}.safetensors")
        report = tmp_path / f"two_{schedule}_report.json"
        r = cli(["-i", src, "-o", out, "--optimizer", "gptq", "--calibration-data", calib, "--devices", "cpu,cpu",
                 "--schedule", schedule, "--report-quality", str(report)])
        assert r.returncode == 0, r.stderr
        assert f"2 ranks, {schedule} schedule" in r.stdout
        assert file_sha256(out) == file_sha256(ref), schedule
        two = json.load(open(report))
        assert list(two["layers"]) == list(one["layers"])  # same order: file order
        assert two["layers"] == one["layers"]  # same numbers, computed from the same bytes
        assert any("output_sqnr_db" in l for l in two["layers"].values())
        # per-rank timing: both ranks, every planned tensor counted once, busy never longer than the run
        ranks = two["summary"]["ranks"]
        assert [t["rank"] for t in ranks] == [0, 1]
        assert sum(t["tensors"] for t in ranks) == n_keys
        for t in ranks:
            assert 0 < t["busy_s"] <= t["done_s"] + 1e-3
        if schedule == "dynamic":  # every unit taken exactly once, by some rank
            assert sum(t["units"] for t in ranks) == n_units
        else:
            assert all("units" not in t for t in ranks)
        assert "ranks: rank 0:" in r.stdout and "ranks" not in one["summary"]


@pytest.mark.slow
def test_torchrun_three_ranks_convrot_is_byte_identical(model, tmp_path):
    src, _ = model
    ref = str(tmp_path / "one.safetensors")
    one_thread_convert(src, ref, ConvertOptions(plan=PlanOptions(spec=make_spec(convrot=True, convrot_groupsize=64)),
                                                device="cpu"))
    out = str(tmp_path / "three.safetensors")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                        "--master_port", str(distributed._free_port()), "-m", "convert_to_quant", "-i", src,
                        "-o", out, "--convrot", "--convrot-group-size", "64", "--device", "cpu"], capture_output=True, text=True, env=_env(), timeout=RANK_TIMEOUT)
    assert r.returncode == 0, r.stderr[:2500]
    assert file_sha256(out) == file_sha256(ref)
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports


# ------------------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("schedule,failing_rank", [("static", 0), ("static", 1), ("dynamic", None)])
def test_a_failing_rank_fails_the_run_cleanly(model, tmp_path, schedule, failing_rank):
    """A NaN weight on rank 0 (the writer) or on rank 1 (a sender; the static schedule fixes which),
    or on whichever rank takes it (dynamic): one error line, exit 2, no file; the other rank stays
    quiet whichever notices first."""
    src, sd = model
    job = ConversionJob(src, str(tmp_path / "x.safetensors"), ConvertOptions(plan=PlanOptions(spec=make_spec()),
                                                                           device="cpu"))
    share = assign_work(job, 2)[failing_rank or 0] if schedule == "static" else job.order
    key = next(k for k in reversed(share) if job.plan.layer_for_key(k) is not None
               and job.plan.layer_for_key(k).spec is not None)
    job.close()
    bad = dict(sd)
    bad[key] = bad[key].clone()
    bad[key][3, 5] = float("nan")
    path = write_model(tmp_path / "nan.safetensors", bad)
    out = str(tmp_path / "out.safetensors")
    r = cli(["-i", path, "-o", out, "--devices", "cpu,cpu", "--schedule", schedule])
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert key in errors[0] and "NaN" in errors[0]
    if failing_rank is not None:
        assert ("rank 1:" in errors[0]) == (failing_rank == 1)
    assert "Traceback" not in r.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_devices_flag_errors_are_one_line(model, tmp_path):
    src, _ = model
    r = cli(["-i", src, "-o", str(tmp_path / "o.safetensors"), "--devices", "0"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --devices needs at least two devices")
    # the launcher checks the arguments and the input while the ranks start: one error, from it alone
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for args, msg in ((["-i", str(tmp_path / "missing.safetensors")], "no such file"),
                      (["-i", str(bad)], "broken.safetensors"),
                      (["-i", src, "--optimizer", "bogus"], "unknown --optimizer"),
                      (["-i", src, "--gptq-damp", "-1"], "argument --gptq-damp/--gptq_damp: must be a finite number")):
        r = cli(args + ["-o", str(tmp_path / "o.safetensors"), "--devices", "cpu,cpu"])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
        assert not os.path.exists(tmp_path / "o.safetensors")
    r = cli(["-i", src, "--devices", "cpu,cpu", "--bogus-flag"])  # argparse: one error line, no usage block
    assert r.returncode == 2 and r.stderr == ("error: unrecognized arguments: --bogus-flag (run convert_to_quant "
                                              "--help for the flags)\n"), r.stderr


def test_launcher_imports_no_torch_and_finds_devices():
    """``python -m convert_to_quant --devices ...`` starts the ranks before it imports torch."""
    code = ("import sys; import convert_to_quant.quant_core.launcher as L; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert L.devices_value(['-i', 'a', '--devices', '0,1']) == '0,1'; "
            "assert L.devices_value(['--devices=cpu,cpu']) == 'cpu,cpu'; "
            "assert L.devices_value(['-i', 'a', '--devices', '0,1', '--dry-run']) is None; "
            "assert L.devices_value(['-i', 'a']) is None; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.gpu
def test_two_gpus_gptq_is_byte_identical_to_one(model, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    src, _ = model
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    r1 = cli(["-i", src, "-o", one, "--optimizer", "gptq", "--device", "cuda:0"])
    r2 = cli(["-i", src, "-o", two, "--optimizer", "gptq", "--devices", "0,1"])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert file_sha256(one) == file_sha256(two)


def test_ranks_read_like_a_one_process_run(model, tmp_path, monkeypatch):
    """A rank reads through ``job.read_input`` (page-locked buffers on a GPU), not the bare reader:
    pageable reads made every host-to-GPU copy of a rank synchronous."""
    src, _ = model
    job = ConversionJob(src, str(tmp_path / "o.safetensors"), ConvertOptions(plan=PlanOptions(spec=make_spec()),
                                                                           device="cpu"))
    try:
        seen = []
        real = job.read_input
        monkeypatch.setattr(job, "read_input", lambda k: seen.append(k) or real(k))
        work = distributed.work_units(job)
        keys = work.copies + [k for u in work.units for k in u]
        for source in (distributed._Source(keys, None, None),
                       distributed._Source(distributed.WorkQueue(_CountingStore(), "q", work, 0).keys(), 1, None)):
            seen.clear()
            with source.prefetcher(job) as pf:
                got = [k for k, _ in pf]
            assert sorted(got) == sorted(job.order) and sorted(seen) == sorted(job.order)
    finally:
        job.close()


# ------------------------------------------------------------------------------------------------
# stopping a --devices run: Ctrl-C while the ranks start or convert, the launcher killed
# ------------------------------------------------------------------------------------------------
def _rank_processes(marker: str):
    """PIDs of live processes whose command line mentions ``marker`` (read from /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if marker in cmd and not zombie:
                pids.append(int(d))
    return pids


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Big enough that GPTQ on two one-thread CPU ranks takes seconds (16 x 768x768)."""
    g = torch.Generator().manual_seed(1)
    sd = {f"blocks.{i}.fc.weight": (torch.randn(768, 768, generator=g) * 0.02).bfloat16() for i in range(16)}
    return write_model(tmp_path_factory.mktemp("slow") / "m.safetensors", sd)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("when,how", [("start", signal.SIGINT), ("converting", signal.SIGINT),
                                      ("converting", signal.SIGTERM), ("converting", signal.SIGKILL)])
def test_stopping_a_devices_run_leaves_nothing(slow_model, tmp_path, when, how):
    """Ctrl-C (or SIGTERM) to the launcher while the ranks import torch, or once rank 0 is writing: one
    error line, exit 130, no output, no ``.partial``, no rank left running. The launcher killed outright
    (SIGKILL): the ranks notice (parent-death signal) and remove the ``.partial`` themselves."""
    out = str(tmp_path / f"stopped_{when}_{int(how)}.safetensors")
    p = subprocess.Popen([sys.executable, "-m", "convert_to_quant", "-i", slow_model, "-o", out, "--optimizer", "gptq",
                          "--devices", "cpu,cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env())
    if when == "start":
        time.sleep(0.3)
    else:
        t0 = time.monotonic()
        while not os.path.exists(out + ".partial"):
            assert p.poll() is None and time.monotonic() - t0 < RANK_TIMEOUT, "rank 0 never opened its output"
            time.sleep(0.01)
    p.send_signal(how)
    _, err = p.communicate(timeout=RANK_TIMEOUT)
    if how != signal.SIGKILL:
        lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]
        assert p.returncode == 130 and lines == ["error: interrupted; no output file was left behind"], err
    t0 = time.monotonic()
    while (_rank_processes(out) or os.path.exists(out + ".partial")) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert not _rank_processes(out), "a rank outlived its launcher"
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_ranks_get_quiet_c10d_logging(monkeypatch):
    """The ranks run with ``TORCH_CPP_LOG_LEVEL=ERROR`` unless the user set it: when an interrupt takes a
    peer's store away, c10d logs a warning with a C++ stack dump ("recvValue failed ... Connection reset
    by peer") that once reached the launcher's stderr beside the one-line "interrupted" message."""
    from convert_to_quant.quant_core import ranks
    seen = []

    class FakePopen:
        def __init__(self, cmd, env=None, **kw):
            seen.append(env)

    monkeypatch.setattr(ranks.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    ranks.spawn_ranks(["cpu", "cpu"], ["-i", "m.safetensors", "--devices", "cpu,cpu"])
    assert [e["TORCH_CPP_LOG_LEVEL"] for e in seen] == ["ERROR", "ERROR"]
    seen.clear()
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")
    ranks.spawn_ranks(["cpu", "cpu"], ["-i", "m.safetensors", "--devices", "cpu,cpu"])
    assert [e["TORCH_CPP_LOG_LEVEL"] for e in seen] == ["INFO", "INFO"]
