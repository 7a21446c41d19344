"""What one linear costs a user's graph, call by call: synchronised single calls and CPU time per call.

``benchmarks/kernels.py`` times kernels back to back (``do_bench``), where the CPU runs ahead and hides
launch work. An eager ComfyUI step does not always hide it: text encoders, modulation layers, small
latents and batch-1 calls leave the GPU waiting for the host. This script measures, per shape:

* ``sync us``: one call between two synchronisations, CUDA events recorded around it (launch work and
  GPU time as a lone call sees them), median over ``--calls`` calls;
* ``cpu us``: host time to issue one call on an idle queue (synchronise, clock, call, clock);
* ``graph us``: GPU-only time (CUDA-graph replay of one call per distinct layer, weights cold in L2), where capture works.

Variants: ``bf16`` (``F.linear``), ``ours`` (the loader's runtime call: ``kernels.prepare_linear`` on a
per-row int8 weight, path ``kernels.runtime_path``: the table on CUDA, chunked dequant off Triton), ``ours_generic`` (``kernels.quantized_linear``: operand checks
each call), ``ours_no_plan`` (launch plans off, ``CONVERT_TO_QUANT_LAUNCH_PLANS=0``), ``ours_triton_launch`` (Triton's generic launcher on every call, i.e. before the fast launch
path), and the loader's call with each path forced (``w8a16`` / ``w8a8`` / ``dequant``) for the path table. Weights rotate
through enough distinct layers to exceed the L2 cache, as consecutive layers of a model do.
Every variant is checked against float64 first.

    python benchmarks/per_call.py                 # CUDA
    python benchmarks/per_call.py --dry-run       # CPU smoke test (torch backend, tiny shapes)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (M, K, N)
SHAPES = {
    "flux_qkv": (4608, 3072, 9216),
    "flux_mlp_up": (4608, 3072, 12288),
    "flux_mlp_down": (4608, 12288, 3072),
    "t5_ffn": (512, 4096, 10240),
    "t5_ffn_down": (512, 10240, 4096),
    "flux_mod": (1, 3072, 18432),  # Flux's modulation layers: one token (the conditioning vector)
    "flux_single_mod": (1, 3072, 9216),
    **{f"m{m}_3072": (m, 3072, 3072) for m in (1, 16, 64, 256, 512, 1024)},
}
DRY_SHAPES = {"m3_64": (3, 64, 96), "m40_128": (40, 128, 64)}
PATH_VARIANTS = ("w8a16", "w8a8", "dequant")


def log(*a):
    print(*a, flush=True)


def env_off(name, fn):
    """``fn`` run with the environment variable ``name`` set to "0" (removed again after each call)."""
    def run(i):
        os.environ[name] = "0"
        try:
            return fn(i)
        finally:
            os.environ.pop(name, None)
    run.toggles_env = True
    return run


def shifted(fn, offset: int):
    """``fn`` called with round index + ``offset`` (so it picks another layer than its neighbours)."""
    def run(i):
        return fn(i + offset)
    run.toggles_env = getattr(fn, "toggles_env", False)
    return run


def layers_for(m, k, n, dev, count, Int8Tensorwise):
    g = torch.Generator(device=dev).manual_seed(m * 7 + k * 3 + n)
    out = []
    for _ in range(count):
        w = torch.randn(n, k, device=dev, generator=g) * k ** -0.5
        b = (torch.randn(n, device=dev, generator=g) * 0.1).to(torch.bfloat16)
        q = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.bfloat16)
        out.append((w.to(torch.bfloat16), b, q))
        del w
    return out


def measure_all(variants: dict, calls: int, dev, graph_for, graph_calls: int = 1) -> dict:
    """{variant: (sync us, cpu us, graph us)}: medians over ``calls`` rounds in which every variant makes
    one call, in a rotating order (a shared host's slow spells hit all variants alike instead of
    whichever ran during them); graph us from CUDA-graph replay for the variants in ``graph_for``.
    Variants that set environment variables per call (``env_off``) are measured after the others,
    each in its own rounds with ``bf16``: on the H200 host, interleaving them tripled the host time
    of the ``F.linear`` calls next to them (80 vs 25-30 us), which would flatter every ratio."""
    plain = {v: f for v, f in variants.items() if not getattr(f, "toggles_env", False)}
    res = _measure_rounds(plain, calls, dev, graph_for, graph_calls)
    for v, f in variants.items():
        if v not in plain:
            res[v] = _measure_rounds({v: f}, calls, dev, graph_for, graph_calls)[v]
    return res


def measure(fn, calls: int, dev, graph: bool):
    """(sync us, cpu us, graph us) medians of one variant alone (``benchmarks/runtime_formats.py``)."""
    return _measure_rounds({"v": fn}, calls, dev, ("v",) if graph else ())["v"]


def _measure_rounds(variants: dict, calls: int, dev, graph_for, graph_calls: int = 1) -> dict:
    cuda = dev.type == "cuda"
    names = list(variants)
    for fn in variants.values():
        for _ in range(5):
            fn(0)
    sync = {v: [] for v in names}
    cpu = {v: [] for v in names}
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(calls):
        for j in range(len(names)):
            v = names[(i + j) % len(names)]
            fn = variants[v]
            if cuda:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start.record()
                fn(i)
                t1 = time.perf_counter()
                end.record()
                end.synchronize()
                sync[v].append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn(i)
                t1 = time.perf_counter()
                sync[v].append((t1 - t0) * 1e6)
            cpu[v].append((t1 - t0) * 1e6)
    out = {}
    for v in names:
        g = float("nan")
        if cuda and v in graph_for:
            try:
                from triton.testing import do_bench_cudagraph
                g = do_bench_cudagraph(lambda: [variants[v](j) for j in range(graph_calls)], rep=50,
                                       return_mode="median") * 1e3 / graph_calls
            except Exception as e:  # capture can fail (allocations inside the call): not a result
                log(f"   graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        out[v] = (statistics.median(sync[v]), statistics.median(cpu[v]), g)
    return out


def host_us(fn, dev, calls=200) -> float:
    """Median host time of one call on an idle queue."""
    ts = []
    for _ in range(calls):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def kernel_times(name, fns, dev, calls=50):
    """Device time per call of each kernel (torch.profiler / CUPTI), for one synchronised call at a time:
    what the GPU itself spends, without launch gaps."""
    from torch.profiler import ProfilerActivity, profile
    for vname, fn in fns.items():
        for i in range(3):
            fn(i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                fn(i)
                torch.cuda.synchronize()
        per = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                per.setdefault(ev.name, []).append(ev.device_time_total if hasattr(ev, "device_time_total")
                                                   else ev.cuda_time_total)
        parts = sorted(((sum(v) / calls, k[:60], len(v) / calls) for k, v in per.items()), reverse=True)
        log(f"   kernels, {name} {vname} (device us per call): "
            + "; ".join(f"{k} {t:.2f} (x{c:g})" for t, k, c in parts[:4])
            + f"; total {sum(t for t, _, _ in parts):.2f}")


def profile_call(name, ours, qw, x, dev, K, L, layer=None, bias=None, bf16=None):
    import cProfile
    import io
    import pstats
    m, k = x.shape
    n = qw.qdata.shape[0]
    q, s = K.quantize_activations(x)
    pieces = {"torch.empty": lambda: torch.empty((m, n), device=dev, dtype=torch.bfloat16),
              "quantize_activations": lambda: K.quantize_activations(x)}
    if dev.type == "cuda":
        pieces.update({
            "int8 gemm launch": lambda: L.launch_int8_gemm(q, s.reshape(-1), qw.qdata, qw.scale.reshape(-1), None,
                                                           torch.bfloat16),
            "w8a16 launch": lambda: L.launch_w8a16(x, qw.qdata, qw.scale.reshape(-1), None, 0, torch.bfloat16)})
    pieces["ours (prepared)"] = lambda: ours(0)
    log(f"   host us, {name}: " + ", ".join(f"{k} {host_us(f, dev):.1f}" for k, f in pieces.items()))
    if dev.type == "cuda":
        plan_breakdown(name, layer, x, bias, dev, L)
        kernel_times(name, {"bf16": bf16, "ours": ours}, dev)
    log(f"   launches so far: {L.LAUNCH_STATS}")
    pr = cProfile.Profile()
    pr.enable()
    for i in range(200):
        ours(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    log("\n".join("   " + ln for ln in buf.getvalue().splitlines()[6:30] if ln.strip()))


def plan_breakdown(name, layer, x, bias, dev, L, calls=300):
    """Host us of the pieces of one planned call on an idle queue: the output allocation alone, the
    plan replay (``launch.LaunchPlan.__call__``: output, temporaries, launches), the whole loader call
    (``PreparedLinear.__call__``: its checks or fast-path key, then the replay), and ``F.linear`` on the
    dequantized weight; plus what the plan launches (kernel, grid, temporaries, whether the C launcher
    is called directly)."""
    import triton
    from convert_to_quant.kernels import triton_kernels as tk

    def ours():
        return layer(x, bias, None)
    for _ in range(4):
        ours()
    plans = [p for p in (layer.plans or {}).values() if isinstance(p, L.LaunchPlan)]
    if not plans:
        log(f"   plan breakdown, {name}: no launch plan")
        return
    plan = plans[0]
    kname = {id(v): v.fn.__name__ for v in vars(tk).values() if isinstance(v, triton.runtime.jit.JITFunction)}
    fname = {ent[1]: kname.get(key[0], "?") for key, ent in L._FAST.items()}
    what = [f"{fname.get(e[1], '?')} grid {e[3]}x{e[4]}x{e[5]}" + (" direct" if e[-1] else "") for e in plan.launches]
    w = layer.qw.dequantize().to(dev, torch.bfloat16)
    pieces = {"out alloc": lambda: torch.empty(plan.out_shape, dtype=plan.out_dtype, device=dev),
              "plan replay": lambda: plan(x, bias), "ours call": ours,
              "F.linear": lambda: F.linear(x, w, bias)}
    stream = L._raw_stream(torch.cuda.current_device())
    pieces["triton scratch alloc"] = lambda: L._torch_scratch(4096, 128, stream)
    ts = {k: [] for k in pieces}
    for i in range(calls):
        for k, f in pieces.items():  # interleaved: noise hits every piece alike
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e6)
    log(f"   plan breakdown, {name}: {'; '.join(what)}; {len(plan.temps)} temporaries "
        f"({'workspace' if plan.ws_offsets is not None else 'allocated'}); host us (min / median): "
        + ", ".join(f"{k} {min(v):.1f} / {statistics.median(v):.1f}" for k, v in ts.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--no-paths", action="store_true", help="skip the forced-path columns")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also print where the host time of one 'ours' call goes (cProfile, pieces timed alone)")
    ap.add_argument("--tuner-log", action="store_true", help="print the tuner's measured configs at the end")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["CONVERT_TO_QUANT_KERNEL_BACKEND"] = "torch"
    elif not torch.cuda.is_available():
        log("needs a CUDA GPU (or --dry-run)")
        return 2
    sys.path.insert(0, os.path.dirname(REPO))
    import convert_to_quant.kernels as K
    from convert_to_quant.kernels import launch as L
    from convert_to_quant.quant_core.formats import Int8Tensorwise

    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        import triton
        log(f"card: {p.name} ({p.multi_processor_count} SMs); torch {torch.__version__}; triton {triton.__version__}")
    else:
        log(f"DRY RUN on CPU, torch {torch.__version__}")
    if dev.type == "cuda":  # wake the host and the card: the first shape of a cold run measured 2x host times
        w = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:
            F.linear(w, w)
            torch.cuda.synchronize()
        del w
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    names = args.shapes.split(",") if args.shapes else list(shapes)
    rows, failures = [], []
    for name in names:
        m, k, n = shapes[name]
        # enough distinct layers that their bf16 weights exceed the H200's 50 MB L2
        count = 2 if args.dry_run else max(2, min(8, -(-160_000_000 // (2 * n * k))))
        lay = layers_for(m, k, n, dev, count, Int8Tensorwise)
        g = torch.Generator(device=dev).manual_seed(m + k)
        xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2)]
        prepared = [K.prepare_linear(q, dev) for _, _, q in lay]

        def pick(i):
            return i % count, xs[i % 2]

        def bf16(i):
            j, x = pick(i)
            return F.linear(x, lay[j][0], lay[j][1])

        rpath = K.runtime_path(dev)  # what the loader's layers pass: None on CUDA, "dequant" off Triton

        def ours(i):
            j, x = pick(i)
            return prepared[j](x, lay[j][1], rpath)

        def generic(i):
            j, x = pick(i)
            return K.quantized_linear(x, lay[j][2], lay[j][1])

        def forced(path):  # the loader's call with the path forced (launch plans included)
            def fn(i):
                j, x = pick(i)
                return prepared[j](x, lay[j][1], path)
            return fn

        triton_launch = env_off(L.FAST_LAUNCH_ENV, ours)  # Triton's generic launcher on every call
        no_plan = env_off(L.PLANS_ENV, ours)
        two_launch_w8a8 = env_off(K.dispatch.FUSED_ENV, env_off(K.dispatch.ONELAUNCH_ENV, forced("w8a8")))  # act pass + GEMM
        w8a16_noswap = env_off(L.SWAP_ENV, forced("w8a16"))  # W8A16 without the swapped kernel (own tuner key)

        prepared2 = [K.prepare_linear(q, dev) for _, _, q in lay]
        warm2 = [0]

        def w8a8_2l(i):  # W8A8 in two launches where the one-launch kernel would run (plans recorded so)
            j, x = pick(i)
            if warm2[0] >= 8 * count:
                return prepared2[j](x, lay[j][1], "w8a8")
            warm2[0] += 1
            saved, K.dispatch.ONELAUNCH_MAX_M = K.dispatch.ONELAUNCH_MAX_M, 0
            try:
                return prepared2[j](x, lay[j][1], "w8a8")
            finally:
                K.dispatch.ONELAUNCH_MAX_M = saved

        variants = {"bf16": bf16, "ours": ours, "ours_generic": generic}
        if dev.type == "cuda":
            variants["ours_no_plan"] = no_plan
            variants["ours_triton_launch"] = triton_launch
        if not args.no_paths:
            variants.update({p: forced(p) for p in PATH_VARIANTS})
            if m <= 128:
                variants["w8a8_2launch"] = two_launch_w8a8
            if dev.type == "cuda" and 16 < m <= L.ONELAUNCH_MAX_M:
                variants["w8a8_2l"] = w8a8_2l
            if dev.type == "cuda":
                variants["w8a16_noswap"] = w8a16_noswap
        # correctness against float64 with the dequantized weights (bf16 output tolerance)
        ref = (xs[0].double() @ lay[0][2].dequantize().to(dev).double().T + lay[0][1].double())
        for vname, fn in variants.items():
            if vname == "bf16":
                continue
            out = fn(0).double()
            err = ((out - ref).norm() / ref.norm()).item()
            tol = 3e-2 if vname in ("w8a8", "w8a8_2launch", "w8a8_2l", "ours", "ours_generic", "ours_no_plan",
                                    "ours_triton_launch") else 1e-2
            if not err < tol:  # W8A8 adds the activation rounding (~1e-2); NaN fails
                failures.append(f"{name}/{vname}: rel err {err:.2e} vs float64")
        # In round i every variant used layer i % count until round 5 of docs/KERNELS.md: a variant that
        # followed another int8 one found its weight still in L2 (the forced paths looked 3-4 us faster
        # than "ours", which follows bf16). Now consecutive variants use layers 3 apart: cold, as the
        # next layer of a model is.
        step = 3 if count >= 4 and count % 3 else 1
        variants = {v: shifted(f, step * idx) for idx, (v, f) in enumerate(variants.items())}
        res = measure_all(variants, args.calls, dev, ("bf16", "ours", "w8a8", "w8a16", "w8a8_2launch", "w8a16_noswap",
                                                      "w8a8_2l"), graph_calls=count)
        if args.profile:
            profile_call(name, ours, lay[0][2], xs[0], dev, K, L, prepared[0], lay[0][1], bf16)
        rows.append((name, (m, k, n), res))
        b = res["bf16"]
        o = res["ours"]
        log(f"{name} {m}x{k}->{n}: bf16 sync {b[0]:.1f}us cpu {b[1]:.1f}us | ours sync {o[0]:.1f}us "
            f"({b[0] / o[0]:.2f}x) cpu {o[1]:.1f}us (+{o[1] - b[1]:.1f})")
        lay = prepared = prepared2 = xs = None  # free this shape's layers before the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    cols = list(dict.fromkeys(c for _, _, res in rows for c in res))
    log("")
    log("per synchronised call, us (x = bf16 sync / variant sync); cpu = host us to issue one call")
    log("| shape M×K→N | " + " | ".join(cols) + " | cpu bf16 / ours / no-plan / generic / triton-launch | graph bf16 / ours / w8a8 / w8a16 (/ w8a8 2-launch) / w8a16 no swap (/ w8a8 2l) |")
    log("|" + "---|" * (len(cols) + 3))
    for name, (m, k, n), res in rows:
        b = res["bf16"][0]
        cells = [("–" if c not in res else f"{res[c][0]:.1f}" + ("" if c == "bf16" else f" ({b / res[c][0]:.2f}x)"))
                 for c in cols]
        cpu = " / ".join(f"{res[c][1]:.1f}" for c in ("bf16", "ours", "ours_no_plan", "ours_generic",
                                                        "ours_triton_launch") if c in res)
        gr = " / ".join(f"{res[c][2]:.1f}" for c in ("bf16", "ours", "w8a8", "w8a16", "w8a8_2launch", "w8a16_noswap",
                                                     "w8a8_2l")
                      if c in res)
        log(f"| {name} {m}×{k}→{n} | " + " | ".join(cells) + f" | {cpu} | {gr} |")
    if args.tuner_log:
        log("\ntuner (GPU us + extra host us per config):")
        for line in L.TUNER.log:
            log("  " + line)
    return report_failures(failures)


def report_failures(failures) -> int:
    """The exit status of a benchmark that checks correctness first: 1 with the failures listed, else 0."""
    if failures:
        log("CORRECTNESS FAILURES: " + "; ".join(failures))
        return 1
    log("all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
