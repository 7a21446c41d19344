"""Multi-GPU (and multi-process CPU) conversion on ``torch.distributed``.

    torchrun --nproc_per_node 2 -m convert_to_quant -i model.safetensors --optimizer gptq ...
    convert_to_quant -i model.safetensors --optimizer gptq --devices 0,1      (launches the same)
    convert_to_quant -i model.safetensors --devices cpu,cpu                   (CPU processes, gloo)

Every rank opens the input and builds the same plan and the same units of work (``work_units``: one
per quantized layer, or all layers reading one calibration group, so each group is loaded once, by one
rank), largest estimated cost first; everything only copied (biases, norms, kept layers) is rank 0's.
``--schedule dynamic`` (default): each rank takes the next unit when it is ready for one, from an atomic
counter in the group's store (``WorkQueue``), so a slower rank simply takes fewer. ``--schedule static``:
units fixed per rank in advance (``assign_work``). The processes are started by ``launcher.py``.
Each rank quantizes its layers on its own device with the same per-layer math and seeds as a
one-process run (``seeding.layer_rng``), and sends the finished tensors to rank 0, which
writes them into the one output file through the same ``StreamingWriter`` at the offsets the plan
fixed. The file is byte-identical to the one-process run on the same kind of device (tested on CPU
with gloo; ``benchmarks/scale.py`` compares SHA-256 on GPUs).

Results travel over a gloo process group as CPU tensors (the GPUs never talk to each other):
per item a header ``int64[3] = (kind, meta bytes, payload bytes)``, a JSON meta (key, tensor names,
quality entry) and one payload with the tensors' bytes back to back, in the plan's dtypes and shapes.
A rank that fails sends its error to rank 0, which aborts (no output file) and re-raises it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from datetime import timedelta
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import errors as _errors
from .errors import ConvertError, PlanError
from .ranks import _free_port, _supervise, launch, parse_devices, strip_devices_flag  # noqa: F401 (re-exported)
from .memory import free_vram, policy_from_options
from .optimizers.base import optimizer_cost
from .streaming import Prefetcher, WriteBehind
from .metrics import LayerQuality

ITEM, DONE, ERROR = 0, 1, 2
_NO_LAYER = type("NoLayer", (), {"spec": None})()


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int


def distributed_env() -> Optional[RankInfo]:
    """The torchrun environment of this process, if it is one rank of several."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return RankInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def rank_device(option: str, info: RankInfo) -> str:
    """The device of one rank: ``auto``/``cuda`` -> ``cuda:<local rank>`` when CUDA is available."""
    if option in (None, "", "auto"):
        return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    if option == "cuda":
        return f"cuda:{info.local_rank}"
    return option


# ------------------------------------------------------------------------------------------------
# work assignment
# ------------------------------------------------------------------------------------------------
def layer_cost(shape: Sequence[int], optimizer: str) -> float:
    out = int(shape[0]) if shape else 1
    inn = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    return optimizer_cost(optimizer).time(out, inn)  # declared beside the optimizer


@dataclasses.dataclass
class WorkUnits:
    """What the ranks share out: ``copies`` (keys only copied: biases, norms, kept layers; rank 0's, in
    file order) and ``units`` (keys quantized together: one layer, or all layers reading one calibration
    group; each list in file order), largest estimated cost first. A function of the plan only."""
    copies: List[str]
    units: List[List[str]]
    costs: List[float]


def work_units(job) -> WorkUnits:
    plan = job.plan
    units: Dict[str, List[str]] = {}
    costs: Dict[str, float] = {}
    first_pos: Dict[str, int] = {}
    copies: List[str] = []
    for pos, key in enumerate(job.order):
        lp = plan.layer_for_key(key)
        if lp is None or lp.spec is None:
            copies.append(key)
            continue
        unit = lp.base
        if job.calibration is not None:
            name = job.calibration.resolve(lp.base)
            if name is not None:
                unit = "calibration group " + job.calibration.layers[name]
        units.setdefault(unit, []).append(key)
        costs[unit] = costs.get(unit, 0.0) + layer_cost(lp.shape, job.opts.optimizer)
        first_pos.setdefault(unit, pos)
    order = sorted(units, key=lambda u: (-costs[u], first_pos[u]))
    return WorkUnits(copies, [units[u] for u in order], [costs[u] for u in order])


