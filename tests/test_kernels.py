"""INT8 kernels against float64 references, on both backends.

On a CPU machine (CI) the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it before
triton is imported) on tiny shapes that still have ragged M and N and several tiles; on a CUDA machine the
same tests run the compiled kernels on the GPU. Known interpreter quirk: its fp32->bf16 conversion
truncates, so bf16 outputs are compared with a bf16-ulp tolerance and the tight checks use fp32 outputs.
"""
import math
from dataclasses import replace
import os

import pytest
import torch
import torch.nn.functional as F

import convert_to_quant.kernels as K
from convert_to_quant.kernels import dispatch, launch, reference
from convert_to_quant.kernels.launch import GemmConfig
from convert_to_quant.quant_core.formats import FP16, Int8Blockwise, Int8Tensorwise, QuantizedWeight
from convert_to_quant.quant_core.hadamard import regular_hadamard, rotate_groups

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK = launch.triton_usable(DEV)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="triton unusable here"))]
M, KD, N = 37, 256, 80  # ragged M and N against the 32x32 interpreter tiles (and 64+ GPU tiles)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def act(m=M, k=KD, dtype=torch.bfloat16, seed=0):
    g = gen(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 6.0  # an outlier channel, like real activations
    return x.to(dtype).to(DEV)


def weight(n=N, k=KD, seed=1):
    return torch.randn(n, k, generator=gen(seed)) * 0.05


def to_dev(qw):
    return QuantizedWeight(qw.format, qw.params, qw.qdata.to(DEV), qw.scale.to(DEV) if qw.scale is not None else None,
                           qw.orig_dtype, qw.extra)


# ------------------------------------------------------------------------------------------------
# activation quantization
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_is_nearest_ties_to_even(backend, dtype):
    # absmax 127 makes the scale exactly 1.0, so q = round(x) and ties are visible
    vals = [127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, 2.75, -2.75, 126.5, -0.25, 1.25, 0.0, 4.5, -5.5]
    x = torch.tensor([vals, [-v for v in vals]], dtype=dtype, device=DEV)
    q, s = K.quantize_activations(x, backend=backend)
    assert s.shape == (2, 1) and s.dtype == torch.float32
    assert torch.equal(s.cpu(), torch.ones(2, 1))
    want = [127, 2, -2, 4, -4, 0, 0, 2, 3, -3, 126, 0, 1, 0, 4, -6]  # ties to even; never truncated
    assert q.cpu().tolist() == [want, [-v for v in want]]
    # the same per 16-column block (second block scaled by 0.5: scale 0.5, same integers)
    xb = torch.cat([x, x * 0.5], dim=1)
    qb, sb = K.quantize_activations(xb, block_k=16, backend=backend)
    assert torch.equal(sb.cpu(), torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    assert qb.cpu().tolist() == [want + want, [-v for v in want] * 2]


def _float64_quant(x, g, block_k):
    y = rotate_groups(x.double().cpu(), g) if g else x.double().cpu()
    m, k = y.shape
    yb = y.reshape(m, -1, block_k if block_k else k)
    s = yb.abs().amax(dim=2, keepdim=True) / 127
    return (yb / s).reshape(m, k), s.reshape(m, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g,block_k,k", [(0, 0, 272), (0, 32, 256), (16, 0, 256), (64, 0, 320), (256, 0, 512),
                                         (256, 64, 512), (1024, 0, 1024)])
def test_quantize_activations_matches_float64(backend, g, block_k, k):
    x = act(k=k, seed=g + block_k)
    q, s = K.quantize_activations(x, g, block_k, backend=backend)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.dtype == torch.float32
    v64, s64 = _float64_quant(x, g, block_k)
    assert s.shape == s64.shape
    assert torch.allclose(s.double().cpu(), s64, rtol=2e-6, atol=0)
    qi = q.cpu().long()
    assert qi.abs().max() <= 127
    diff = (qi - torch.round(v64).long()).abs()
    # integers equal the float64 rounding except within float32 noise of a .5 boundary
    near_tie = ((v64 - v64.floor()) - 0.5).abs() < 1e-3
    assert diff.max() <= 1 and not (diff.bool() & ~near_tie).any()
    # both backends give the same integers (rotation sums may differ in the last fp32 bit)
    qt, st = reference.quantize_activations(x, g, block_k)
    assert torch.allclose(s.cpu(), st.reshape(s.shape).cpu(), rtol=1e-6, atol=0)
    mism = (qi != qt.cpu().long()).sum().item()
    assert mism == 0 if g == 0 else mism <= max(2, q.numel() // 2000)


def test_h256_is_the_kronecker_product_of_h4_and_h64():
    """The identity ``act_quant_rot_kron_kernel`` relies on: core's regular H_256 = H_4 ⊗ H_64 (both
    normalized), H_64 symmetric (the kernel multiplies by it unchanged) and H_4 the matrix it hard-codes."""
    h4, h64, h256 = (regular_hadamard(g, device="cpu", dtype=torch.float64) for g in (4, 64, 256))
    assert torch.equal(torch.kron(h4, h64), h256)
    assert torch.equal(h64, h64.T)
    assert torch.equal(h4 * 2, torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]],
                                            dtype=torch.float64))


