"""GPU check of --quip-checkpointed on a Flux-wide layer (3072x15360, 8192 calibration tokens): same integers?
peak VRAM above the inputs, seconds.  python3 benchmarks/quip_checkpointed.py  (DEV=cpu: a tiny smoke run)"""
import time
import torch
from convert_to_quant.quant_core.calibration import LayerStats
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer

import os
dev = torch.device(os.environ.get("DEV", "cuda"))
g = torch.Generator(device=dev).manual_seed(0)
out, n = (3072, 15360) if dev.type == "cuda" else (96, 512)
w = torch.distributions.StudentT(5.0).sample((out, n)).to(dev) * 0.02
x = torch.randn(8192, n, device=dev, generator=g)
x[:, :16] *= 20
h = x.T @ x
stats = LayerStats(name="l", hessian=h, absmax=x.abs().amax(0), mean=x.mean(0), n_tokens=8192, n_seen=8192)
del x
spec = make_spec(convrot=True)
res = {}
for name, o in (("plain", {}), ("checkpointed", {"quip_checkpointed": True})):
    get_optimizer("quip")(w, spec, LayerContext(base="l", stats=stats, options=o, device=dev))  # warm-up
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    r = get_optimizer("quip")(w, spec, LayerContext(base="l", stats=stats, options=o, device=dev))
    sync()
    res[name] = r
    peak = ((torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0) - base) / 2**30
    print(f"{name:13} {time.perf_counter() - t0:6.2f} s  peak VRAM above inputs {peak:6.2f} GiB"
          f"  output SQNR {r.info['output_sqnr_db']:.3f} dB  factored on {r.info.get('hessian_factored_on', 'cuda')}")
a, b = res["plain"].qw.qdata, res["checkpointed"].qw.qdata
print(f"integers equal: {torch.equal(a, b)}; differing: {int((a != b).sum())} of {a.numel()}; scales equal: {torch.equal(res['plain'].qw.scale, res['checkpointed'].qw.scale)}")