def assign_work(job, world: int) -> List[List[str]]:
    """The static schedule (``--schedule static``): keys per rank, each list in file order. Units go
    largest first to the least-loaded rank by estimated cost; copies stay on rank 0. Deterministic."""
    w = work_units(job)
    load = [0.0] * world
    load[0] += sum(job.reader.info(k).numel for k in w.copies) * 1e-3  # copying is cheap next to quantizing
    owner: Dict[str, int] = {k: 0 for k in w.copies}
    for keys, cost in zip(w.units, w.costs):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += cost
        for k in keys:
            owner[k] = r
    return [[k for k in job.order if owner[k] == r] for r in range(world)]


class WorkQueue:
    """The dynamic schedule (default): every rank takes the next unit, largest first, when it is ready
    for one -- from a counter in the process group's key-value store (``store.add`` is atomic and served
    by the store's own thread on rank 0, so it never waits for rank 0's Python). A rank that is slower
    (rank 0 also receives and writes everyone's results) or has layers costlier than estimated simply
    takes fewer units; which rank computes a layer does not change its bytes (per-layer seeds, same
    math on every rank). Rank 0 takes the copies first."""

    def __init__(self, store, name: str, work: WorkUnits, rank: int):
        self.store, self.name, self.work, self.rank = store, name, work, rank
        self.taken: List[int] = []

    def claim(self) -> Optional[int]:
        try:
            i = int(self.store.add(self.name, 1)) - 1
        except Exception as e:  # the store lives in rank 0's process: rank 0 is gone and reports why
            raise LostRank0(f"rank {self.rank}: taking the next layer from rank 0 failed: {e}") from None
        if i >= len(self.work.units):
            return None
        self.taken.append(i)
        return i

    def keys(self) -> Iterator[str]:
        """This rank's keys, deciding the next unit only when asked (give it to a ``Prefetcher`` with
        ``max_items=1`` so that a rank claims at most one unit ahead of the one it computes)."""
        if self.rank == 0:
            yield from self.work.copies
        while True:
            i = self.claim()
            if i is None:
                return
            yield from self.work.units[i]


# ------------------------------------------------------------------------------------------------
# the wire format
# ------------------------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _send_item(kind: int, meta: dict, tensors: Optional[Dict[str, torch.Tensor]] = None, dst: int = 0):
    import torch.distributed as dist
    raw = json.dumps(meta).encode("utf-8")
    parts = [_as_bytes(t) for t in (tensors or {}).values() if t.numel()]
    payload = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
    dist.send(torch.tensor([kind, len(raw), 0 if payload is None else payload.numel()], dtype=torch.int64), dst=dst)
    dist.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dst=dst)
    if payload is not None:
        dist.send(payload, dst=dst)


def _recv_item(src: int, entries) -> Tuple[int, dict, Dict[str, torch.Tensor]]:
    import torch.distributed as dist
    hdr = torch.empty(3, dtype=torch.int64)
    dist.recv(hdr, src=src)
    kind, n_meta, n_payload = (int(x) for x in hdr)
    raw = torch.empty(n_meta, dtype=torch.uint8)
    dist.recv(raw, src=src)
    meta = json.loads(bytes(raw.numpy()).decode("utf-8"))
    tensors: Dict[str, torch.Tensor] = {}
    if kind != ITEM:
        return kind, meta, tensors
    payload = torch.empty(n_payload, dtype=torch.uint8)
    if n_payload:
        dist.recv(payload, src=src)
    pos = 0
    for name in meta["tensors"]:
        e = entries.get(name)
        if e is None:
            raise ConvertError(f"internal error: rank {src} sent {name!r}, which is not in the output plan")
        nb = e.nbytes
        chunk = payload[pos:pos + nb]
        tensors[name] = chunk.view(e.dtype).reshape(e.shape) if nb else torch.empty(e.shape, dtype=e.dtype)
        pos += nb
    if pos != n_payload:
        raise ConvertError(f"internal error: rank {src} sent {n_payload} bytes for {meta.get('key')}, "
                           f"the plan needs {pos}")
    return kind, meta, tensors