@pytest.mark.skipif(not TRITON_OK, reason="triton unusable here")
@pytest.mark.parametrize("m,k", [(37, 512), (5, 1024), (70, 768), (3, 4096), (9, 1280), (6, 3072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl,kernel", [(3, "act_quant_rot_dense_kernel"), (5, "act_quant_rot_kron_kernel")])
def test_dense_hadamard_activation_kernel_matches_float64(m, k, dtype, impl, kernel, monkeypatch):
    """convrot g = 256 through ``act_quant_rot_dense_kernel`` (H_256 as one dense matmul per group) and
    ``act_quant_rot_kron_kernel`` (H_4 ⊗ H_64: a dot against H_64 per quarter of the groups, then H_4 as
    signed sums), programs looping over row blocks (padded columns, ragged last blocks; for the kron kernel
    also rows as two power-of-two sets of groups: 768, 1280, 3072), in every config the kernel has for the
    shape (forced with ROT_IMPL 3 / 5, which the tuner otherwise weighs against the factored kernel): the
    float64 integers except within fp32 noise of a .5 boundary, the reference's scales, the factored
    kernel's integers but for a few ties, and a NaN row's NaN scale."""
    monkeypatch.setattr(launch, "_ACT_META", {})
    monkeypatch.setattr(launch, "ROT_IMPL", impl)
    names = []
    real = launch.launch_kernel
    monkeypatch.setattr(launch, "launch_kernel", lambda kern, *a, **kw: (names.append(kern.fn.__name__), real(kern, *a, **kw)))
    x = act(m=m, k=k, dtype=dtype, seed=k + m)
    x[min(2, m - 1), 7] = float("nan")
    bad = torch.zeros(m, dtype=torch.bool)
    bad[min(2, m - 1)] = True
    xs = x.clone()
    xs[bad] = 0
    v64, s64 = _float64_quant(xs, 256, 0)
    K.quantize_activations(x, 256, backend="triton")
    cfgs = [c for key, meta in launch._ACT_META.items() if key[1] == 256 for c in meta[8]]
    assert cfgs and all(c.rot_impl == impl for c in cfgs), [c.short() for c in cfgs]
    assert any(c.BK for c in cfgs) == (impl == 5 and k in (768, 1280, 3072)), [c.short() for c in cfgs]
    outs = []
    for cfg in cfgs:
        names.clear()
        monkeypatch.setattr(launch.TUNER, "pick", lambda key, cands, run, cfg=cfg: cfg)
        q, s = K.quantize_activations(x, 256, backend="triton")
        assert names and set(names) == {kernel}, names
        s, qi = s.reshape(-1).cpu(), q.cpu().long()
        assert bool(torch.isnan(s[bad]).all()), cfg.short()
        assert torch.allclose(s[~bad].double(), s64.reshape(-1)[~bad], rtol=2e-6, atol=0), cfg.short()
        diff = (qi[~bad] - torch.round(v64[~bad]).long()).abs()
        near_tie = ((v64[~bad] - v64[~bad].floor()) - 0.5).abs() < 1e-3
        assert diff.max() <= 1 and not (diff.bool() & ~near_tie).any(), cfg.short()
        outs.append((s, qi))
    monkeypatch.undo()
    monkeypatch.setattr(launch, "_ACT_META", {})
    monkeypatch.setattr(launch, "ROT_IMPL", 0)
    q0, s0 = K.quantize_activations(x, 256, backend="triton")
    for s, qi in outs:
        assert torch.allclose(s0.reshape(-1).cpu()[~bad], s[~bad], rtol=1e-6, atol=0)  # the absmax's last fp32 bit
        assert (q0.cpu().long()[~bad] != qi[~bad]).sum().item() <= max(2, qi.numel() // 2000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_activations_leading_dims_zero_rows_and_errors(backend):
    x = act(k=64).reshape(37, 1, 64)
    q, s = K.quantize_activations(x, 16, backend=backend)
    assert q.shape == (37, 1, 64) and s.shape == (37, 1, 1)
    q2, s2 = K.quantize_activations(x.reshape(37, 64), 16, backend=backend)
    assert torch.equal(q.reshape(37, 64), q2)
    zero = torch.zeros(3, 64, device=DEV)
    qz, sz = K.quantize_activations(zero, backend=backend)
    assert not qz.any()
    assert torch.equal(sz.cpu(), torch.full((3, 1), 1e-30))  # SCALE_MIN, never a division by zero
    with pytest.raises(K.KernelInputError, match="not divisible"):
        K.quantize_activations(x, 256, backend=backend)
    with pytest.raises(K.KernelInputError, match="16, 64, 256 or 1024"):
        K.quantize_activations(x, 32, backend=backend)


# ------------------------------------------------------------------------------------------------
# W8A8 (tensor / per-row / convrot)
# ------------------------------------------------------------------------------------------------
def _exact_w8a8(x, qw, bias, g):
    qa, sa = K.quantize_activations(x, g, backend="torch")
    out = (qa.double().cpu() @ qw.qdata.double().cpu().T) * sa.double().cpu() * qw.scale.double().cpu().reshape(1, -1)
    return out + (bias.double().cpu() if bias is not None else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling,g", [("row", 0), ("tensor", 0), ("row", 64), ("row", 256)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_w8a8_matches_float64(backend, scaling, g, with_bias):
    x = act()
    qw = to_dev(Int8Tensorwise.quantize(weight(), Int8Tensorwise.Params(scaling, bool(g), g or 256)))
    bias = (torch.randn(N, generator=gen(5)) * 0.1).to(torch.bfloat16).to(DEV) if with_bias else None
    y32 = K.int8_linear(x, qw.qdata, qw.scale, bias, convrot_groupsize=g, out_dtype=torch.float32, path="w8a8",
                        backend=backend)
    assert y32.shape == (M, N) and y32.dtype == torch.float32
    # exact integer math in float64 on the same quantized activations: only fp32 rounding remains
    assert rel(y32, _exact_w8a8(x, qw, bias, g)) < 1e-6
    # and the real thing: close to the float64 product with the dequantized weight (activation quant noise)
    ref64 = x.double().cpu() @ qw.dequantize().double().cpu().T + (bias.double().cpu() if with_bias else 0)
    assert rel(y32, ref64) < 2e-2
    y16 = K.int8_linear(x, qw.qdata, qw.scale, bias, convrot_groupsize=g, path="w8a8", backend=backend)
    assert y16.dtype == torch.bfloat16 and rel(y16, y32) < 6e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_w8a8_gemm_configs_persistent_and_uneven_k(backend):
    """Low-level GEMM: the persistent grid (fewer programs than tiles), K not a multiple of BK, fp16 out."""
    if backend == "torch":
        pytest.skip("launcher test")
    x = act(k=272)
    qw = to_dev(Int8Tensorwise.quantize(weight(k=272), Int8Tensorwise.Params("row")))
    qa, sa = K.quantize_activations(x)
    want = (qa.double().cpu() @ qw.qdata.double().cpu().T) * sa.double().cpu() * qw.scale.double().cpu().reshape(1, -1)
    base = launch._W8A8_CONFIGS["interp"][0] if DEV.type == "cpu" else GemmConfig(64, 64, 64, 4, 3)
    for cfg in (GemmConfig(base.BM, base.BN, base.BK, base.num_warps, base.num_stages, GROUP_M=2, persistent=True),
                base):
        out = launch.launch_int8_gemm(qa, sa.reshape(-1), qw.qdata, qw.scale.reshape(-1), None, torch.float32,
                                      configs=[cfg])
        assert rel(out, want) < 1e-6
    out16 = launch.launch_int8_gemm(qa, sa.reshape(-1), qw.qdata, qw.scale.reshape(-1), None, torch.float16)
    assert rel(out16, want) < 6e-3


def _card_configs_and_twins(table):
    """(GEMM configs with their unflattened twins, token counts) to check: on a GPU every config of the
    card's list, at M and at 300 tokens (several row tiles); on CPU the interpreter's config, persistent
    and not."""
    if DEV.type == "cpu":
        base = table["interp"][0]
        return launch._unflattened_twins([replace(base, persistent=True), base]), (M,)
    return launch._unflattened_twins(table.get(launch.arch_of(DEV), table["sm80"])), (M, 300)


def test_w8a8_gemm_lora_epilogue_every_config():
    """The W8A8 GEMM with a LoRA pair in its epilogue and without one, in every config the tuner may pick: the
    persistent tile loop flattened into the K loop and not (``launch._unflattened_twins``), several tiles per
    program, ragged M and N, K not a multiple of BK; fp32 output against float64. On an sm90 GPU every
    ``_W8A8_CONFIGS`` entry and its twin."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    k = 272
    qw = to_dev(Int8Tensorwise.quantize(weight(k=k, seed=91), Int8Tensorwise.Params("row")))
    r = 32
    up = (torch.randn(N, r, generator=gen(92)) * 0.5).to(DEV)
    bias = torch.randn(N, generator=gen(93)).to(DEV)
    cfgs, ms = _card_configs_and_twins(launch._W8A8_CONFIGS)
    assert any(c.persistent and not c.flatten for c in cfgs) and any(c.persistent and c.flatten for c in cfgs)
    import triton.runtime.errors
    tried, ran = set(), set()
    for m in ms:
        x = act(m=m, k=k, seed=90 + m)
        qa, sa = K.quantize_activations(x)
        h = (torch.randn(m, r, generator=gen(94)) * 0.3).to(DEV, torch.bfloat16)
        base = ((qa.double().cpu() @ qw.qdata.double().cpu().T) * sa.double().cpu().reshape(-1, 1)
                * qw.scale.double().cpu().reshape(1, -1) + bias.double().cpu())
        for lora in ((h, up.to(torch.bfloat16)), None):
            want = base + (h.double().cpu() @ up.to(torch.bfloat16).double().cpu().T if lora is not None else 0)
            for cfg in cfgs:
                if DEV.type == "cuda" and not launch._fits_gemm(cfg, m, N, k):
                    continue
                tried.add(cfg)
                try:
                    out = launch.launch_int8_gemm(qa, sa.reshape(-1), qw.qdata, qw.scale.reshape(-1), bias,
                                                  torch.float32, configs=[cfg], lora=lora)
                except triton.runtime.errors.OutOfResources:
                    # flattened big tiles plus the epilogue's operands can exceed shared memory: the tuner skips them
                    assert cfg.flatten, cfg.short()
                    continue
                assert rel(out, want) < 1e-5, (cfg.short(), m, lora is None)
                ran.add(cfg)
    assert all(c in ran for c in tried if not c.flatten) and any(not c.flatten for c in ran)


# ------------------------------------------------------------------------------------------------
# block-wise W8A8
# ------------------------------------------------------------------------------------------------
def _exact_blockwise(x, qb, bias, g):
    qa, sa = K.quantize_activations(x, 0, g, backend="torch")
    qa, sa = qa.double().cpu(), sa.double().cpu()
    qw, sw = qb.qdata.double().cpu(), qb.scale.double().cpu()
    out = torch.zeros(x.shape[0], qw.shape[0], dtype=torch.float64)
    wrow = sw.repeat_interleave(g, 0)[: qw.shape[0]]
    for kb in range(x.shape[1] // g):
        sl = slice(kb * g, (kb + 1) * g)
        out += (qa[:, sl] @ qw[:, sl].T) * sa[:, kb:kb + 1] * wrow[:, kb].reshape(1, -1)
    return out + (bias.double().cpu() if bias is not None else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g", [16, 32, 64])  # 16: not a Triton GEMM group (K step >= 32): the torch path
@pytest.mark.parametrize("with_bias", [True, False])
def test_blockwise_linear_matches_float64(backend, g, with_bias):
    x = act(seed=g)
    qb = to_dev(Int8Blockwise.quantize(weight(seed=g), Int8Blockwise.Params(g)))
    assert qb.scale.shape == (math.ceil(N / g), KD // g)
    bias = (torch.randn(N, generator=gen(7)) * 0.1).to(DEV) if with_bias else None
    y32 = K.int8_blockwise_linear(x, qb.qdata, qb.scale, bias, group_size=g, out_dtype=torch.float32, path="w8a8",
                                  backend=backend)
    assert rel(y32, _exact_blockwise(x, qb, bias, g)) < 1e-6
    ref64 = x.double().cpu() @ qb.dequantize().double().cpu().T + (bias.double().cpu() if with_bias else 0)
    assert rel(y32, ref64) < 2e-2
    y16 = K.int8_blockwise_linear(x, qb.qdata, qb.scale, bias, group_size=g, path="w8a8", backend=backend)
    assert y16.dtype == torch.bfloat16 and rel(y16, y32) < 6e-3


def test_blockwise_gemm_every_config_and_twin_with_and_without_lora():
    """The block-wise GEMM in every config the tuner may pick (on an sm90 GPU every ``_BLOCKWISE_CONFIGS``
    entry and the unflattened twin of the persistent one; the interpreter's config persistent or not on
    CPU), BK shrunk to the group as the launcher does, with and without a LoRA pair, against float64."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    import triton.runtime.errors
    g = 128 if DEV.type == "cuda" else 32
    k = 2 * g
    qb = to_dev(Int8Blockwise.quantize(weight(k=k, seed=95), Int8Blockwise.Params(g)))
    r = 16
    up = (torch.randn(N, r, generator=gen(96)) * 0.5).to(DEV, torch.bfloat16)
    cfgs, ms = _card_configs_and_twins(launch._BLOCKWISE_CONFIGS)
    cfgs = [replace(c, BK=launch._largest_pow2_divisor(g, c.BK)) for c in cfgs]
    tried, ran = set(), set()
    for m in ms:
        x = act(m=m, k=k, seed=97 + m)
        qa, sa = K.quantize_activations(x, 0, g)
        sa_km = sa.t().contiguous().t()  # K-block-major, as the linear passes it
        h = (torch.randn(m, r, generator=gen(98)) * 0.3).to(DEV, torch.bfloat16)
        base_want = reference.blockwise_int8_mm(qa.cpu(), sa.cpu(), qb.qdata.cpu(), qb.scale.cpu(), None, g,
                                                torch.float32).double()
        for lora in (None, (h, up)):
            want = base_want + (h.double().cpu() @ up.double().cpu().T if lora is not None else 0)
            for cfg in cfgs:
                if DEV.type == "cuda" and not launch._fits_gemm(cfg, m, N, k):
                    continue
                tried.add(cfg)
                try:
                    out = launch.launch_int8_gemm(qa, sa_km, qb.qdata, qb.scale, None, torch.float32, g,
                                                  configs=[cfg], lora=lora)
                except triton.runtime.errors.OutOfResources:
                    assert cfg.flatten, cfg.short()
                    continue
                assert rel(out, want) < 1e-5, (cfg.short(), m, lora is None)
                ran.add(cfg)
    assert all(c in ran for c in tried if not c.flatten) and any(c.persistent and not c.flatten for c in ran)


@pytest.mark.parametrize("magic", [True, False])
def test_blockwise_gemm_int_to_float_conversions_agree(magic):
    """The integer-add int32->fp32 conversion of the main loop is exact (|partial| < 2^22)."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    g = 32
    # extreme values: every partial product at its largest magnitude
    qa = torch.full((M, KD), 127, dtype=torch.int8, device=DEV)
    qa[1::2] = -127
    sa = torch.rand(KD // g, M, generator=gen(3)).to(DEV).t()  # K-block-major, as the linear passes it
    qw = torch.full((N, KD), -127, dtype=torch.int8, device=DEV)
    sw = torch.rand(math.ceil(N / g), KD // g, generator=gen(4)).to(DEV)
    want = reference.blockwise_int8_mm(qa.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), None, g, torch.float32)
    # BN = 64 > g: the weight scale varies inside a tile (the vector-scale branch)
    cfg = GemmConfig(32 if DEV.type == "cpu" else 64, 64, g, 4, 1 if DEV.type == "cpu" else 3, GROUP_M=2,
                     persistent=True, magic_cvt=magic)
    out = launch.launch_int8_gemm(qa, sa, qw, sw, None, torch.float32, g, configs=[cfg])
    assert rel(out, want) < 1e-6


# ------------------------------------------------------------------------------------------------
# W8A16 and the dequant path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["row", "tensor", "convrot", "block"])
def test_w8a16_and_dequant_paths_match_float64(backend, kind):
    x = act(dtype=torch.float32, seed=11)  # fp32 activations: nothing but fp32 rounding in the comparison
    w = weight(seed=12)
    bias = (torch.randn(N, generator=gen(13)) * 0.1).to(DEV)
    if kind == "block":
        qw = to_dev(Int8Blockwise.quantize(w, Int8Blockwise.Params(32)))
        fn = lambda p: K.int8_blockwise_linear(x, qw.qdata, qw.scale, bias, group_size=32, path=p,  # noqa: E731
                                               backend=backend)
    else:
        params = Int8Tensorwise.Params("tensor" if kind == "tensor" else "row", kind == "convrot", 64)
        qw = to_dev(Int8Tensorwise.quantize(w, params))
        g = 64 if kind == "convrot" else 0
        fn = lambda p: K.int8_linear(x, qw.qdata, qw.scale, bias, convrot_groupsize=g, path=p,  # noqa: E731
                                     backend=backend)
    ref64 = x.double().cpu() @ qw.dequantize().double().cpu().T + bias.double().cpu()
    for p in ("w8a16", "dequant"):
        y = fn(p)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert rel(y, ref64) < 1e-5, p
    # bf16 activations through W8A16: the weight tile is converted exactly, fp32 accumulation
    xb = x.to(torch.bfloat16)
    if kind == "block":
        yb = K.int8_blockwise_linear(xb, qw.qdata, qw.scale, None, group_size=32, path="w8a16", backend=backend,
                                     out_dtype=torch.float32)
    else:
        yb = K.int8_linear(xb, qw.qdata, qw.scale, None, convrot_groupsize=g, path="w8a16", backend=backend,
                           out_dtype=torch.float32)
    ref_b = xb.double().cpu() @ qw.dequantize().double().cpu().T
    assert rel(yb, ref_b) < (6e-3 if kind == "convrot" else 1e-5)  # convrot rounds rotated x to bf16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["row", "tensor", "convrot", "block"])
def test_dequantize_equals_format_dequantize(backend, kind):
    w = weight(seed=21)
    if kind == "block":
        qw = Int8Blockwise.quantize(w, Int8Blockwise.Params(32))
    else:
        qw = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("tensor" if kind == "tensor" else "row",
                                                               kind == "convrot", 16))
    want = qw.dequantize()
    got = K.dequantize(to_dev(qw), torch.float32, backend=backend)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel(got, want) < (1e-6 if kind == "convrot" else 1e-12)
    assert K.dequantize(to_dev(qw), torch.bfloat16, backend=backend).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# API: leading dims, QuantizedWeight dispatch, registry, paths, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_input(backend):
    qw = to_dev(Int8Tensorwise.quantize(weight(), Int8Tensorwise.Params("row")))
    x = act(m=2 * 3 * 5).reshape(2, 3, 5, KD)
    y = K.int8_linear(x, qw.qdata, qw.scale, backend=backend, path="w8a8")
    assert y.shape == (2, 3, 5, N)
    y2 = K.int8_linear(x.reshape(-1, KD), qw.qdata, qw.scale, backend=backend, path="w8a8")
    assert torch.equal(y.reshape(-1, N), y2)
    xt = act(m=KD, k=40).t()  # [40, KD] view with a non-unit last stride
    yt = K.int8_linear(xt, qw.qdata, qw.scale, backend=backend, path="w8a8")
    assert torch.equal(yt, K.int8_linear(xt.contiguous(), qw.qdata, qw.scale, backend=backend, path="w8a8"))
    assert K.int8_linear(x[:0], qw.qdata, qw.scale, backend=backend).shape == (0, 3, 5, N)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_linear_dispatches_on_format(backend):
    x = act()
    w = weight(seed=31)
    ref = x.double().cpu() @ w.double().T
    for fmt, params in ((Int8Tensorwise, Int8Tensorwise.Params("row")),
                        (Int8Tensorwise, Int8Tensorwise.Params("row", True, 256)),
                        (Int8Blockwise, Int8Blockwise.Params(64)), (FP16, FP16.Params())):
        qw = to_dev(fmt.quantize(w, params))
        y = K.quantized_linear(x, qw, backend=backend)
        assert y.dtype == x.dtype and y.shape == (M, N)
        assert rel(y, ref) < 3e-2, fmt.name
    bogus = QuantizedWeight("int4_magic", None, torch.zeros(4, 4, dtype=torch.int8), torch.ones(()))
    with pytest.raises(K.KernelFormatError, match="int4_magic"):
        K.quantized_linear(x, bogus)


def test_register_linear():
    calls = []

    def fake(x, qw, bias, path=None, backend=None):
        calls.append(path)
        return x.sum(-1, keepdim=True)

    K.register_linear("test_only_format", fake)
    try:
        with pytest.raises(ValueError, match="already registered"):
            K.register_linear("test_only_format", lambda *a, **k: None)
        qw = QuantizedWeight("test_only_format", None, torch.zeros(1, 4, dtype=torch.int8), torch.ones(()))
        x = torch.ones(2, 4)
        assert torch.equal(K.quantized_linear(x, qw, path="w8a16"), torch.full((2, 1), 4.0))
        assert calls == ["w8a16"] and "test_only_format" in K.registered_formats()
    finally:
        K._LINEAR_REGISTRY.pop("test_only_format", None)


def test_path_choice_table_env_and_errors(monkeypatch):
    assert K.choose_path("row", 100000, torch.device("cpu")) == "w8a8"
    if torch.cuda.is_available():
        for kind in ("row", "block"):
            for m in (1, 16, 1024, 4096):
                assert K.choose_path(kind, m, DEV) in ("w8a8", "w8a16", "dequant")
    x = act(dtype=torch.float32)
    qw = to_dev(Int8Tensorwise.quantize(weight(), Int8Tensorwise.Params("row")))
    forced = K.int8_linear(x, qw.qdata, qw.scale, path="w8a16", backend="torch")
    monkeypatch.setenv(dispatch.PATH_ENV, "w8a16")
    assert torch.equal(K.int8_linear(x, qw.qdata, qw.scale, backend="torch"), forced)
    assert not torch.equal(K.int8_linear(x, qw.qdata, qw.scale, backend="torch", path="w8a8"), forced)
    monkeypatch.setenv(dispatch.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="kernel path"):
        K.int8_linear(x, qw.qdata, qw.scale, backend="torch")
    monkeypatch.delenv(dispatch.PATH_ENV)
    monkeypatch.setenv(K.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="kernel backend"):
        K.int8_linear(x, qw.qdata, qw.scale)
    monkeypatch.setenv(K.BACKEND_ENV, "torch")
    assert torch.equal(K.int8_linear(x, qw.qdata, qw.scale, path="w8a16"), forced)
    if DEV.type == "cpu":  # never the interpreter unless asked for
        monkeypatch.delenv(K.BACKEND_ENV)
        assert K.resolve_backend(torch.device("cpu")) == "torch"


def test_bad_operands_are_clear_errors():
    x = act(dtype=torch.float32)
    qw = Int8Tensorwise.quantize(weight(), Int8Tensorwise.Params("row"))
    q, s = qw.qdata.to(DEV), qw.scale.to(DEV)
    with pytest.raises(K.KernelInputError, match="expects 256"):
        K.int8_linear(x[:, :128], q, s)
    with pytest.raises(K.KernelInputError, match="weight_scale"):
        K.int8_linear(x, q, s[:10])
    with pytest.raises(K.KernelInputError, match="int8"):
        K.int8_linear(x, q.float(), s)
    with pytest.raises(K.KernelInputError, match="bias"):
        K.int8_linear(x, q, s, torch.zeros(3, device=DEV))
    with pytest.raises(K.KernelInputError, match="convrot"):
        K.int8_linear(x, q, s, convrot_groupsize=48)
    with pytest.raises(K.KernelInputError, match="activations"):
        K.int8_linear(x.to(torch.int32), q, s)
    with pytest.raises(K.KernelInputError, match="out_dtype"):
        K.int8_linear(x, q, s, out_dtype=torch.int32)
    with pytest.raises(K.KernelInputError, match=r"shape \[2, 4\]"):
        K.int8_blockwise_linear(x, q, torch.ones(2, 2, device=DEV), group_size=64)
    with pytest.raises(K.KernelInputError, match="group_size"):
        K.int8_blockwise_linear(x, q, torch.ones(2, 2, device=DEV), group_size=24)


# ------------------------------------------------------------------------------------------------
# comfy-kitchen agreement (stock ComfyUI's INT8 path on the same weights)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [0, 256])
def test_agrees_with_comfy_kitchen_int8_linear(g):
    ck = pytest.importorskip("comfy_kitchen")
    x = act(dtype=torch.float32, seed=41).cpu()
    qw = Int8Tensorwise.quantize(weight(seed=42), Int8Tensorwise.Params("row", bool(g), g or 256))
    ours = K.int8_linear(x, qw.qdata, qw.scale, convrot_groupsize=g, backend="torch", path="w8a8")
    theirs = ck.int8_linear(x, qw.qdata, qw.scale.reshape(-1), None, out_dtype=torch.float32, convrot=bool(g),
                            convrot_groupsize=g or 256)
    # same algorithm (per-token int8 activations); both within activation-quant noise of each other
    assert rel(ours, theirs) < 1e-2
    ref64 = x.double() @ qw.dequantize().double().T
    assert abs(rel(ours, ref64) - rel(theirs, ref64)) < 5e-3


# ------------------------------------------------------------------------------------------------
# custom ops and torch.compile
# ------------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    x = torch.randn(5, 64)
    qw = Int8Tensorwise.quantize(torch.randn(32, 64), Int8Tensorwise.Params("row", True, 16))
    qb = Int8Blockwise.quantize(torch.randn(32, 64), Int8Blockwise.Params(32))
    ops = torch.ops.convert_to_quant
    cases = [
        (ops.quantize_activations.default, (x, 16, 0, "torch")),
        (ops.quantize_activations.default, (x, 0, 32, "torch")),
        (ops.int8_linear.default, (x, qw.qdata, qw.scale.reshape(-1), torch.randn(32), 16, torch.float32, "", "torch")),
        (ops.int8_linear.default, (x, qw.qdata, qw.scale.reshape(-1), None, 16, torch.bfloat16, "w8a16", "torch")),
        (ops.int8_blockwise_linear.default, (x, qb.qdata, qb.scale, None, 32, torch.float32, "", "torch")),
        (ops.int8_linear.default, (x, qw.qdata, qw.scale.reshape(-1), None, 16, torch.float32, "w8a8", "torch",
                                   torch.randn(5, 16), torch.randn(32, 16))),
        (ops.int8_blockwise_linear.default, (x, qb.qdata, qb.scale, None, 32, torch.float32, "", "torch",
                                             torch.randn(5, 32), torch.randn(32, 32))),
        (ops.dequantize.default, (qw.qdata, qw.scale.reshape(-1), 0, 16, torch.float16, "torch")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class _TinyQuantMLP(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.up = to_dev(Int8Tensorwise.quantize(weight(n=128, k=64, seed=51), Int8Tensorwise.Params("row", True, 64)))
        self.down = to_dev(Int8Blockwise.quantize(weight(n=64, k=128, seed=52), Int8Blockwise.Params(32)))
        self.bias = torch.randn(128, generator=gen(53)).to(DEV)
        self.lora_down = (torch.randn(16, 64, generator=gen(57)) * 0.1).to(DEV)
        self.lora_up = (torch.randn(128, 16, generator=gen(58)) * 0.1).to(DEV)

    def forward(self, x):
        d, u = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        lora = (x @ d.t(), u)  # a LoRA side path on the first layer (the GEMM epilogue on the GPU)
        h = F.gelu(K.quantized_linear(x, self.up, self.bias, backend=self.backend, lora=lora))
        qa, sa = K.quantize_activations(h, 0, 32, backend=self.backend)
        return K.quantized_linear(h, self.down, backend=self.backend) + sa.sum()


def test_torch_compile_fullgraph_cpu():
    m = _TinyQuantMLP("torch")
    x = torch.randn(2, 9, 64, generator=gen(54)).to(DEV)
    eager = m(x)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), eager)
    x2 = torch.randn(3, 5, 64, generator=gen(55)).to(DEV)  # new token count: no recompile break
    assert torch.equal(compiled(x2), m(x2))


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu_inductor():
    m = _TinyQuantMLP(None)
    x = torch.randn(2, 300, 64, generator=gen(56)).to(DEV, torch.bfloat16)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)
    assert torch.allclose(compiled(x).float(), eager.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300, 4100])
def test_gpu_tuned_kernels_on_larger_shapes(m):
    """The tuned (TMA on Hopper) configs on GPU-sized operands, every path, against float64."""
    k, n = 1024, 784
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    for qw in (Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")),
               Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 1024)),
               Int8Blockwise.quantize(w, Int8Blockwise.Params(128))):
        qw = to_dev(qw)
        ref = x.double().cpu() @ qw.dequantize().double().cpu().T + bias.double().cpu()
        for p in ("w8a8", "w8a16", "dequant", None):
            y = K.quantized_linear(x, qw, bias, path=p)
            assert rel(y, ref) < (2e-2 if p in ("w8a8", None) else 6e-3), (qw.format, p)


@pytest.mark.parametrize("group", [0, 32])
def test_w8a16_split_k_matches_float64(group):
    """Split-K W8A16 (small-M configs): K ranges per program, uneven last split, fp32 atomics."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    x = act(m=5, dtype=torch.float32, seed=61)
    w = weight(seed=62)
    qw = to_dev(Int8Blockwise.quantize(w, Int8Blockwise.Params(32)) if group
                else Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")))
    bias = torch.randn(N, generator=gen(63)).to(DEV)
    ref64 = x.double().cpu() @ qw.dequantize().double().cpu().T + bias.double().cpu()
    for split in (3, 8):  # 256/32 = 8 K steps: 3 splits leave the last one partly past K
        for out_dtype in (torch.float32, torch.bfloat16):
            cfg = GemmConfig(16, 32, 32, 4, 1 if DEV.type == "cpu" else 3, GROUP_M=2, split_k=split)
            y = launch.launch_w8a16(x, qw.qdata, qw.scale if group else qw.scale.reshape(-1), bias, group, out_dtype,
                                    configs=[cfg])
            assert y.dtype == out_dtype
            assert rel(y, ref64) < (1e-5 if out_dtype == torch.float32 else 6e-3)


def _swap_configs(every: bool = False, group: int = 0):
    """The swapped W8A16 kernel's configs to check: a small one the interpreter runs, and on an sm90
    GPU one tuned candidate (``every``: all of them; they compile to wgmma with the weight tile in
    registers). Block-wise: BK shrunk to divide the group, as the launcher does."""
    cfgs = [GemmConfig(16, 32, 32, 4, 1 if DEV.type == "cpu" else 3, GROUP_M=2, swap=True)]
    if DEV.type == "cuda" and launch.arch_of(DEV) == "sm90":
        tuned = [c for cs in launch._W8A16_SWAP_SM90.values() for c in cs]
        cfgs += tuned if every else tuned[:1]
    if group:
        cfgs = [replace(c, BK=launch._largest_pow2_divisor(group, c.BK, 16)) for c in cfgs]
    return list(dict.fromkeys(cfgs))


def _w8a16_case(kind, seed):
    """(K, weight on DEV, group, scale as the launchers take it, bias, LoRA rank, up) for a W8A16 kernel test:
    K 200 (not a multiple of the tiles) or 256 for block-wise groups of 32."""
    k = 256 if kind == "block" else 200
    w = weight(k=k, seed=seed)
    qw = to_dev(Int8Blockwise.quantize(w, Int8Blockwise.Params(32)) if kind == "block"
                else Int8Tensorwise.quantize(w, Int8Tensorwise.Params(kind)))
    group = 32 if kind == "block" else 0
    r = 16
    return (k, qw, group, qw.scale if group else qw.scale.reshape(-1), torch.randn(N, generator=gen(seed + 1)).to(DEV),
            r, (torch.randn(N, r, generator=gen(seed + 2)) * 0.5).to(DEV))


def _check_w8a16_bias_lora(cfg, x, qw, scale, group, deq, bias, h, up):
    """``launch_w8a16`` with ``cfg``, without and with bias and a LoRA pair, fp32 out, against float64."""
    for b in (None, bias):
        for lora in (None, (h, up)):
            ref = x.double().cpu() @ deq.T
            if b is not None:
                ref = ref + b.double().cpu()
            if lora is not None:
                ref = ref + h.double().cpu() @ up.double().cpu().T
            y = launch.launch_w8a16(x, qw.qdata, scale, b, group, torch.float32, configs=[cfg], lora=lora)
            assert y.shape == (x.shape[0], N) and rel(y, ref) < 1e-5, (cfg.short(), x.shape[0], b is None,
                                                                         lora is None)


@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
def test_w8a16_swapped_kernel_matches_float64(kind):
    """w8a16_swap_kernel (Cᵀ = dequant(W) · xᵀ, the weight as the MMA's first operand): every scale
    mode, bias or not, a LoRA pair in its epilogue, ragged M and N, K not a multiple of BK (block-wise
    K must be), fp32 and bf16 outputs, against float64; and the auto path's tuner may pick it."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    k, qw, group, scale, bias, r, up = _w8a16_case(kind, 71)
    for m in (1, 5, 37) + ((300,) if DEV.type == "cuda" else ()):  # several token tiles on a GPU
        x = act(m=m, k=k, dtype=torch.float32, seed=70 + m)
        h = (torch.randn(m, r, generator=gen(74)) * 0.3).to(DEV)
        deq = qw.dequantize().double().cpu()
        for cfg in _swap_configs(group=group):
            _check_w8a16_bias_lora(cfg, x, qw, scale, group, deq, bias, h, up)
        if kind == "row":  # every tuned candidate on one specialization (each compiles once)
            ref = x.double().cpu() @ deq.T + bias.double().cpu() + h.double().cpu() @ up.double().cpu().T
            for cfg in _swap_configs(every=True):
                y = launch.launch_w8a16(x, qw.qdata, scale, bias, 0, torch.float32, configs=[cfg], lora=(h, up))
                assert rel(y, ref) < 1e-5, (cfg.short(), m)
        xb = x.to(torch.bfloat16)
        for cfg in _swap_configs(group=group):
            yb = launch.launch_w8a16(xb, qw.qdata, scale, bias.to(torch.bfloat16), group, torch.bfloat16,
                                     configs=[cfg])
            refb = xb.double().cpu() @ deq.T + bias.to(torch.bfloat16).double().cpu()
            assert yb.dtype == torch.bfloat16 and rel(yb, refb) < 6e-3, cfg.short()


@pytest.mark.parametrize("kind", ["row", "tensor", "block"])
def test_w8a16_gemv_kernel_matches_float64(kind):
    """w8a16_gemv_kernel (1-4 tokens on CUDA cores): every scale mode, 1 to 4 tokens in buckets of 1, 2 and
    4, bias or not, a LoRA pair, ragged N, K not a multiple of BK (block-wise K must be), fp32 and bf16
    activations and outputs, against float64; on a GPU the tuner offers it for M <= 4."""
    if not TRITON_OK:
        pytest.skip("triton unusable here")
    k, qw, group, scale, bias, r, up = _w8a16_case(kind, 61)
    deq = qw.dequantize().double().cpu()
    for m in (1, 2, 3, 4):
        ms = launch.m_bucket(m)
        cfgs = [GemmConfig(ms, 16, 32 if group else 64, 4, 1, gemv=True), GemmConfig(ms, 8, 32, 4, 1, gemv=True)]
        if DEV.type == "cuda":
            cands = launch._w8a16_configs(launch.arch_of(DEV), m)
            assert any(c.gemv and c.BM == ms for c in cands)
        x = act(m=m, k=k, dtype=torch.float32, seed=60 + m)
        h = (torch.randn(m, r, generator=gen(64)) * 0.3).to(DEV)
        for cfg in cfgs:
            _check_w8a16_bias_lora(cfg, x, qw, scale, group, deq, bias, h, up)
            xb = x.to(torch.bfloat16)
            yb = launch.launch_w8a16(xb, qw.qdata, scale, bias.to(torch.bfloat16), group, torch.float32,
                                     configs=[cfg])
            refb = xb.double().cpu() @ deq.T + bias.to(torch.bfloat16).double().cpu()
            assert rel(yb, refb) < 1e-5, cfg.short()  # bf16 x int8 products are exact, fp32 sums
            yb16 = launch.launch_w8a16(xb, qw.qdata, scale, None, group, torch.bfloat16, configs=[cfg])
            assert yb16.dtype == torch.bfloat16 and rel(yb16, xb.double().cpu() @ deq.T) < 6e-3


# ------------------------------------------------------------------------------------------------
# the loader's per-layer call (PreparedLinear) and the direct launch of compiled kernels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["row", "tensor", "convrot", "block"])
def test_prepared_linear_equals_quantized_linear(backend, kind, monkeypatch):
    monkeypatch.setenv("CONVERT_TO_QUANT_KERNEL_BACKEND", backend)
    w = weight()
    qw = to_dev({"row": lambda: Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")),
                 "tensor": lambda: Int8Tensorwise.quantize(w, Int8Tensorwise.Params("tensor")),
                 "convrot": lambda: Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 64)),
                 "block": lambda: Int8Blockwise.quantize(w, Int8Blockwise.Params(32))}[kind]())
    bias = (torch.randn(N, generator=gen(5)) * 0.1).to(torch.bfloat16).to(DEV)
    run = K.prepare_linear(qw, DEV)
    x = act(dtype=torch.bfloat16).reshape(1, M, KD)
    for path in ("w8a8", "w8a16", "dequant"):
        monkeypatch.setenv(K.PATH_ENV, path)
        want = K.quantized_linear(x, qw, bias)
        got = run(x, bias)
        assert got.shape == (1, M, N) and got.dtype == torch.bfloat16
        assert torch.equal(got, want), path
    monkeypatch.delenv(K.PATH_ENV)
    ref = x.double().reshape(M, KD) @ qw.dequantize().double().cpu().to(DEV).T + bias.double()
    assert rel(run(x, bias).reshape(M, N), ref) < 3e-2
    # what PreparedLinear does not handle itself goes through quantized_linear's checks and moves
    assert torch.equal(run(x[0].float(), None), K.quantized_linear(x[0].float(), qw, None))
    with pytest.raises(K.KernelInputError, match="features"):
        run(torch.zeros(3, KD + 16, device=DEV))


def test_prepared_linear_passes_other_formats_through():
    w = weight()
    q16 = FP16.quantize(w, FP16.Params(), torch.float16)
    run = K.prepare_linear(q16)
    x = act(dtype=torch.float32)
    assert torch.equal(run(x.cpu().to(q16.qdata.device), None), K.quantized_linear(x.cpu(), q16, None))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 37, 256, 4100])
def test_fast_launch_equals_triton_launch(m, monkeypatch):
    """The compiled-kernel launcher called directly must give the bits Triton's own launcher gives, for
    every specialization it keys on: token counts, an unaligned activation view, output dtypes, bias."""
    w = weight(n=384, k=512)
    qrow = to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")))
    qrot = to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 256)))
    qblk = to_dev(Int8Blockwise.quantize(w, Int8Blockwise.Params(128)))
    bias = torch.randn(384, device=DEV, dtype=torch.bfloat16)
    base = torch.randn(m * 512 + 3, device=DEV, dtype=torch.bfloat16)
    xs = {"aligned": base[:m * 512].view(m, 512), "unaligned": base[3:].view(m, 512)}
    direct_before = launch.LAUNCH_STATS["direct"]
    calls = []
    for xname, x in xs.items():
        for path in ("w8a8", "w8a16", "dequant"):
            for q in (qrow, qrot, qblk):
                for b in (bias, None):
                    calls.append((xname, path, q, b))
    for xname, path, q, b in calls:
        x = xs[xname]
        monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "0")
        want = K.quantized_linear(x, q, b, path=path)
        monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "1")
        for _ in range(2):  # the first call may compile, the second surely takes the direct launch
            got = K.quantized_linear(x, q, b, path=path)
        torch.cuda.synchronize()
        if path == "w8a16" and m <= 64:  # split-K accumulates with atomics: last bits may differ
            assert rel(got, want) < 1e-5, (xname, path, q.params)
        else:
            assert torch.equal(got, want), (xname, path, q.params)
    assert launch.LAUNCH_STATS["direct"] - direct_before >= len(calls), "the direct launch path was not taken"


# ------------------------------------------------------------------------------------------------
# one-launch W8A8 for few tokens (activation quantization inside the GEMM)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not TRITON_OK, reason="triton unusable here")
@pytest.mark.parametrize("m", [1, 16, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_w8a8_equals_two_launches(m, dtype, monkeypatch):
    """The one-launch W8A8 gives the two-launch path's bits (same integers, scales, epilogue): per-row and
    tensor-wise weights, bias, a K that is not a multiple of the K tile, an outlier channel. With a LoRA
    pair the epilogue's small dot may sum in another order on another tile shape: equal to fp32 rounding."""
    monkeypatch.setenv("CONVERT_TO_QUANT_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "FUSED_ACT_MAX_M", 64)  # the kernel itself, also beyond the default bound
    monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "0")
    for k, scaling in ((KD, "row"), (KD + 16, "tensor")):
        qw = to_dev(Int8Tensorwise.quantize(weight(k=k), Int8Tensorwise.Params(scaling)))
        x = act(m=m, k=k, dtype=dtype)
        bias = (torch.randn(N, generator=gen(5)) * 0.1).to(dtype).to(DEV)
        lora = None
        if dtype != torch.float32:
            lora = ((torch.randn(m, 16, generator=gen(6))).to(dtype).to(DEV),
                    (torch.randn(N, 16, generator=gen(7)) * 0.1).to(dtype).to(DEV))
        for b in (bias, None):
            monkeypatch.setenv(dispatch.FUSED_ENV, "0")
            want = K.quantized_linear(x, qw, b, path="w8a8", lora=lora)
            monkeypatch.setenv(dispatch.FUSED_ENV, "1")
            got = K.quantized_linear(x, qw, b, path="w8a8", lora=lora)
            if lora is None:
                assert torch.equal(got, want), (k, scaling, b is None)
            else:
                assert rel(got, want) < 1e-5, (k, scaling, b is None)
                monkeypatch.setenv(dispatch.FUSED_ENV, "0")
                assert torch.equal(K.quantized_linear(x, qw, b, path="w8a8"), K.quantized_linear(x, qw, b, path="w8a8"))
                no_lora = K.quantized_linear(x, qw, b, path="w8a8")
                monkeypatch.setenv(dispatch.FUSED_ENV, "1")
                assert torch.equal(K.quantized_linear(x, qw, b, path="w8a8"), no_lora), (k, scaling, b is None)
        q, s = K.quantize_activations(x)
        ref = (q.double() * s.double()) @ qw.dequantize().double().to(DEV).t()
        assert rel(K.quantized_linear(x, qw, None, path="w8a8"), ref) < 6e-3


@pytest.mark.skipif(not TRITON_OK, reason="triton unusable here")
@pytest.mark.parametrize("m,k", [(17, KD), (37, KD + 16), (70, 1040)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_launch_w8a8_equals_two_launches(m, k, dtype, monkeypatch):
    """``w8a8_onelaunch_kernel`` (the programs quantize the rows, then multiply) gives the two-launch
    path's bits: per-row and tensor-wise weights, bias, K not a multiple of the K tile, K beyond one
    register chunk of a row (1040: two passes over each row), several row tiles, an outlier channel;
    its counters are left zeroed (a second call on the same workspace gives the same bits). With a
    LoRA pair, equal to fp32 rounding (the epilogue's dot may sum in another order on another tile)."""
    monkeypatch.setenv("CONVERT_TO_QUANT_KERNEL_BACKEND", "triton")
    for scaling in ("row", "tensor"):
        qw = to_dev(Int8Tensorwise.quantize(weight(k=k), Int8Tensorwise.Params(scaling)))
        x = act(m=m, k=k, dtype=dtype)
        bias = (torch.randn(N, generator=gen(5)) * 0.1).to(dtype).to(DEV)
        for b in (bias, None):
            monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "0")
            want = K.quantized_linear(x, qw, b, path="w8a8")
            monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "1")
            for _ in range(2):
                got = K.quantized_linear(x, qw, b, path="w8a8")
                assert torch.equal(got, want), (scaling, b is None)
        q, s = K.quantize_activations(x)
        ref = (q.double() * s.double()) @ qw.dequantize().double().to(DEV).t()
        assert rel(got, ref) < 6e-3
    if dtype != torch.float32:
        lora = ((torch.randn(m, 16, generator=gen(6))).to(dtype).to(DEV),
                (torch.randn(N, 16, generator=gen(7)) * 0.1).to(dtype).to(DEV))
        monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "0")
        want = K.quantized_linear(x, qw, bias, path="w8a8", lora=lora)
        monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "1")
        assert rel(K.quantized_linear(x, qw, bias, path="w8a8", lora=lora), want) < 1e-5
    sync = launch.zeroed_workspace(0, 0, 64) if DEV.type == "cuda" else None
    if sync is not None:
        torch.cuda.synchronize()
        assert not sync.any(), "the one-launch kernel left its counters set"


# ------------------------------------------------------------------------------------------------
# non-finite activations: a NaN / inf in a row makes that row's output non-finite, as F.linear's does
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["row", "row fused", "row one launch", "tensor", "convrot 64", "block 32",
                                     "row w8a16"])
def test_non_finite_activation_rows_give_non_finite_output_rows(backend, variant, monkeypatch):
    """The activation scale's absmax keeps NaN (``tl.max`` alone drops it, and the int8 cast of a NaN is
    some integer), so a NaN or inf anywhere in a row gives that output row NaN/inf -- never plausible
    finite numbers -- and the other rows keep their bits."""
    m = 37
    monkeypatch.setenv(dispatch.FUSED_ENV, "1" if variant == "row fused" else "0")
    monkeypatch.setenv(dispatch.ONELAUNCH_ENV, "1" if variant == "row one launch" else "0")
    if variant == "row fused":
        monkeypatch.setattr(dispatch, "FUSED_ACT_MAX_M", 64)
    kind, _, rest = variant.partition(" ")
    g = int(rest) if rest.isdigit() else 0
    path = "w8a16" if rest == "w8a16" else "w8a8"
    if kind == "block":
        qw = to_dev(Int8Blockwise.quantize(weight(), Int8Blockwise.Params(g)))
    else:
        qw = to_dev(Int8Tensorwise.quantize(weight(), Int8Tensorwise.Params("tensor" if kind == "tensor" else "row",
                                                                            bool(g), g or 256)))
    x = act(m=m)
    x[3, 17] = float("nan")
    x[5, 200] = float("inf")
    x[8, 0] = float("-inf")
    clean = x.clone()
    clean[[3, 5, 8]] = 0
    bad = torch.zeros(m, dtype=torch.bool)
    bad[[3, 5, 8]] = True

    def run(xx):
        y = K.quantized_linear(xx, qw, None, path=path, backend=backend)
        if kind != "block":
            y32 = K.int8_linear(xx, qw.qdata, qw.scale, None, convrot_groupsize=g, out_dtype=torch.float32,
                                path=path, backend=backend)
            assert torch.equal(~torch.isfinite(y32).all(dim=1), ~torch.isfinite(y).all(dim=1))
        return y.cpu()

    y, y_clean = run(x), run(clean)
    assert bool((~torch.isfinite(y[bad])).all()), "a non-finite input row gave finite outputs"
    assert bool(torch.isfinite(y[~bad]).all())
    assert torch.equal(y[~bad], y_clean[~bad])
    if kind != "block" and path == "w8a8":
        q, s = K.quantize_activations(x, convrot_groupsize=g, backend=backend)
        s = s.reshape(m, -1).cpu()
        assert bool(torch.isnan(s[3]).all()) and bool(torch.isinf(s[[5, 8]]).all())  # the absmax's NaN / inf
        assert bool(torch.isfinite(s[~bad]).all())


# ------------------------------------------------------------------------------------------------
# LoRA epilogue: y = int8 GEMM + h · upᵀ, the low-rank product added to the fp32 accumulator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["row", "block"])
@pytest.mark.parametrize("path", ["w8a8", "w8a16"])
def test_lora_epilogue_adds_the_low_rank_product(backend, kind, path, monkeypatch):
    monkeypatch.setenv("CONVERT_TO_QUANT_KERNEL_BACKEND", backend)
    w = weight()
    qw = to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")) if kind == "row"
                else Int8Blockwise.quantize(w, Int8Blockwise.Params(32)))
    x = act(dtype=torch.bfloat16)
    r = 32
    down = (torch.randn(r, KD, generator=gen(7)) * 0.05).to(torch.bfloat16).to(DEV)
    up = (torch.randn(N, r, generator=gen(8)) * 0.5).to(torch.bfloat16).to(DEV)
    bias = (torch.randn(N, generator=gen(9)) * 0.1).to(torch.bfloat16).to(DEV)
    h = x @ down.t()
    y = K.quantized_linear(x, qw, bias, path=path, lora=(h, up))
    base = K.quantized_linear(x, qw, bias, path=path).double()
    lora64 = h.double() @ up.double().t()
    assert lora64.norm() > 0.3 * base.norm()  # the side path is not negligible
    assert rel(y, base + lora64) < 6e-3  # one rounding of the sum to bf16 (base itself was rounded once)
    # float64 end to end: dequantized weight, exact activations (W8A8 adds the activation rounding)
    full = x.double() @ qw.dequantize().double().to(DEV).t() + bias.double() + lora64
    assert rel(y, full) < (3e-2 if path == "w8a8" else 6e-3)
    # the loader's call: the same bits as quantized_linear, leading dims kept
    run = K.prepare_linear(qw, DEV)
    got = run(x.reshape(1, M, KD), bias, path, None, (h.reshape(1, M, r), up))
    assert got.shape == (1, M, N) and torch.equal(got.reshape(M, N), y)
    with pytest.raises(K.KernelInputError, match="lora"):
        K.quantized_linear(x, qw, bias, path=path, lora=(h[:, :24], up[:, :24]))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 300, 4100])
