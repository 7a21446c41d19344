"""Small-M kernel lab: the GPU time of every small-M candidate at one shape, from CUDA-graph replay.

``benchmarks/per_call.py`` measures what a user's call costs; this script asks *why* a small-M int8
linear takes more GPU time than cuBLAS bf16 (docs/KERNELS.md, "Round 5"). Per shape it times, each in
its own CUDA graph over enough distinct weights to miss the L2 cache (consecutive layers of a model):

* ``bf16``: ``F.linear`` (cuBLAS);
* ``act``: the activation quantization alone (``launch_act_quant``);
* ``w8a16 <cfg>``: ``launch_w8a16`` with each candidate config, forced;
* ``gemm <cfg>``: the W8A8 GEMM alone on pre-quantized rows (``launch_int8_gemm``), each config;
* ``1l <cfg>``: W8A8 in one launch (``launch_w8a8_onelaunch``), each config;
* ``fused <cfg>``: ``launch_w8a8_fused``.

Every variant is checked against a float64 reference of its own numerics first.

    python benchmarks/small_m.py --shapes m64,m256          # CUDA
    python benchmarks/small_m.py --dry-run                  # CPU (Triton interpreter), tiny shape
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "m1": (1, 3072, 3072), "m2": (2, 3072, 3072), "m4": (4, 3072, 3072), "m16": (16, 3072, 3072), "m64": (64, 3072, 3072), "m128": (128, 3072, 3072),
    "m256": (256, 3072, 3072), "m512": (512, 3072, 3072), "m1024": (1024, 3072, 3072),
    "t5_ffn": (512, 4096, 10240), "t5_ffn_down": (512, 10240, 4096),
    # Flux-dev at 1024^2 (4,096 image + 512 text tokens): the per-call shapes and a block's other linears
    "flux_qkv": (4608, 3072, 9216), "flux_mlp_up": (4608, 3072, 12288), "flux_mlp_down": (4608, 12288, 3072),
    "flux_linear2": (4608, 15360, 3072), "flux_img_proj": (4096, 3072, 3072), "flux_txt_proj": (512, 3072, 3072),
    "flux_txt_mlp_down": (512, 12288, 3072),
    # Flux's modulation layers (one token: the conditioning vector): double blocks' img_mod / txt_mod, single blocks'
    "flux_mod": (1, 3072, 18432), "flux_single_mod": (1, 3072, 9216),
}
DRY_SHAPES = {"m24": (24, 128, 96)}


def log(*a):
    print(*a, flush=True)


def graph_us(fn, layers: int, reps: int = 4, replays: int = 20) -> float:
    """GPU µs per call: ``layers * reps`` calls captured in one CUDA graph, median over replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(layers):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for i in range(layers):
                fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (layers * reps))
    ts.sort()
    return ts[len(ts) // 2]


def eager_us(fn, layers: int, reps: int = 4, rounds: int = 9) -> float:
    """µs per call of ``layers * reps`` back-to-back calls between two CUDA events, median over rounds."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(rounds):
        a.record()
        for _ in range(reps):
            for i in range(layers):
                fn(i)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (layers * reps))
    ts.sort()
    return ts[len(ts) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="m64,m256")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, one tiny shape")
    ap.add_argument("--only", default="", help="comma list of variant families to run (bf16,act,w8a16,gemm,1l,fused)")
    ap.add_argument("--ncu", default="", help="run this one variant eagerly a few times (for ncu) and exit")
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph",
                    help="graph: CUDA-graph replay (GPU only); eager: back-to-back calls between two events "
                         "(for shapes whose calls take 100s of us, where the host runs ahead; no graph-capture "
                         "memsets for the zeroed workspaces)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(REPO))
    pkg = os.path.basename(REPO)
    kernels = __import__(f"{pkg}.kernels", fromlist=["launch"])
    L = kernels.launch
    from importlib import import_module
    Int8Tensorwise = import_module(f"{pkg}.quant_core.formats").Int8Tensorwise

    dev = torch.device("cpu" if args.dry_run else "cuda")
    shapes = DRY_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",")}
    only = set(args.only.split(",")) if args.only else None
    arch = L.arch_of(dev)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    failures = []
    for name, (m, k, n) in shapes.items():
        count = 1 if args.dry_run else max(2, -(-80_000_000 // (n * k)))  # int8 weights beyond the 50 MB L2
        g = torch.Generator(device=dev).manual_seed(m + k + n)
        ws_ = [torch.randn(n, k, device=dev, generator=g) * k ** -0.5 for _ in range(count)]
        qs = [Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), dtype) for w in ws_]
        wb = [w.to(dtype) for w in ws_]
        del ws_
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        qa, a_s = L.launch_act_quant(x)
        qd = [q.qdata for q in qs]
        sc = [q.scale.reshape(-1).float() for q in qs]
        # references in float64 of each numerics
        ref16 = (x.double() @ (qd[0].double() * sc[0].double()[:, None]).t())
        ref88 = (qa.double() * a_s.double()[:, None]) @ (qd[0].double() * sc[0].double()[:, None]).t()
        variants = {}  # name -> (fn(i), ref, tol)
        if only is None or "bf16" in only:
            variants["bf16"] = (lambda i: F.linear(x, wb[i]), x.double() @ wb[0].double().t(), 1e-2)
        if only is None or "act" in only:
            variants["act"] = (lambda i: L.launch_act_quant(x), None, 0)
        if only is None or "w8a16" in only:
            for cfg in dict.fromkeys(L._w8a16_configs(arch, m)):
                variants[f"w8a16 {cfg.short()}"] = (
                    lambda i, c=cfg: L.launch_w8a16(x, qd[i], sc[i], None, 0, dtype, configs=[c]), ref16, 1e-2)
        if only is None or "gemm" in only:
            for cfg in L._W8A8_CONFIGS.get(arch, L._W8A8_CONFIGS["sm80"]):
                variants[f"gemm {cfg.short()}"] = (
                    lambda i, c=cfg: L.launch_int8_gemm(qa, a_s, qd[i], sc[i], None, dtype, configs=[c]), ref88, 1e-2)
        if only is None or "1l" in only:
            for cfg in L.onelaunch_configs(arch, m):
                variants[f"1l {cfg.short()}"] = (
                    lambda i, c=cfg: L.launch_w8a8_onelaunch(x, qd[i], sc[i], None, dtype, configs=[c]), ref88, 1e-2)
        if only is None or "fused" in only:
            for cfg in L._fused_act_configs(arch, m):
                variants[f"fused {cfg.short()}"] = (
                    lambda i, c=cfg: L.launch_w8a8_fused(x, qd[i], sc[i], None, dtype, configs=[c]), ref88, 1e-2)
        if args.ncu:
            fn = variants[args.ncu][0]
            for i in range(3 * count):
                fn(i % count)
            torch.cuda.synchronize()
            return 0
        log(f"== {name}: M={m} K={k} N={n}, {count} weights, {dtype}")
        rows = []
        for vname, (fn, ref, tol) in variants.items():
            try:
                fn(0)  # compiles (a config that cannot run here raises)
                if ref is not None:
                    for rep in range(3):  # a race shows as a moving error
                        e = rel_err(fn(0), ref)
                        if not e <= tol:
                            failures.append(f"{name} {vname}: rel err {e:.3g} > {tol}")
                            log(f"   FAIL {vname}: rel err {e:.3g}")
                            break
                if vname.startswith("1l"):  # the two-launch W8A8's bits, always (a race would move them)
                    exact = L.launch_int8_gemm(qa, a_s, qd[0], sc[0], None, dtype)
                    bad = sum(not torch.equal(fn(0), exact) for _ in range(3 if args.dry_run else 50))
                    if bad:
                        failures.append(f"{name} {vname}: {bad} calls differ from the two-launch bits")
                        log(f"   FAIL {vname}: {bad} calls differ from the two-launch bits")
                t = (float("nan") if args.dry_run else eager_us(fn, count) if args.timing == "eager"
                     else graph_us(fn, count))
            except Exception as ex:  # a config that does not compile here is not a result
                log(f"   {vname}: {type(ex).__name__}: {str(ex).splitlines()[0][:100] if str(ex) else ''}")
                continue
            rows.append((vname, t))
        if not args.dry_run:
            base = dict(rows).get("bf16", float("nan"))
            for vname, t in rows:
                log(f"   {vname:44s} {t:8.2f} us   bf16/this {base / t:5.2f}x")
            best = {}
            for vname, t in rows:
                fam = vname.split()[0]
                if fam not in best or t < best[fam][1]:
                    best[fam] = (vname, t)
            log("   best: " + "; ".join(f"{v} {t:.2f}" for v, t in best.values()))
            if "gemm" in best and "act" in best:
                log(f"   act + best gemm = {best['act'][1] + best['gemm'][1]:.2f} us (two graphs' sum)")
        else:
            log(f"   {len(rows)} variants ran and matched their references")
    for f in failures:
        log("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