def _layer_to_json(layer) -> Optional[list]:
    if layer is None:
        return None
    base, lq = layer
    return [base, dataclasses.asdict(lq)]


def _layer_from_json(obj) -> Optional[Tuple[str, LayerQuality]]:
    if obj is None:
        return None
    return obj[0], LayerQuality(**obj[1])


def _error_to_json(e: BaseException, rank: int) -> dict:
    return {"rank": rank, "type": type(e).__name__, "message": str(e) or type(e).__name__}


def _error_from_json(d: dict) -> BaseException:
    cls = getattr(_errors, d.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, ConvertError)):
        cls = ConvertError
    return cls(f"rank {d.get('rank')}: {d.get('message')}")


class LostRank0(ConvertError):
    """A peer lost its connection to rank 0: rank 0 failed and reports why; this rank stays quiet."""
    reported_by_rank0 = True


class _Sender:
    """Sends finished items to rank 0 on a thread, at most ``depth`` items queued (back-pressure)."""

    def __init__(self, depth: int = 2):
        self.q: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="ctq-send", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                _send_item(*item)
            except BaseException as e:  # the connection is gone: rank 0 died
                self.error = e
                return

    def _lost(self) -> LostRank0:
        return LostRank0(f"sending results to rank 0 failed: {self.error}")

    def put(self, kind: int, meta: dict, tensors=None):
        if self.error is not None:
            raise self._lost()
        while True:
            try:
                self.q.put((kind, meta, tensors), timeout=1.0)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise self._lost()

    def close(self):
        if self.thread.is_alive():
            self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self._lost()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def init_process_group(info: RankInfo, timeout_minutes: int = 120):
    """Join the gloo group (env:// rendezvous, as torchrun sets it up); returns the group's key-value
    store, which also holds the dynamic schedule's counter."""
    import torch.distributed as dist
    timeout = timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    store, _, _ = next(dist.rendezvous("env://", info.rank, info.world, timeout=timeout))
    dist.init_process_group("gloo", store=store, rank=info.rank, world_size=info.world, timeout=timeout)
    return store


def _queue_name() -> str:
    """The counter's name, new for every run of one store (torchrun's agent keeps its store over restarts)."""
    return "ctq/next_unit/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "-"),
                                         os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def agreed_free_vram(device: torch.device) -> Optional[int]:
    """The smallest free VRAM over all ranks (``--streaming-mode auto`` must resolve the same everywhere)."""
    import torch.distributed as dist
    free = free_vram(device)
    t = torch.tensor([-1 if free is None else free], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    v = int(t.item())
    return None if v < 0 else v


def convert_distributed(input_path: str, output_path: Optional[str], options, info: Optional[RankInfo] = None,
                        progress: Optional[Callable[[int, int, str], None]] = None,
                        log: Callable[[str], None] = lambda m: None):
    """Run this process's share of a multi-rank conversion. Rank 0 returns the ``ConversionResult``;
    the other ranks return ``None``. All ranks must call it with the same arguments."""
    from .pipeline import ConversionJob
    info = info or distributed_env()
    if info is None:
        raise ConvertError("convert_distributed needs the torchrun environment (RANK, WORLD_SIZE, ...)")
    options = dataclasses.replace(options, device=rank_device(options.device, info))
    if options.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(options.device))
    store = init_process_group(info)
    job = ConversionJob(input_path, output_path, options, log if info.rank == 0 else (lambda m: None))
    try:
        # every rank must place layers identically: resolve --streaming-mode auto from the smallest free VRAM
        free = agreed_free_vram(job.device)
        job.memory = policy_from_options(options.optimizer_options, job.device, options.low_memory,
                                         free_vram_bytes=free)
        schedule = options.schedule
        if schedule == "static":
            shares = assign_work(job, info.world)
            n_q = [sum(1 for k in sh if (job.plan.layer_for_key(k) or _NO_LAYER).spec is not None) for sh in shares]
            log(f"{info.world} ranks, static schedule: " + ", ".join(f"rank {r}: {n} layers" for r, n in enumerate(n_q)))
            source = _Source(shares[info.rank], None, None)
        elif schedule == "dynamic":
            work = work_units(job)
            log(f"{info.world} ranks, dynamic schedule: {len(work.units)} units of work, largest first")
            q = WorkQueue(store, _queue_name(), work, info.rank)
            source = _Source(q.keys(), 1, q)
        else:
            raise PlanError(f"unknown schedule {schedule!r} (dynamic or static)")
        if info.rank == 0:
            result = _run_rank0(job, source, info, progress, log)
        else:
            _run_worker(job, source, info)
            result = None
    finally:
        job.close()
    # every rank is past the final broadcast: tear the group down now, not in the interpreter's exit
    # (gloo's threads destroyed at exit abort the process). After a failure the CLI leaves with os._exit.
    import torch.distributed as dist
    dist.destroy_process_group()
    return result