def test_launch_plans_replay_the_same_bits(m, monkeypatch):
    """PreparedLinear's launch plans (the third call of a shape on replays the recorded launches with
    fresh pointers) give the bits of the normal path, for every format, path, output with and without
    bias, aligned and unaligned activations, and follow a path forced by the environment."""
    w = weight(n=384, k=512)
    qws = [to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"))),
           to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("tensor"))),
           to_dev(Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 256))),
           to_dev(Int8Blockwise.quantize(w, Int8Blockwise.Params(128)))]
    bias = torch.randn(384, device=DEV, dtype=torch.bfloat16)
    base = torch.randn(m * 512 + 3, device=DEV, dtype=torch.bfloat16)
    xs = [base[:m * 512].view(m, 512), base[3:].view(m, 512)]
    plans_before = launch.LAUNCH_STATS["plan"]
    replays = 0
    for q in qws:
        run = K.prepare_linear(q, DEV)
        for path in (None, "w8a8", "w8a16"):
            if path:
                monkeypatch.setenv(K.PATH_ENV, path)
            else:
                monkeypatch.delenv(K.PATH_ENV, raising=False)
            for x in xs:
                for b in (bias, None):
                    monkeypatch.setenv(launch.PLANS_ENV, "0")
                    want = run(x, b)
                    monkeypatch.delenv(launch.PLANS_ENV)
                    outs = [run(x, b) for _ in range(4)]  # compile, record + check, replay, replay
                    for got in outs:
                        assert torch.equal(got, want), (q.params, path, b is None)
                    replays += 2
                    # the same activations at new addresses (fresh pointers are substituted)
                    x2 = x.clone() * 1.5
                    assert torch.equal(run(x2, b), K.quantized_linear(x2, q, b))
                    replays += 1
    # with a LoRA pair: new h and a replaced up (re-attached LoRAs) are substituted, never baked in
    run = K.prepare_linear(qws[0], DEV)
    x = xs[0]
    for r in (16, 64):
        for trial in range(2):
            h = torch.randn(m, r, device=DEV, dtype=torch.bfloat16)
            up = torch.randn(384, r, device=DEV, dtype=torch.bfloat16) * (trial + 1)
            want = K.quantized_linear(x, qws[0], bias, lora=(h, up))
            for _ in range(4):
                assert torch.equal(run(x, bias, None, None, (h, up)), want), (r, trial)
            replays += 2
    torch.cuda.synchronize()
    assert launch.LAUNCH_STATS["plan"] - plans_before >= replays, "plans were not replayed"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["w8a8", None])
@pytest.mark.parametrize("m", [300, 200])  # 200: the one-launch W8A8 and its zeroed counters
def test_plan_workspace_and_fast_path_are_safe(path, m, monkeypatch):
    """Plans carve their temporaries from one workspace per (thread, device, stream): layers sharing it
    back to back without a sync, another stream, another thread and CUDA-graph capture (which
    allocates) all give the unplanned bits; the call-by-call fast path (a call exactly like a planned
    one) is taken and follows a changed environment; plans call triton 3.6's C launcher directly."""
    import threading
    if path:
        monkeypatch.setenv(K.PATH_ENV, path)
    k, n = 512, 384
    runs, wants = [], []
    xs = [torch.randn(m, k, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    for seed in (5, 6):
        q = to_dev(Int8Tensorwise.quantize(weight(n=n, k=k, seed=seed), Int8Tensorwise.Params("row")))
        runs.append(K.prepare_linear(q, DEV))
        monkeypatch.setenv(launch.PLANS_ENV, "0")
        wants.append([runs[-1](x, bias) for x in xs])
        monkeypatch.delenv(launch.PLANS_ENV)
    plans_before = launch.LAUNCH_STATS["plan"]
    for _ in range(3):  # compile, record + check, replay
        for r in runs:
            r(xs[0], bias)
    # back to back on one stream, two layers sharing the workspace, no sync in between
    outs = [(j, i, runs[j](xs[i], bias)) for _ in range(6) for j in range(2) for i in range(2)]
    for j, i, y in outs:
        assert torch.equal(y, wants[j][i]), (j, i)
    assert all(r.fast for r in runs), "the fast path was never registered"

    class NoSlowPath(dict):
        def get(self, *a):
            raise AssertionError("a call like a planned one took the checked path")
    saved = runs[0].plans
    runs[0].plans = NoSlowPath()
    assert torch.equal(runs[0](xs[1], bias), wants[0][1])
    runs[0].plans = saved
    assert launch.LAUNCH_STATS["plan"] - plans_before >= 24
    plan = next(p for p in runs[0].plans.values() if isinstance(p, launch.LaunchPlan))
    if plan.temps:  # W8A8: the quantized activations and their scales
        assert plan.ws_offsets is not None and plan.ws_cache is not None
    if launch._DIRECT_OK:
        assert any(entry[-1] for entry in plan.launches), "no launch took triton's C launcher directly"
    # 3-D activations (ComfyUI's [B, L, C]) take the fast path with their own shape
    y3 = runs[0](xs[1].view(1, m, k), bias)
    assert y3.shape == (1, m, n) and torch.equal(y3.view(m, n), wants[0][1])
    # another stream (its own workspace), interleaved with the default stream's calls
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = [runs[j](xs[1], bias) for j in range(2) for _ in range(3)]
    main = [runs[1 - j](xs[0], bias) for j in range(2) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(s)
    for t, y in enumerate(side):
        assert torch.equal(y, wants[t // 3][1])
    for t, y in enumerate(main):
        assert torch.equal(y, wants[1 - t // 3][0])
    # another thread (its own workspace) at the same time as this one
    got, errors = [], []

    def worker():
        try:
            for _ in range(20):
                got.append([runs[j](xs[1], bias) for j in range(2)])
            torch.cuda.synchronize()
        except Exception as e:  # reported below
            errors.append(e)
    th = threading.Thread(target=worker)
    th.start()
    mine = [[runs[j](xs[0], bias) for j in range(2)] for _ in range(20)]
    th.join()
    torch.cuda.synchronize()
    assert not errors, errors
    for pair in got:
        assert torch.equal(pair[0], wants[0][1]) and torch.equal(pair[1], wants[1][1])
    for pair in mine:
        assert torch.equal(pair[0], wants[0][0]) and torch.equal(pair[1], wants[1][0])
    # CUDA-graph capture: the planned call allocates its temporaries inside the graph
    static_x = xs[0].clone()
    g = torch.cuda.CUDAGraph()
    s2 = torch.cuda.Stream()
    s2.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s2):
        runs[0](static_x, bias)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s2):
            y_graph = runs[0](static_x, bias)
    torch.cuda.current_stream().wait_stream(s2)
    static_x.copy_(xs[1])
    g.replay()
    runs[1](xs[0], bias)  # eager work on the default stream's workspace in between
    torch.cuda.synchronize()
    assert torch.equal(y_graph, wants[0][1])
    # the environment is part of the fast key: a forced path is followed at once
    monkeypatch.setenv(K.PATH_ENV, "w8a16" if path == "w8a8" else "w8a8")
    monkeypatch.setenv(launch.PLANS_ENV, "0")
    want_other = runs[0](xs[0], bias)
    monkeypatch.delenv(launch.PLANS_ENV)
    assert torch.equal(runs[0](xs[0], bias), want_other)


def test_path_table_rules(monkeypatch):
    """The measured small-M rules (docs/KERNELS.md): W8A16 up to M = 16 for per-row / tensor-wise
    weights (W8A8 from 17: its small-tile GEMM beats the weight conversion), for block-wise weights up
    to M = 64 always and up to 256 for weights up to 16M entries; W8A8 beyond, and where nothing was
    measured."""
    monkeypatch.setattr(dispatch, "arch_of", lambda device: "sm90")
    cpu = torch.device("cpu")
    assert K.choose_path("row", 1, cpu) == "w8a16"
    assert K.choose_path("row", 16, cpu, 3072 * 3072) == "w8a16"
    assert K.choose_path("row", 17, cpu, 3072 * 3072) == "w8a8"
    assert K.choose_path("row", 64, cpu, 4096 * 10240) == "w8a8"
    assert K.choose_path("row", 256, cpu, 3072 * 3072) == "w8a8"
    assert K.choose_path("block", 64, cpu, 4096 * 10240) == "w8a16"
    assert K.choose_path("block", 256, cpu, 3072 * 3072) == "w8a16"
    assert K.choose_path("block", 256, cpu, 4096 * 10240) == "w8a8"
    assert K.choose_path("row", 512, cpu, 3072 * 3072) == "w8a8"  # GPU 17 vs 37 us on the H200
    assert K.choose_path("row", 512, cpu, 4096 * 10240) == "w8a8"
    assert K.choose_path("row", 512, cpu) == "w8a8"  # N*K unknown: the large-M rule
    assert K.choose_path("row", 513, cpu, 3072 * 3072) == "w8a8"
    assert K.choose_path("row", 4096, cpu, 3072 * 3072) == "w8a8"
    assert K.choose_path("row", 1, cpu, 3072 * 3072, torch.float32) == "w8a8"  # no fp32 tensor-core dot
    assert K.choose_path("row", 1, cpu, 3072 * 3072, torch.bfloat16) == "w8a16"
    monkeypatch.setattr(dispatch, "arch_of", lambda device: "sm75")
    assert K.choose_path("row", 1, cpu) == "w8a8"


# CPU / non-Triton fallback: the chunked dequant path (reference.dequant_linear) the runtime uses
# ------------------------------------------------------------------------------------------------
def _fallback_weight(kind, n=N, k=KD, seed=71):
    w = weight(n=n, k=k, seed=seed)
    if kind == "block":
        return Int8Blockwise.quantize(w, Int8Blockwise.Params(32)), 32, 0
    g = {"convrot64": 64, "convrot256": 256}.get(kind, 0)
    params = Int8Tensorwise.Params("tensor" if kind == "tensor" else "row", bool(g), g or 64)
    return Int8Tensorwise.quantize(w, params), 0, g


def _fallback_linear(x, qw, bias, path="dequant"):
    if qw.format == "int8_blockwise":
        return K.int8_blockwise_linear(x, qw.qdata, qw.scale, bias, group_size=qw.params.group_size, path=path,
                                       backend="torch")
    g = qw.params.convrot_groupsize if qw.params.convrot else 0
    return K.int8_linear(x, qw.qdata, qw.scale, bias, convrot_groupsize=g, path=path, backend="torch")


@pytest.mark.parametrize("kind", ["row", "tensor", "convrot64", "convrot256", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_mb", [None, "0.02"])  # 0.02 MiB = 20 fp32 rows of K=256: 80 rows -> 4+ chunks
def test_torch_dequant_path_matches_float64(monkeypatch, kind, dtype, chunk_mb):
    if chunk_mb:
        monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, chunk_mb)
    qw, group, g = _fallback_weight(kind)
    want_w = qw.dequantize().double()
    bias = torch.randn(N, generator=gen(72)) * 0.1
    for m in (M, 2 * N + 3):  # fewer tokens than rows (convrot: x is rotated) and more (each chunk un-rotated)
        x = act(m=m, dtype=dtype, seed=73).cpu().reshape(1, m, KD)
        y = _fallback_linear(x, qw, bias.to(dtype))
        assert y.dtype == dtype and y.shape == (1, m, N)
        y = y.reshape(m, N)
        x64 = x.reshape(m, KD).double()
        exact = x64 @ want_w.T + bias.to(dtype).double()
        # the weight as the rule rounds it once to x's dtype: what F.linear in that dtype multiplies
        w_rule = reference.dequantize_weight(qw.qdata, qw.scale, group, g, dtype).double()
        rule = x64 @ w_rule.T + bias.to(dtype).double()
        if dtype == torch.float32:
            assert rel(y, exact) < 2e-6, m
        else:
            eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
            assert rel(y, rule) < 2 * eps, m  # output rounding (and, convrot with few tokens, rotated x)
            assert rel(y, exact) < 3 * eps, m
        # the explicit W8A16 path (float emulation of the integer GEMM) computes the same product
        assert rel(_fallback_linear(x, qw, bias.to(dtype), "w8a16").reshape(m, N), exact) < 3 * 2.0 ** -8


@pytest.mark.parametrize("kind", ["row", "tensor", "convrot64", "convrot256", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_rows_chunks_follow_the_dequant_rule(kind, dtype):
    # N = 83: not a multiple of the 32-row tiles nor of the 10-row chunks (chunk edges inside tiles)
    qw, group, g = _fallback_weight(kind, n=83)
    ws = qw.scale.float()
    want = reference.dequantize_weight(qw.qdata, ws, group, g, dtype)  # q.float()*scale, un-rotated, cast once
    got = torch.empty_like(want)
    work = torch.empty(10, KD)
    for r0 in range(0, 83, 10):
        r1 = min(83, r0 + 10)
        reference.dequantize_rows_into(got[r0:r1], qw.qdata[r0:r1], ws, r0, group, g, work)
    if g >= 256:  # un-rotated through H_16 ⊗ H_16: the same matrix, fp32 sums in another order
        assert rel(got, want) < 1e-6 if dtype == torch.float32 else rel(got, want) < 2.0 ** -8
        assert rel(reference.rotate_fast(want.float(), g), reference.rotate(want.float(), g)) < 1e-6
    else:
        assert torch.equal(got, want)


def test_dequant_chunking_bounds_memory_and_keeps_the_result(monkeypatch):
    monkeypatch.setattr(reference, "K_CHUNK_MIN_RATIO", float("inf"))  # row chunks (K chunks: below)
    qw, _, _ = _fallback_weight("row", n=N)
    x = act(m=M, dtype=torch.float32, seed=74).cpu()
    bias = torch.randn(N, generator=gen(75))
    whole = _fallback_linear(x, qw, bias)  # default budget: one chunk of 80 rows
    calls = []
    real = reference.dequantize_rows_into

    def counting(out, q, *args):
        calls.append((out.shape[0], out.untyped_storage().nbytes()))
        return real(out, q, *args)

    monkeypatch.setattr(reference, "dequantize_rows_into", counting)
    monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, str(7 * KD * 4 / 2 ** 20))  # exactly 7 fp32 rows
    chunked = _fallback_linear(x, qw, bias)
    assert [r for r, _ in calls] == [7] * 11 + [3]  # 80 = 11 x 7 + 3
    assert max(b for _, b in calls) == 7 * KD * 4  # one reused buffer of one chunk, never the whole weight
    assert rel(chunked, whole) < 1e-6  # the same sums (BLAS may order them differently for narrow blocks)
    calls.clear()
    assert torch.equal(reference.dequant_linear(x, qw.qdata, qw.scale, bias, 0, 0, torch.float32,
                                                chunk_bytes=7 * KD * 4), chunked)
    assert [r for r, _ in calls] == [7] * 11 + [3]
    # one row per chunk still works (the budget is smaller than one row)
    assert rel(reference.dequant_linear(x, qw.qdata, qw.scale, bias, 0, 0, torch.float32, chunk_bytes=1),
               whole) < 1e-6
    for bad in ("0", "-1", "lots", "inf"):
        monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, bad)
        with pytest.raises(ValueError, match=reference.DEQUANT_CHUNK_ENV):
            _fallback_linear(x, qw, bias)


def test_runtime_path_without_triton(monkeypatch):
    monkeypatch.delenv(dispatch.PATH_ENV, raising=False)
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    cpu = torch.device("cpu")
    assert K.runtime_path(cpu) == "cpu" and K.runtime_path(cpu, "torch") == "cpu"
    assert K.runtime_path(torch.device("meta"), "torch") == "dequant"  # other devices without our kernels
    # auto itself keeps the W8A8 numerics on the torch backend (what quant_core measures)
    assert K.choose_path("row", 4096, cpu) == "w8a8"
    if launch.triton_usable(cpu):  # the interpreter, asked for explicitly: the measured table
        assert K.runtime_path(cpu, "triton") is None
    monkeypatch.setenv(dispatch.PATH_ENV, "w8a16")  # a forced path still wins
    assert K.runtime_path(cpu) is None
    monkeypatch.delenv(dispatch.PATH_ENV)
    qw, _, _ = _fallback_weight("convrot256")  # below CPU_INT8_MIN_NK: the "cpu" path dequantizes
    x = act(dtype=torch.bfloat16, seed=76).cpu().reshape(37, 1, KD)
    y = K.quantized_linear(x, qw, None, path=K.runtime_path(x.device))
    assert torch.equal(y, _fallback_linear(x, qw, None))
    # the Hadamard matrices are built once per (size, device, dtype)
    assert reference.hadamard(256, cpu) is reference.hadamard(256, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["row", "tensor", "convrot64", "convrot256", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_int8_gemm_for_large_layers(monkeypatch, kind, dtype):
    """The "cpu" runtime path: W8A8 through ``torch._int_mm`` for tensor-wise / per-row / convrot layers of
    at least ``CPU_INT8_MIN_NK`` weights on a CPU that multiplies int8 fast -- the torch backend's "w8a8"
    bits (convrot: its activations rotated by ``rotate_fast``, checked against float64), prepared and
    unprepared alike, NaN rows kept; block-wise, small layers and ``CONVERT_TO_QUANT_CPU_INT8=0`` take the
    dequant path's bits."""
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.delenv(dispatch.PATH_ENV, raising=False)
    monkeypatch.setenv(reference.CPU_INT8_ENV, "1")
    monkeypatch.delenv(reference.CPU_INT8_MIN_ENV, raising=False)
    n, k = 2048, 256  # 512K weights: the smallest layer that takes it (with the env's fixed size)
    assert n * k >= reference.CPU_INT8_MIN_NK
    qw, _, g = _fallback_weight(kind, n=n, k=k, seed=95)
    x = act(m=30, k=k, dtype=dtype, seed=96).cpu().reshape(3, 10, k)
    x[1, 4, 7] = float("nan")
    bias = (torch.randn(n, generator=gen(97)) * 0.1).to(dtype)
    prep = _prepared_cpu(qw)
    assert prep.fallback.int8 == (kind != "block")
    with torch.no_grad():
        y = prep(x, bias, "cpu")
        assert y.shape == (3, 10, n) and y.dtype == dtype
        assert torch.equal(y.isnan().any(-1), x.isnan().any(-1))  # exactly the NaN token's row
        assert torch.equal(K.quantized_linear(x, qw, bias, path="cpu").nan_to_num(), y.nan_to_num())  # unprepared
        ok = ~x.isnan().any(-1)
        if kind == "block":
            assert torch.equal(y.nan_to_num(), prep(x, bias, "dequant").nan_to_num())
        elif not g:
            assert torch.equal(y.nan_to_num(), _fallback_linear(x, qw, bias, path="w8a8").nan_to_num())
        ref64 = x.double() @ qw.dequantize().double().T + bias.double()
        assert rel(y[ok], ref64[ok]) < 2e-2
        if kind != "block":
            assert rel(y[ok], ref64[ok]) > 1e-4  # int8 activations, not the dequantized weight in float
        # below the size, or switched off: the dequant path
        monkeypatch.setenv(reference.CPU_INT8_ENV, "0")
        off = _prepared_cpu(qw)
        assert not off.fallback.int8
        assert torch.equal(off(x, bias, "cpu").nan_to_num(), off(x, bias, "dequant").nan_to_num())
        monkeypatch.setenv(reference.CPU_INT8_ENV, "1")
        small, _, _ = _fallback_weight(kind, n=n // 2 - 16, k=k, seed=98)
        ps = _prepared_cpu(small)
        assert not ps.fallback.int8
        assert torch.equal(ps(x, None, "cpu").nan_to_num(), ps(x, None, "dequant").nan_to_num())
    # activations that need a gradient take the dequant path (rounding has none): the gradient flows
    xg = x.nan_to_num().detach().requires_grad_()
    yg = prep(xg, bias, "cpu")
    with torch.no_grad():
        assert torch.equal(yg, prep(xg.detach(), bias, "dequant"))
    yg.float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    monkeypatch.setenv(reference.CPU_INT8_ENV, "yes")
    with pytest.raises(ValueError, match="CONVERT_TO_QUANT_CPU_INT8"):
        reference.cpu_int8_fast()


def test_cpu_int8_size_probe_and_envs(monkeypatch):
    """Which layers take the int8 GEMM on the "cpu" path: unset, a one-off probe picks a size of its ladder
    per process (or never); ``CONVERT_TO_QUANT_CPU_INT8=1`` takes ``CPU_INT8_MIN_NK``, ``0`` never;
    ``CONVERT_TO_QUANT_CPU_INT8_MIN`` sets the size (bad values refused, ``0`` still wins); each layer
    decides when it is prepared."""
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.delenv(reference.CPU_INT8_ENV, raising=False)
    monkeypatch.delenv(reference.CPU_INT8_MIN_ENV, raising=False)
    monkeypatch.setattr(reference, "_CPU_INT8_PROBE", {})
    sizes = {float(n * n) for n in reference.CPU_INT8_LADDER} | {float("inf")}
    got = reference.cpu_int8_min_nk()
    assert got in sizes
    ratios = reference._CPU_INT8_PROBE["ratios"]
    assert set(ratios) == set(reference.CPU_INT8_LADDER) and all(0 < r < 1e3 for r in ratios.values())
    # the size is the smallest from which every larger ladder size won
    won = [ratios[n] <= reference.CPU_INT8_WIN for n in reference.CPU_INT8_LADDER]
    expect = float("inf")
    for n, w in reversed(list(zip(reference.CPU_INT8_LADDER, won))):
        if not w:
            break
        expect = float(n * n)
    assert got == expect
    assert reference.cpu_int8_fast() == (got != float("inf"))
    calls = []
    monkeypatch.setattr(reference, "_probe_int8_sizes", lambda: calls.append(1) or 0.0)
    assert reference.cpu_int8_min_nk() == got and not calls  # decided once per process
    monkeypatch.setenv(reference.CPU_INT8_ENV, "1")
    assert reference.cpu_int8_min_nk() == reference.CPU_INT8_MIN_NK
    monkeypatch.setenv(reference.CPU_INT8_ENV, "0")
    assert reference.cpu_int8_min_nk() == float("inf") and not reference.cpu_int8_fast()
    monkeypatch.setenv(reference.CPU_INT8_MIN_ENV, "4096")
    assert reference.cpu_int8_min_nk() == float("inf")  # "0" wins
    monkeypatch.delenv(reference.CPU_INT8_ENV)
    assert reference.cpu_int8_min_nk() == 4096.0 and not calls
    cpu = torch.device("cpu")
    assert reference.cpu_int8_suits(cpu, 64, 64, 0) and not reference.cpu_int8_suits(cpu, 63, 64, 0)
    assert not reference.cpu_int8_suits(cpu, 64, 64, 32)  # block-wise: never
    assert not reference.cpu_int8_suits(torch.device("meta"), 64, 64, 0)
    qw, _, _ = _fallback_weight("row", n=64, k=64, seed=99)
    assert _prepared_cpu(qw).fallback.int8
    monkeypatch.setenv(reference.CPU_INT8_MIN_ENV, "4097")
    assert not _prepared_cpu(qw).fallback.int8
    for bad in ("-1", "1e6", "4k", "99999999999999999999", "\u0661\u0662"):
        monkeypatch.setenv(reference.CPU_INT8_MIN_ENV, bad)
        with pytest.raises(ValueError, match="CONVERT_TO_QUANT_CPU_INT8_MIN"):
            reference.cpu_int8_min_nk()


# the prepared CPU path (PreparedLinear -> reference.DequantLinear): scale views made once, per-thread scratch
def _prepared_cpu(qw):
    prep = K.prepare_linear(qw, torch.device("cpu"))
    assert prep.fallback is not None  # the torch dequant path, prepared
    return prep


@pytest.mark.parametrize("kind", ["row", "tensor", "convrot64", "convrot256", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_cpu_dequant_is_the_dequant_rule(monkeypatch, kind, dtype):
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.delenv(dispatch.PATH_ENV, raising=False)
    qw, group, g = _fallback_weight(kind)
    prep = _prepared_cpu(qw)
    bias = (torch.randn(N, generator=gen(81)) * 0.1).to(dtype)
    w_rule = reference.dequantize_weight(qw.qdata, qw.scale, group, g, dtype)  # rounded once to dtype
    for m in (M, 2 * N + 3):
        x = act(m=m, dtype=dtype, seed=82).cpu().reshape(1, m, KD)  # leading dims go to F.linear as they are
        with torch.no_grad():
            y = prep(x, bias, "dequant")
        assert y.dtype == dtype and y.shape == (1, m, N)
        if not g or m >= N and g < 256:  # the weight dequantized as dequantize_weight does, bit for bit
            assert torch.equal(y, F.linear(x, w_rule, bias)), m
        else:  # rotated x (M < N), or un-rotated through H_16 ⊗ H_16 (fp32 sums in another order)
            exact = x.reshape(m, KD).double() @ qw.dequantize().double().T + bias.double()
            tol = 2e-6 if dtype == torch.float32 else 3 * 2.0 ** -8
            assert rel(y.reshape(m, N), exact) < tol, m
        # the same result as the unprepared entry point (dispatch -> reference.dequant_linear)
        assert torch.equal(y, _fallback_linear(x, qw, bias)), m
        # out_dtype and a bias of another dtype are converted as quantized_linear does
        y32 = prep(x, bias.float(), "dequant", torch.float32)
        assert y32.dtype == torch.float32 and torch.equal(y32, y.float())


def test_prepared_cpu_scratch_is_reused_and_bounded(monkeypatch):
    monkeypatch.delenv(reference.DEQUANT_CHUNK_ENV, raising=False)
    reference.release_scratch()
    assert reference.scratch_bytes() == 0
    qw, _, _ = _fallback_weight("row")
    prep = _prepared_cpu(qw)
    x = act(m=M, dtype=torch.float32, seed=83).cpu()
    with torch.no_grad():
        y1 = prep(x, None, "dequant")
        buf = reference._SCRATCH.bufs["work"]
        assert reference.scratch_bytes() == N * KD * 4  # one fp32 copy of this (one-chunk) layer, no more
        y2 = prep(x, None, "dequant")
    assert reference._SCRATCH.bufs["work"] is buf  # reused, not allocated again
    assert torch.equal(y1, y2)
    # a smaller budget: the held scratch shrinks to it (never two generations, never above the budget)
    for rows, dtype, kind in ((7, torch.float32, "row"), (5, torch.bfloat16, "row"), (3, torch.bfloat16, "convrot256"),
                              (4, torch.float16, "block")):
        qk, group, g = _fallback_weight(kind)
        budget = rows * reference.dequant_row_bytes(KD, dtype, g)
        monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, str(budget / 2 ** 20))
        xk = act(m=2 * N + 3, dtype=dtype, seed=84).cpu()  # M > N: convrot un-rotates the weight rows
        with torch.no_grad():
            got = _prepared_cpu(qk)(xk, None, "dequant")
        assert reference.scratch_bytes() <= budget, (kind, dtype)
        assert all(t.numel() <= rows * KD for t in reference._SCRATCH.bufs.values())
        want = xk.double() @ qk.dequantize().double().T
        assert rel(got, want) < 3 * 2.0 ** -8, (kind, dtype)
    reference.release_scratch()
    assert reference.scratch_bytes() == 0


@pytest.mark.parametrize("kind", ["row", "tensor", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_cpu_lean_call_is_the_general_call(monkeypatch, kind, dtype):
    """The CPU call's lean paths (``PreparedLinear``'s first check, ``DequantLinear.hot``) give the general
    path's bits, and step aside whenever a condition of theirs fails: another layer took the scratch, the
    budget env changed, a bias of another dtype, x that needs grad, bad operands (which still get the
    general path's clear errors)."""
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.delenv(reference.DEQUANT_CHUNK_ENV, raising=False)
    reference.release_scratch()
    qw, group, _ = _fallback_weight(kind)
    prep = _prepared_cpu(qw)
    x = act(m=M, dtype=dtype, seed=91).cpu()
    bias = (torch.randn(N, generator=gen(92)) * 0.1).to(dtype)
    want = _fallback_linear(x, qw, bias)  # the unprepared entry point (dispatch -> dequant_linear)
    with torch.no_grad():
        assert torch.equal(prep(x, bias, "dequant"), want)
        assert prep.fallback.hot is not None and prep.fallback.hot[0] is dtype
        for _ in range(2):  # the hot path itself
            assert torch.equal(prep(x, bias, "dequant"), want)
        # another layer needs a larger scratch: the cached views are gone, the call takes the general path
        other, _, _ = _fallback_weight(kind, n=2 * N, seed=93)
        _prepared_cpu(other)(x, None, "dequant")
        assert reference._SCRATCH.views.get(prep.fallback.hot[2]) is None
        assert torch.equal(prep(x, bias, "dequant"), want)
        # a bias in another dtype is converted by the general path
        assert torch.equal(prep(x, bias.float() if dtype != torch.float32 else bias.double(), "dequant"), want)
        # a budget that forces chunks: the general path chunks (the hot entry is for one chunk)
        monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, str(7 * reference.dequant_row_bytes(KD, dtype) / 2 ** 20))
        assert rel(prep(x, bias, "dequant"), want) < 1e-6
        assert reference.scratch_bytes() <= 7 * reference.dequant_row_bytes(KD, dtype)
        monkeypatch.delenv(reference.DEQUANT_CHUNK_ENV)
        with pytest.raises(K.KernelInputError):
            prep(act(m=M, k=KD + 16, dtype=dtype).cpu(), bias, "dequant")
        with pytest.raises(K.KernelInputError):
            prep(x, bias[:-1], "dequant")
    xg = x.clone().requires_grad_(True)
    y = prep(xg, bias, "dequant")
    y.float().sum().backward()
    assert xg.grad is not None and torch.equal(y.detach(), want)
    reference.release_scratch()


def test_prepared_cpu_scratch_is_per_thread_and_kept_out_of_autograd():
    import threading
    qw, _, _ = _fallback_weight("row")
    prep = _prepared_cpu(qw)
    x = act(m=M, dtype=torch.float32, seed=85).cpu()
    reference.release_scratch()
    seen = {}

    def worker():
        with torch.no_grad():
            seen["y"] = prep(x, None, "dequant")
        seen["bytes"] = reference.scratch_bytes()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["bytes"] == N * KD * 4 and reference.scratch_bytes() == 0  # the other thread's own buffers
    # with autograd recording, F.linear keeps the weight for backward: it gets its own buffer each call
    xg = x.clone().requires_grad_(True)
    y = prep(xg, None, "dequant")
    assert reference.scratch_bytes() == 0
    y2 = prep(xg, None, "dequant")  # a second call must not overwrite the first one's saved weight
    (y.sum() + 2 * y2.sum()).backward()
    w = qw.dequantize().double()
    assert rel(xg.grad, 3 * torch.ones(M, N, dtype=torch.float64) @ w) < 1e-6
    assert torch.equal(seen["y"], y.detach())


def test_prepared_cpu_scratch_made_in_inference_mode_is_usable_outside_it():
    # ComfyUI samples under inference_mode, other callers under no_grad: the reused buffers serve both
    qw, _, _ = _fallback_weight("row")
    prep = _prepared_cpu(qw)
    x = act(m=M, dtype=torch.float32, seed=86).cpu()
    reference.release_scratch()
    with torch.inference_mode():
        y1 = prep(x, None, "dequant")
    with torch.no_grad():
        y2 = prep(x, None, "dequant")
    y3 = prep(x, None, "dequant")  # grad mode, x without grad: the scratch again
    assert torch.equal(y1, y2) and torch.equal(y2, y3)
    assert reference.scratch_bytes() == N * KD * 4


@pytest.mark.parametrize("rows", [10, 32, 70, 83])
def test_block_tile_scales_broadcast_over_chunk_edges(rows):
    # 83 rows in 32-row tiles: chunks that start mid-tile, cover whole tiles, and end in the partial last tile
    qw, group, _ = _fallback_weight("block", n=83)
    want = reference.dequantize_weight(qw.qdata, qw.scale, group, 0, torch.float32)
    got = torch.empty_like(want)
    for r0 in range(0, 83, rows):
        r1 = min(83, r0 + rows)
        reference.dequantize_rows_into(got[r0:r1], qw.qdata[r0:r1], qw.scale.float(), r0, group)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# CPU fallback: wide-input layers chunked along K (reference.DequantLinear._k_chunked)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["row", "tensor", "convrot64", "block"])
def test_dequant_k_chunks_for_wide_inputs(monkeypatch, kind):
    """K > K_CHUNK_MIN_RATIO · N in fp32: the weight is dequantized a block of columns at a time (multiples
    of the block-wise / convrot group) and the partial products are added into y; the result is
    x · dequant(W)ᵀ + bias against float64, the scratch never exceeds the budget, bf16 keeps row chunks."""
    n = 24
    assert KD > reference.K_CHUNK_MIN_RATIO * n
    qw, group, g = _fallback_weight(kind, n=n)
    want_w = qw.dequantize().double()
    bias = torch.randn(n, generator=gen(76)) * 0.1
    calls = []
    real = reference.dequantize_cols_into

    def counting(w, q, scale, c0, *args):
        calls.append((c0, w.shape[1], w.untyped_storage().nbytes()))
        return real(w, q, scale, c0, *args)

    monkeypatch.setattr(reference, "dequantize_cols_into", counting)
    budget = 6 * KD * 4 * (2 if g else 1)  # six fp32 rows of K per buffer (convrot: two): 6 * 256 / 24 = 64 columns
    monkeypatch.setenv(reference.DEQUANT_CHUNK_ENV, str(budget / 2 ** 20))
    for m, b in ((40, bias), (40, None), (5, bias)):  # convrot with 5 tokens rotates x instead
        x = act(m=m, dtype=torch.float32, seed=77).cpu()
        calls.clear()
        y = _fallback_linear(x, qw, b)
        exact = x.double() @ want_w.T + (b.double() if b is not None else 0)
        assert y.shape == (m, n) and rel(y, exact) < 2e-6, (kind, m)
        widths = [c for _, c, _ in calls]
        assert len(calls) > 1 and [c0 for c0, _, _ in calls] == [sum(widths[:i]) for i in range(len(widths))]
        assert sum(widths) == KD and all(c % max(group, g, 1) == 0 for c in widths)
        # 64 columns (six rows of K over 24 rows); convrot with 5 tokens rotates x and has no second buffer
        assert widths[0] == (128 if g and m < n else 64)
        assert sum({nb for _, _, nb in calls}) <= budget  # work (+ tmp): views of the one scratch
    # as wide as it is tall (K <= K_CHUNK_MIN_RATIO * N): row chunks
    qs, _, _ = _fallback_weight("row", n=KD)
    calls.clear()
    xs = act(m=40, dtype=torch.float32, seed=79).cpu()
    assert rel(_fallback_linear(xs, qs, None), xs.double() @ qs.dequantize().double().T) < 2e-6 and not calls
    # bf16 activations keep row chunks (one rounding of the sum), same product
    xb = act(m=40, dtype=torch.bfloat16, seed=78).cpu()
    calls.clear()
    yb = _fallback_linear(xb, qw, bias.to(torch.bfloat16))
    assert not calls and rel(yb, xb.double() @ want_w.T + bias.to(torch.bfloat16).double()) < 3 * 2.0 ** -8