@dataclasses.dataclass
class _Source:
    """This rank's keys: a list (static schedule) or the work queue's claiming iterator (dynamic)."""
    keys: object
    max_items: Optional[int]
    queue: Optional[WorkQueue]

    def prefetcher(self, job) -> Prefetcher:
        sizes = {k: job.reader.info(k).nbytes for k in job.order}
        # read_input: into page-locked memory on a GPU, as a one-process run reads (pageable host memory
        # makes every host-to-GPU copy a slow synchronous one)
        return Prefetcher(job.read_input, self.keys, sizes, job.memory.prefetch_bytes, max_items=self.max_items)

    def units(self) -> Optional[int]:
        return None if self.queue is None else len(self.queue.taken)


def _processed(job, inputs, before: Optional[Callable[[], None]] = None):
    """``(key, tensors, layer, seconds)`` for each ``(key, tensor)`` the read-ahead yields: the tensor is
    handed to ``job.process`` through ``job.prefetched`` and no other reference to it is kept, so the
    layer can free it as soon as it is on the device."""
    for key, t in inputs:
        if before is not None:
            before()
        job.prefetched = {key: t}
        del t
        t1 = time.perf_counter()
        tensors, layer = job.process(key)
        job.prefetched = {}
        yield key, tensors, layer, time.perf_counter() - t1
        del tensors, layer


def _run_worker(job, source: _Source, info: RankInfo):
    import torch.distributed as dist
    sender = _Sender()
    t0, busy, n = time.perf_counter(), 0.0, 0
    try:
        with source.prefetcher(job) as inputs:
            for key, tensors, layer, seconds in _processed(job, inputs):
                busy += seconds
                n += 1
                sender.put(ITEM, {"key": key, "tensors": list(tensors), "layer": _layer_to_json(layer)}, tensors)
                del tensors
    except LostRank0:
        raise
    except ConvertError as e:
        _forward_error(sender, e, info)
        e.reported_by_rank0 = True  # rank 0 prints it (and exits with its code); this rank stays quiet
        raise
    except Exception as e:  # a bug: rank 0 reports the run as failed, the traceback stays here
        _forward_error(sender, ConvertError(f"internal error: {type(e).__name__}: {e}"), info)
        raise
    sender.put(DONE, _rank_timing(info.rank, n, busy, time.perf_counter() - t0, source.units()))
    sender.close()
    status = torch.zeros(1, dtype=torch.int64)
    try:
        dist.broadcast(status, src=0)  # rank 0's verdict: the file was written and verified
    except RuntimeError as e:
        raise LostRank0(f"rank 0 stopped before the end: {e}") from None
    if int(status.item()) != 0:
        raise LostRank0(f"rank {info.rank}: rank 0 did not complete the output file")


def _rank_timing(rank: int, tensors: int, busy: float, done: float, units: Optional[int] = None) -> dict:
    """One rank's timing for the report's ``summary["ranks"]``: tensors processed (and, with the dynamic
    schedule, units of work taken), seconds inside ``job.process`` (reading excluded), and seconds from
    the start of its share to its last result."""
    d = {"rank": rank, "tensors": tensors, "busy_s": round(busy, 3), "done_s": round(done, 3)}
    if units is not None:
        d["units"] = units
    return d


def _forward_error(sender: _Sender, e: ConvertError, info: RankInfo):
    try:
        sender.put(ERROR, _error_to_json(e, info.rank))
        sender.close()
    except LostRank0:
        pass  # rank 0 is gone already; it reported its own failure


def _run_rank0(job, source: _Source, info: RankInfo, progress, log):
    import torch.distributed as dist
    n_layers = len(job.plan.quantized_layers())
    entries = {e.key: e for e in job.entries}
    layers: Dict[str, Tuple[str, LayerQuality]] = {}
    errors: List[BaseException] = []
    lock = threading.Lock()
    counts = {"done": 0}
    timings: Dict[int, dict] = {}
    t0, busy, n_mine = time.perf_counter(), 0.0, 0

    def on_layer(key: str, layer):
        if layer is None:
            return
        with lock:
            layers[key] = layer
            if layer[1].quantized:
                counts["done"] += 1
                if progress is not None:
                    progress(counts["done"], n_layers, layer[0])

    def receive(peer: int, out: WriteBehind):
        try:
            while True:
                kind, meta, tensors = _recv_item(peer, entries)
                if kind == DONE:
                    with lock:
                        timings[peer] = dict(meta, received_s=round(time.perf_counter() - t0, 3))
                    return
                if kind == ERROR:
                    with lock:
                        errors.append(_error_from_json(meta))
                    return
                out.put(tensors)
                on_layer(meta["key"], _layer_from_json(meta.get("layer")))
        except BaseException as e:
            with lock:
                errors.append(e if isinstance(e, ConvertError) else
                              ConvertError(f"receiving results from rank {peer} failed: {e}"))

    def check():
        with lock:
            if errors:
                raise errors[0]

    bound = job.memory.prefetch_bytes
    with job.open_writer() as writer:
        with WriteBehind(writer, max(bound, 256 << 20)) as out:  # peers' results queue here too
            threads = [threading.Thread(target=receive, args=(p, out), name=f"ctq-recv-{p}", daemon=True)
                       for p in range(1, info.world)]
            for th in threads:
                th.start()
            with source.prefetcher(job) as inputs:
                for key, tensors, layer, seconds in _processed(job, inputs, check):
                    busy += seconds
                    n_mine += 1
                    out.put(tensors)
                    del tensors
                    on_layer(key, layer)
            timings[0] = _rank_timing(0, n_mine, busy, time.perf_counter() - t0, source.units())
            for th in threads:
                while th.is_alive():
                    th.join(0.2)
                    check()
            check()
        for key in job.order:  # the report lists layers in file order, as a one-process run does
            if key in layers:
                job.report.add(*layers[key])
        # where the time went per rank (rank 0 also receives and writes everyone's results)
        job.summary_extra["ranks"] = [timings[r] for r in sorted(timings)]
        log("ranks: " + "; ".join(f"rank {t['rank']}: {t['tensors']} tensors"
                                  + (f" ({t['units']} units)" if "units" in t else "")
                                  + f", busy {t['busy_s']:.1f} s, done at {t['done_s']:.1f} s"
                                  for t in job.summary_extra["ranks"]))
        writer.finish(verify=lambda tmp: job.verify(tmp, writer.checksums))
    # every peer has sent DONE and waits for this verdict. On a failure rank 0 raises instead: the peers
    # see their connection close (or the launcher stops them) -- a collective here could wait forever
    # on a peer still blocked sending.
    dist.broadcast(torch.tensor([0], dtype=torch.int64), src=0)
    return job.finish(writer.checksums, verified=True)
