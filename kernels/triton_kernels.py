"""Triton kernels: activation quantization (+ convrot), W8A8 / block-wise W8A8 / W8A16 GEMMs, dequant.

Only the ``@triton.jit`` bodies and their launchers live here; which kernel runs for a call (path,
backend, tuned config) is decided in ``dispatch.py``. Numerics are documented in docs/KERNELS.md and
mirrored exactly by ``reference.py`` (the torch fallbacks).

Conventions shared by every kernel:
* int8 values are symmetric in [-127, 127]; scales are float32.
* Rounding is round-to-nearest, ties to even (like ``torch.round``), done with the 1.5·2^23 trick on
  values already clamped to ±127, so it is exact and identical on every backend.
* Divisions use ``div_rn`` (IEEE round-to-nearest) and quantization multiplies by the IEEE reciprocal
  of the scale, so scales and integers equal the torch reference's bit for bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

# 1.5 * 2**23: adding it to |v| <= 2**22 leaves an fp32 whose ulp is 1, so the hardware's
# round-to-nearest-even does the rounding; subtracting it back is exact.
RNE_MAGIC = 12582912.0
# Bit pattern of RNE_MAGIC: int32 n + this, reinterpreted as fp32, is RNE_MAGIC + n for |n| < 2**22
# (an integer add instead of the slow I2F conversion in the block-wise main loop).
I2F_MAGIC_BITS = 0x4B400000


# ------------------------------------------------------------------------------------------------
# activation quantization / rotation: one program per row, the whole row in registers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _dot_bf16x3(y, h):
    """fp32 y · h (h exact in bf16) on the tensor cores: y = hi + mid + lo exactly (3 bf16 pieces
    of 8 significant bits each), every partial product is exact in fp32."""
    hi = y.to(tl.bfloat16)
    r = y - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(hi, h)
    acc = tl.dot(mid, h, acc)
    return tl.dot(lo, h, acc)


@triton.jit
def _rotate_row(x, h1_ptr, h2_ptr, P: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr,
                STAGE1_DTYPE: tl.constexpr, STAGE1_IEEE: tl.constexpr, ROT_IMPL: tl.constexpr):
    """x · blockdiag(H_g)ᵀ for one padded row of length P, g = G1·G2, H_g = kron(H_G1, H_G2).

    Seeing a group as a G1×G2 matrix X (row-major), X·kron(A, B) = Aᵀ·X·B, so the rotation is one
    tensor-core matmul by H_G2 on the right (exact products: the Hadamard entries ±2^-k are exact
    in bf16/fp16) and, when G1 > 1, a matmul by H_G1 (symmetric) from the left of every group:
      ROT_IMPL 0: transpose the groups and multiply in fp32 ("ieee", CUDA cores);
      ROT_IMPL 1: a batched [groups, G1, G1] x [groups, G1, G2] fp32 dot, no transposes;
      ROT_IMPL 2: as 0 but on the tensor cores, y split exactly into three bf16 pieces.
    """
    xs = tl.reshape(x.to(STAGE1_DTYPE), (P // G2, G2))
    r2 = tl.arange(0, G2)
    h2 = tl.load(h2_ptr + r2[:, None] * G2 + r2[None, :]).to(STAGE1_DTYPE)
    if STAGE1_IEEE:
        y = tl.dot(xs, h2, input_precision="ieee")
    else:
        y = tl.dot(xs, h2)
    if G1 > 1:
        r1 = tl.arange(0, G1)
        h1 = tl.load(h1_ptr + r1[:, None] * G1 + r1[None, :])
        if ROT_IMPL == 1:
            y = tl.reshape(y, (P // (G1 * G2), G1, G2))
            hb = tl.broadcast_to(h1[None, :, :], (P // (G1 * G2), G1, G1))
            y = tl.dot(hb, y, input_precision="ieee")
        else:
            y = tl.reshape(y, (P // (G1 * G2), G1, G2))
            y = tl.permute(y, (0, 2, 1))
            y = tl.reshape(y, (P // G1, G1))
            if ROT_IMPL == 2:
                y = _dot_bf16x3(y, h1.to(tl.bfloat16))
            else:
                y = tl.dot(y, h1, input_precision="ieee")
            y = tl.reshape(y, (P // (G1 * G2), G2, G1))
            y = tl.permute(y, (0, 2, 1))
    return tl.reshape(y, (P,))


@triton.jit
def _max_nan(a, b):
    """max that keeps NaN: a NaN in a row must give that row a NaN scale (so a NaN output, as torch's
    amax and clamp give), where ``tl.max`` / ``tl.maximum`` default to dropping it."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absmax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN if any element is NaN (inf if any is inf)."""
    return tl.reduce(tl.abs(x), axis, _max_nan)


@triton.jit
def _act_scale(amax):
    """The activation scale of the module doc: max(absmax / 127, 1e-30), NaN kept."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), 1e-30, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_clamp_int8(v):
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return ((v + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit(do_not_specialize=["M"])
def act_quant_kernel(x_ptr, out_ptr, s_ptr, h1_ptr, h2_ptr, rowscale_ptr, K, stride_xm, M,
                     P: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, BLOCK_Q: tl.constexpr,
                     SCALE_K_MAJOR: tl.constexpr, MODE: tl.constexpr, STAGE1_DTYPE: tl.constexpr,
                     STAGE1_IEEE: tl.constexpr, ROT_IMPL: tl.constexpr, HAS_ROWSCALE: tl.constexpr):
    """MODE 0: quantize a row to int8 with one fp32 scale per row (BLOCK_Q == 0) or per BLOCK_Q
    columns (scales [M, K/BLOCK_Q], or [K/BLOCK_Q, M] if SCALE_K_MAJOR); G2 > 0 rotates first
    (convrot). MODE 1: write the rotated row (times an optional per-row scale, used to dequantize
    convrot weights) in ``out_ptr``'s dtype. Output rows are contiguous (stride K).

    scale = max(absmax / 127, 1e-30); q = round_half_even(clamp(y * (1 / scale), ±127)), with the
    reciprocal and the product each rounded once (IEEE), as the torch reference computes them.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, P)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0)
    if G2 > 0:
        y = _rotate_row(x, h1_ptr, h2_ptr, P, G1, G2, STAGE1_DTYPE, STAGE1_IEEE, ROT_IMPL)
    else:
        y = x.to(tl.float32)
    if MODE == 1:
        if HAS_ROWSCALE:
            y = y * tl.load(rowscale_ptr + row)
        tl.store(out_ptr + row * K + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if BLOCK_Q == 0:
            s = _act_scale(_absmax(y, 0))
            q = _round_clamp_int8(y * tl.math.div_rn(tl.full((), 1.0, tl.float32), s))
            tl.store(s_ptr + row, s)
        else:
            yb = tl.reshape(y, (P // BLOCK_Q, BLOCK_Q))
            s = _act_scale(_absmax(yb, 1))
            inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
            q = tl.reshape(_round_clamp_int8(yb * inv[:, None]), (P,))
            nb = tl.arange(0, P // BLOCK_Q)
            if SCALE_K_MAJOR:
                s_ptrs = s_ptr + nb * M + row
            else:
                s_ptrs = s_ptr + row * (K // BLOCK_Q) + nb
            tl.store(s_ptrs, s, mask=nb < K // BLOCK_Q)
        tl.store(out_ptr + row * K + offs, q, mask=mask)


@triton.jit
def _dense_rows(x_ptr, r0, M, K, stride_xm, offs_r, offs):
    """Rows [r0, r0 + ROWS) of x, padded with zeros to P columns (and rows past M)."""
    rows = r0 + offs_r
    rmask = rows < M
    return tl.load(x_ptr + tl.where(rmask, rows, 0).to(tl.int64)[:, None] * stride_xm + offs[None, :],
                   mask=rmask[:, None] & (offs[None, :] < K), other=0)


@triton.jit
def _kron_slice(x_ptr, r0, M, K, stride_xm, rloc, gcol, d, c: tl.constexpr):
    """Quarter ``c`` of every 256-group of rows [r0, r0 + ROWS): [groups, 64] (group g of the block: row
    rloc[g], columns gcol[g] + 64 c + d), zero past K and past M."""
    rows = r0 + rloc
    rmask = rows < M
    cols = gcol[:, None] + c * 64 + d[None, :]
    return tl.load(x_ptr + tl.where(rmask, rows, 0).to(tl.int64)[:, None] * stride_xm + cols,
                   mask=rmask[:, None] & (cols < K), other=0)


@triton.jit
def _kron_quarters(x_ptr, r0, M, K, stride_xm, rloc, gcol, d):
    """The four quarters of the block's groups (``_kron_slice`` c = 0..3)."""
    return (_kron_slice(x_ptr, r0, M, K, stride_xm, rloc, gcol, d, 0),
            _kron_slice(x_ptr, r0, M, K, stride_xm, rloc, gcol, d, 1),
            _kron_slice(x_ptr, r0, M, K, stride_xm, rloc, gcol, d, 2),
            _kron_slice(x_ptr, r0, M, K, stride_xm, rloc, gcol, d, 3))


@triton.jit
def _kron_store(out_ptr, y, inv_g, r0, M, K, rloc, gcol, d, a: tl.constexpr):
    rows = r0 + rloc
    rmask = rows < M
    cols = gcol[:, None] + a * 64 + d[None, :]
    tl.store(out_ptr + tl.where(rmask, rows, 0).to(tl.int64)[:, None] * K + cols,
             _round_clamp_int8(y * inv_g[:, None]), mask=rmask[:, None] & (cols < K))


@triton.jit
def _kron_dot(x, h, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(x.to(DOT_DTYPE), h, input_precision="ieee")
    return tl.dot(x.to(DOT_DTYPE), h)


@triton.jit
def _kron_rotate(x0, x1, x2, x3, h, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """The four output quarters of H_256 = H_4 ⊗ H_64 from the four input quarters [groups, 64]:
    Z_c = X_c · H_64 (tensor cores), then H_4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]] / 2
    as signed fp32 sums; and each group's absmax (NaN if any value is NaN)."""
    z0 = _kron_dot(x0, h, DOT_DTYPE, IEEE)
    z1 = _kron_dot(x1, h, DOT_DTYPE, IEEE)
    z2 = _kron_dot(x2, h, DOT_DTYPE, IEEE)
    z3 = _kron_dot(x3, h, DOT_DTYPE, IEEE)
    y0 = ((z0 + z1) + (z2 - z3)) * 0.5
    y1 = ((z0 + z1) - (z2 - z3)) * 0.5
    y2 = ((z0 - z1) + (z2 + z3)) * 0.5
    y3 = ((z2 + z3) - (z0 - z1)) * 0.5
    gmax = _max_nan(_max_nan(_absmax(y0, 1), _absmax(y1, 1)), _max_nan(_absmax(y2, 1), _absmax(y3, 1)))
    return y0, y1, y2, y3, gmax


@triton.jit
def _kron_store4(out_ptr, y0, y1, y2, y3, inv, r0, M, K, rloc, gcol, d, ROWS: tl.constexpr, GPR: tl.constexpr):
    inv_g = tl.reshape(tl.broadcast_to(inv[:, None], (ROWS, GPR)), (ROWS * GPR,))
    _kron_store(out_ptr, y0, inv_g, r0, M, K, rloc, gcol, d, 0)
    _kron_store(out_ptr, y1, inv_g, r0, M, K, rloc, gcol, d, 1)
    _kron_store(out_ptr, y2, inv_g, r0, M, K, rloc, gcol, d, 2)
    _kron_store(out_ptr, y3, inv_g, r0, M, K, rloc, gcol, d, 3)


@triton.jit(do_not_specialize=["M"])
def act_quant_rot_kron_kernel(x_ptr, out_ptr, s_ptr, h_ptr, K, stride_xm, M, P: tl.constexpr, P2: tl.constexpr,
                              SEG2: tl.constexpr, ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """``act_quant_kernel``'s MODE 0 for convrot g = 256 with H_256 = H_4 ⊗ H_64 (the regular Hadamard is
    a Kronecker power of H_4): a group's quarter c (64 values) is loaded as its own tensor X_c [groups, 64],
    Z_c = X_c · H_64 is one tensor-core dot each (exact bf16/fp16 operands, fp32 sums), and output
    quarter a is sum_c H_4[a, c] / 2 · Z_c -- signed fp32 sums of four tensors in the same layout, no
    reshapes. H_64 takes 8 KB of shared memory where H_256 takes 128 KB, so several programs share an SM
    (the dense kernel runs one). The fp32 sums run in another order than the dense and factored kernels'
    (integers equal but at .5 ties within fp32 noise). Programs loop over blocks of ROWS rows, loading the
    next block before they work on this one. A row's groups are columns [0, P) padded with zeros past K,
    and with SEG2 also [P, P + P2): two power-of-two sets of groups where one would pad more (12288 = 8192
    + 4096)."""
    GPR: tl.constexpr = P // 256
    GPR2: tl.constexpr = P2 // 256
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gi = tl.arange(0, ROWS * GPR)
    rloc = gi // GPR
    gcol = (gi % GPR) * 256
    gi2 = tl.arange(0, ROWS * GPR2)
    rloc2 = gi2 // GPR2
    gcol2 = P + (gi2 % GPR2) * 256
    d = tl.arange(0, 64)
    h = tl.load(h_ptr + d[:, None] * 64 + d[None, :]).to(DOT_DTYPE)  # H_64 is symmetric
    offs_r = tl.arange(0, ROWS)
    first = pid * ROWS
    x0, x1, x2, x3 = _kron_quarters(x_ptr, first, M, K, stride_xm, rloc, gcol, d)
    if SEG2:
        u0, u1, u2, u3 = _kron_quarters(x_ptr, first, M, K, stride_xm, rloc2, gcol2, d)
    for r0 in range(pid * ROWS, M, nprog * ROWS):
        rn = r0 + nprog * ROWS
        n0, n1, n2, n3 = _kron_quarters(x_ptr, rn, M, K, stride_xm, rloc, gcol, d)
        if SEG2:
            v0, v1, v2, v3 = _kron_quarters(x_ptr, rn, M, K, stride_xm, rloc2, gcol2, d)
        y0, y1, y2, y3, gmax = _kron_rotate(x0, x1, x2, x3, h, DOT_DTYPE, IEEE)
        amax = _absmax(tl.reshape(gmax, (ROWS, GPR)), 1)
        if SEG2:
            w0, w1, w2, w3, gmax2 = _kron_rotate(u0, u1, u2, u3, h, DOT_DTYPE, IEEE)
            amax = _max_nan(amax, _absmax(tl.reshape(gmax2, (ROWS, GPR2)), 1))
        sc = _act_scale(amax)
        inv = tl.math.div_rn(tl.full(sc.shape, 1.0, tl.float32), sc)
        rows = r0 + offs_r
        tl.store(s_ptr + rows, sc, mask=rows < M)
        _kron_store4(out_ptr, y0, y1, y2, y3, inv, r0, M, K, rloc, gcol, d, ROWS, GPR)
        if SEG2:
            _kron_store4(out_ptr, w0, w1, w2, w3, inv, r0, M, K, rloc2, gcol2, d, ROWS, GPR2)
            u0 = v0
            u1 = v1
            u2 = v2
            u3 = v3
        x0 = n0
        x1 = n1
        x2 = n2
        x3 = n3


@triton.jit(do_not_specialize=["M"])
def act_quant_rot_dense_kernel(x_ptr, out_ptr, s_ptr, h_ptr, K, stride_xm, M, P: tl.constexpr, G: tl.constexpr,
                               ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """``act_quant_kernel``'s MODE 0 for convrot with H_G as one dense tensor-core matmul per group
    (``_rotate_row`` factors it and transposes every group through shared memory; at G = 256 this
    does 8x the multiply-adds on the tensor cores instead). bf16/fp16 activations and H's entries
    ±2^-k are exact operands, so every product is exact and only the order of the fp32 sums differs
    from the factored kernel. Each program loads H once and loops over blocks of ROWS rows (padded
    to P columns: zero groups rotate to zeros), loading the next block before it works on this one."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_r = tl.arange(0, ROWS)
    offs = tl.arange(0, P)
    r = tl.arange(0, G)
    h = tl.load(h_ptr + r[:, None] * G + r[None, :]).to(DOT_DTYPE)
    x = _dense_rows(x_ptr, pid * ROWS, M, K, stride_xm, offs_r, offs)
    for r0 in range(pid * ROWS, M, nprog * ROWS):
        x_next = _dense_rows(x_ptr, r0 + nprog * ROWS, M, K, stride_xm, offs_r, offs)
        xs = tl.reshape(x.to(DOT_DTYPE), (ROWS * P // G, G))
        if IEEE:
            y = tl.dot(xs, h, input_precision="ieee")
        else:
            y = tl.dot(xs, h)
        y = tl.reshape(y, (ROWS, P))
        sc = _act_scale(_absmax(y, 1))
        q = _round_clamp_int8(y * tl.math.div_rn(tl.full(sc.shape, 1.0, tl.float32), sc)[:, None])
        rows = r0 + offs_r
        rmask = rows < M
        tl.store(s_ptr + rows, sc, mask=rmask)
        tl.store(out_ptr + tl.where(rmask, rows, 0).to(tl.int64)[:, None] * K + offs[None, :], q,
                 mask=rmask[:, None] & (offs[None, :] < K))
        x = x_next


# ------------------------------------------------------------------------------------------------
# int8 GEMMs. One kernel body, specialized by constexprs:
#   USE_TMA    - 0: raw pointer loads; 1: A and B come as host TensorDescriptors; 2: descriptors built
#                on the device from the raw pointers (Hopper; no per-launch host encoding, which
#                costs tens of microseconds in Triton 3.6 and dominates at a few thousand tokens).
#   BLOCKWISE  - per-K-block scales applied in the main loop (fp32 accumulation) instead of an
#                int32 accumulator scaled once in the epilogue.
#   persistent - the grid may be smaller than the tile count; programs stride over tiles in grouped
#                order (GROUP_M rows of tiles share B tiles in L2).
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_pid_n
    group = tile // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % gsize
    pid_n = (tile % width) // gsize
    return pid_m, pid_n


@triton.jit
def _int32_to_f32_exact(blk, MAGIC_CVT: tl.constexpr):
    if MAGIC_CVT:
        return (blk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return blk.to(tl.float32)


@triton.jit
def _lora_epilogue(out, lh_ptr, lu_ptr, rm_safe, rn_safe, LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr):
    """out[BM, BN] + h[rm, :R] · up[rn, :R]ᵀ in fp32: the low-rank (LoRA) side path of a linear, added
    before the output is rounded (h = x · downᵀ [M, R] and up [N, R] row-contiguous, R zero-padded)."""
    rr = tl.arange(0, LORA_R)
    h = tl.load(lh_ptr + rm_safe.to(tl.int64)[:, None] * LORA_R + rr[None, :])
    u = tl.load(lu_ptr + rn_safe.to(tl.int64)[:, None] * LORA_R + rr[None, :])
    if LORA_IEEE:
        return tl.dot(h.to(tl.float32), tl.trans(u.to(tl.float32)), out, input_precision="ieee")
    return tl.dot(h, tl.trans(u), out)


@triton.jit
def _rowwise_scales(acc, a_s, ws_ptr, rn_safe, WS_PER_ROW: tl.constexpr):
    """int32 accumulator -> fp32 times the per-token activation scales and the weight scale(s)."""
    out = acc.to(tl.float32) * a_s[:, None]
    if WS_PER_ROW:
        return out * tl.load(ws_ptr + rn_safe)[None, :]
    return out * tl.load(ws_ptr)


@triton.jit
def _store_tile(out, c_ptr, bias_ptr, lh_ptr, lu_ptr, rm, rn, rm_safe, rn_safe, M, N,
                LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The shared epilogue: + LoRA (fp32), + bias, one rounding to the output dtype, masked store."""
    if LORA_R > 0:
        out = _lora_epilogue(out, lh_ptr, lu_ptr, rm_safe, rn_safe, LORA_R, LORA_IEEE)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["M", "num_programs"])  # one compile serves every token count
def int8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr, M, N, K, num_programs,
                     LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr,
                     WS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCKWISE: tl.constexpr, GROUP_K: tl.constexpr, GROUP_N: tl.constexpr,
                     WS_TILE_SCALAR: tl.constexpr, MAGIC_CVT: tl.constexpr,
                     USE_TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN_K: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M,N] = epilogue(A[M,K] int8 · B[N,K]ᵀ int8); A, B, C row-contiguous (few arguments: the
    launch overhead of a Triton kernel grows with its argument count).

    Tensor-wise/per-row: acc int32 over all K, then C = (acc·a_s[m])·w_s[n] (+ bias) in fp32.
    Block-wise: for each BK slice in K block kb = k // GROUP_K,
        acc += f32(slice int32) · (a_s[kb, m] · w_s[n // GROUP_N, kb]),  C = acc (+ bias),
    with a_s stored K-block-major [K/G, M] (contiguous loads along M) and w_s [ceil(N/G), K/G].
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    rk = tl.arange(0, BK)
    if USE_TMA == 2:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    elif USE_TMA == 1:
        a_desc = a_ptr
        b_desc = b_ptr
    for tile in tl.range(pid, num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        # clamp instead of masking rows: out-of-range rows read row 0 and are dropped at the store
        rm_safe = tl.where(rm < M, rm, 0)
        rn_safe = tl.where(rn < N, rn, 0)
        if USE_TMA == 0:
            a_ptrs = a_ptr + rm_safe.to(tl.int64)[:, None] * K + rk[None, :]
            b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + rk[None, :]
        if BLOCKWISE:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        for ki in range(k_tiles):
            if USE_TMA > 0:
                a = a_desc.load([off_m, ki * BK])
                b = b_desc.load([off_n, ki * BK])
            else:
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                else:
                    kmask = rk[None, :] < K - ki * BK
                    a = tl.load(a_ptrs, mask=kmask, other=0)
                    b = tl.load(b_ptrs, mask=kmask, other=0)
                a_ptrs += BK
                b_ptrs += BK
            if BLOCKWISE:
                blk = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
                kb = (ki * BK) // GROUP_K
                a_s = tl.load(as_ptr + kb * M + rm_safe)
                if WS_TILE_SCALAR:
                    w_s = tl.load(ws_ptr + (off_n // GROUP_N) * (K // GROUP_K) + kb)
                    acc += _int32_to_f32_exact(blk, MAGIC_CVT) * (a_s * w_s)[:, None]
                else:
                    w_s = tl.load(ws_ptr + (rn_safe // GROUP_N) * (K // GROUP_K) + kb)
                    acc += _int32_to_f32_exact(blk, MAGIC_CVT) * (a_s[:, None] * w_s[None, :])
            else:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        if BLOCKWISE:
            out = acc
        else:
            out = _rowwise_scales(acc, tl.load(as_ptr + rm_safe), ws_ptr, rn_safe, WS_PER_ROW)
        _store_tile(out, c_ptr, bias_ptr, lh_ptr, lu_ptr, rm, rn, rm_safe, rn_safe, M, N,
                    LORA_R, LORA_IEEE, HAS_BIAS)


@triton.jit
def _fence_gpu(v):
    """A GPU-scope memory fence executed by every thread (``v``: any scalar, returned unchanged)."""
    return tl.inline_asm_elementwise("fence.acq_rel.gpu;\n mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit(do_not_specialize=["M", "producers"])
def w8a8_onelaunch_kernel(x_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr, q_ptr, s_ptr, sync_ptr,
                          M, N, K, stride_xm, producers,
                          LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr, WS_PER_ROW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FENCE: tl.constexpr,
                          QR: tl.constexpr, KC: tl.constexpr, MT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """W8A8 (per-token activations) in one launch: ``act_quant_kernel`` + ``int8_gemm_kernel`` bit for bit,
    with the activation quantization done once by the programs themselves.

    Each program takes a ticket (an atomic counter: tickets follow the order programs started). Tickets
    below ``producers`` first quantize chunks of QR rows into ``q_ptr`` [M, K] / ``s_ptr`` [M] and count
    them in their row tile's ready counter; then every program computes output tile number ``ticket``,
    after waiting for its row tile to be ready. Producers never wait before producing, and a ticket is
    only handed to a running program, so a waiting program's producers are running or done: no
    deadlock whatever the GPU schedules. The last program to finish zeroes the counters again.
    ``sync_ptr`` int32 [2 + MT] (ticket, done, ready per row tile) must be zero at launch."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    total = num_pid_m * num_pid_n
    t = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    # ---- phase 1: quantize rows (RNE of y * (1/s), s = max(absmax / 127, 1e-30), as act_quant_kernel)
    if t < producers:
        rq = tl.arange(0, QR)
        kc = tl.arange(0, KC)
        for c in range(t, tl.cdiv(M, QR), producers):
            rows = c * QR + rq
            rmask = rows < M
            xrow = x_ptr + tl.where(rmask, rows, 0).to(tl.int64)[:, None] * stride_xm
            if KC >= K:
                xv = tl.load(xrow + kc[None, :], mask=rmask[:, None] & (kc[None, :] < K), other=0).to(tl.float32)
                s = _act_scale(_absmax(xv, 1))
                inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
                tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + kc[None, :], _round_clamp_int8(xv * inv[:, None]),
                         mask=rmask[:, None] & (kc[None, :] < K))
            else:
                amax = tl.zeros((QR,), dtype=tl.float32)
                for k0 in range(0, K, KC):
                    kmask = rmask[:, None] & (kc[None, :] < K - k0)
                    xv = tl.load(xrow + (k0 + kc)[None, :], mask=kmask, other=0).to(tl.float32)
                    amax = _max_nan(amax, _absmax(xv, 1))
                s = _act_scale(amax)
                inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
                for k0 in range(0, K, KC):
                    kmask = rmask[:, None] & (kc[None, :] < K - k0)
                    xv = tl.load(xrow + (k0 + kc)[None, :], mask=kmask, other=0).to(tl.float32)
                    tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + (k0 + kc)[None, :],
                             _round_clamp_int8(xv * inv[:, None]), mask=kmask)
            tl.store(s_ptr + rows, s, mask=rmask)
            if FENCE:
                _fence_gpu(t)
            tl.debug_barrier()
            tl.atomic_add(sync_ptr + 2 + (c * QR) // BM, tl.minimum(QR, M - c * QR), sem="release")
    # ---- phase 2: output tile ``t``
    pid_m, pid_n = _tile_coords(t, num_pid_m, num_pid_n, GROUP_M)
    need = tl.minimum(BM, M - pid_m * BM)
    while tl.atomic_add(sync_ptr + 2 + pid_m, 0, sem="acquire") < need:
        pass
    tl.debug_barrier()
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    a_ptrs = q_ptr + rm_safe.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for ki in range(tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs, cache_modifier=".cg")
            b = tl.load(b_ptrs)
        else:
            kmask = rk[None, :] < K - ki * BK
            a = tl.load(a_ptrs, mask=kmask, other=0, cache_modifier=".cg")
            b = tl.load(b_ptrs, mask=kmask, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    a_s = tl.load(s_ptr + rm_safe, cache_modifier=".cg")
    out = _rowwise_scales(acc, a_s, ws_ptr, rn_safe, WS_PER_ROW)
    _store_tile(out, c_ptr, bias_ptr, lh_ptr, lu_ptr, rm, rn, rm_safe, rn_safe, M, N, LORA_R, LORA_IEEE, HAS_BIAS)
    # ---- the last program out leaves the counters zeroed for the next launch on this stream
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == total - 1:
        mt = tl.arange(0, MT)
        tl.store(sync_ptr + 2 + mt, tl.zeros((MT,), dtype=tl.int32), mask=mt < num_pid_m)
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def w8a8_fused_act_kernel(x_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr, M, N, K, stride_xm,
                          LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr, WS_PER_ROW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """W8A8 in one launch for few tokens: each program quantizes its BM activation rows itself (a first
    pass over K for the per-token absmax, then the rows again, rounded to int8 in registers as the GEMM
    consumes them) instead of reading a separately quantized copy. Integers, scales and the epilogue
    are those of ``act_quant_kernel`` + ``int8_gemm_kernel`` (bit-identical output); the cost is reading
    the activation rows twice per column tile, cheap while they sit in L2 (small M)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    k_tiles = tl.cdiv(K, BK)
    x_row = x_ptr + rm_safe.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    amax = tl.zeros((BM,), dtype=tl.float32)
    x_ptrs = x_row
    for ki in range(k_tiles):
        if EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=rk[None, :] < K - ki * BK, other=0)
        amax = _max_nan(amax, _absmax(a.to(tl.float32), 1))
        x_ptrs += BK
    a_s = _act_scale(amax)
    inv = tl.math.div_rn(tl.full(a_s.shape, 1.0, tl.float32), a_s)
    x_ptrs = x_row
    b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for ki in range(k_tiles):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = rk[None, :] < K - ki * BK
            a = tl.load(x_ptrs, mask=kmask, other=0)
            b = tl.load(b_ptrs, mask=kmask, other=0)
        q = _round_clamp_int8(a.to(tl.float32) * inv[:, None])
        acc = tl.dot(q, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BK
        b_ptrs += BK
    out = _rowwise_scales(acc, a_s, ws_ptr, rn_safe, WS_PER_ROW)
    _store_tile(out, c_ptr, bias_ptr, lh_ptr, lu_ptr, rm, rn, rm_safe, rn_safe, M, N, LORA_R, LORA_IEEE, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def w8a16_gemm_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr,
                      M, N, K, stride_am,
                      LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr, WS_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A[M,K] (float) · dequant(B[N,K] int8)ᵀ; the int8 tile is converted exactly to A's dtype in
    registers (no dequantized weight in memory), products accumulate in fp32.
    WS_MODE 0: scalar scale, 1: per-row [N,1] (both in the epilogue), 2: block-wise [ceil(N/G), K/G]
    (applied per BK slice, BK divides GROUP).
    SPLIT_K > 1 (small M: more programs to stream the weight): program (tile, s) covers a K range
    and atomically adds its scaled fp32 partial into C (fp32, zeroed); split 0 adds the bias."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    k_steps = tl.cdiv(tl.cdiv(K, BK), SPLIT_K)
    k_start = pid_k * k_steps * BK
    a_ptrs = a_ptr + rm_safe.to(tl.int64)[:, None] * stride_am + (k_start + rk)[None, :]
    b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + (k_start + rk)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for ki in range(k_steps):
        k0 = k_start + ki * BK
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = rk[None, :] < K - k0
            a = tl.load(a_ptrs, mask=kmask, other=0)
            b = tl.load(b_ptrs, mask=kmask, other=0)
        if DOT_IEEE:
            a = a.to(tl.float32)
            bt = tl.trans(b.to(tl.float32))
        else:
            bt = tl.trans(b.to(a.dtype))
        if WS_MODE == 2:
            if DOT_IEEE:
                part = tl.dot(a, bt, input_precision="ieee")
            else:
                part = tl.dot(a, bt)
            kb = tl.minimum(k0, K - 1) // GROUP
            w_s = tl.load(ws_ptr + (rn_safe // GROUP) * (K // GROUP) + kb)
            acc += part * w_s[None, :]
        else:
            if DOT_IEEE:
                acc = tl.dot(a, bt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bt, acc)
        a_ptrs += BK
        b_ptrs += BK
    if WS_MODE == 1:
        acc = acc * tl.load(ws_ptr + rn_safe)[None, :]
    elif WS_MODE == 0:
        acc = acc * tl.load(ws_ptr)
    if pid_k == 0:
        if LORA_R > 0:
            acc = _lora_epilogue(acc, lh_ptr, lu_ptr, rm_safe, rn_safe, LORA_R, LORA_IEEE)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=cmask)


@triton.jit
def _scale_weight_rows(acc, ws_ptr, rn_safe, WS_MODE: tl.constexpr):
    """acc [BN weight rows, tokens] times the per-row (WS_MODE 1) or tensor-wise (0) weight scale; block-wise
    scales (2) were applied per K block."""
    if WS_MODE == 1:
        return acc * tl.load(ws_ptr + rn_safe)[:, None]
    if WS_MODE == 0:
        return acc * tl.load(ws_ptr)
    return acc


@triton.jit(do_not_specialize=["M"])
def w8a16_swap_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr,
                      M, N, K, stride_am,
                      LORA_R: tl.constexpr, LORA_IEEE: tl.constexpr, WS_MODE: tl.constexpr, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """W8A16 with the operands swapped, for few tokens: each program computes Cᵀ[BN, BM] =
    dequant(B)[BN, K] · A[BM, K]ᵀ. The converted weight tile is the MMA's *first* operand, which
    Hopper's wgmma reads from registers -- where the int8 -> float conversion leaves it -- so the
    activations alone go through shared memory (``w8a16_gemm_kernel`` makes the converted weight the
    second operand, which wgmma must read from shared memory: a store and a barrier per K step). The
    token tile BM is the MMA's N side (16 and up); the weight rows BN its M side (64 per warpgroup).
    Same numerics and scale modes as ``w8a16_gemm_kernel`` (no split-K)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + rm_safe.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = rk[None, :] < K - k0
            a = tl.load(a_ptrs, mask=kmask, other=0)
            b = tl.load(b_ptrs, mask=kmask, other=0)
        if DOT_IEEE:
            w = b.to(tl.float32)
            at = tl.trans(a.to(tl.float32))
        else:
            w = b.to(a.dtype)
            at = tl.trans(a)
        if WS_MODE == 2:
            if DOT_IEEE:
                part = tl.dot(w, at, input_precision="ieee")
            else:
                part = tl.dot(w, at)
            w_s = tl.load(ws_ptr + (rn_safe // GROUP) * (K // GROUP) + tl.minimum(k0, K - 1) // GROUP)
            acc += part * w_s[:, None]
        else:
            if DOT_IEEE:
                acc = tl.dot(w, at, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, at, acc)
        a_ptrs += BK
        b_ptrs += BK
    acc = _scale_weight_rows(acc, ws_ptr, rn_safe, WS_MODE)
    if LORA_R > 0:  # Cᵀ += up[rn, :R] · h[rm, :R]ᵀ
        rr = tl.arange(0, LORA_R)
        h = tl.load(lh_ptr + rm_safe.to(tl.int64)[:, None] * LORA_R + rr[None, :])
        u = tl.load(lu_ptr + rn_safe.to(tl.int64)[:, None] * LORA_R + rr[None, :])
        if LORA_IEEE:
            acc = tl.dot(u.to(tl.float32), tl.trans(h.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(u, tl.trans(h), acc)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn_safe).to(tl.float32)[:, None]
    c_ptrs = c_ptr + rm.to(tl.int64)[None, :] * N + rn[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@triton.jit(do_not_specialize=["M"])
def w8a16_gemv_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, lh_ptr, lu_ptr, M, N, K, stride_am,
                      LORA_R: tl.constexpr, WS_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, MS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """W8A16 for at most MS (1, 2 or 4) tokens without tensor cores: a tensor-core tile wastes 15 of its 16
    rows on one token, and what such a call costs is streaming the weight. Each program takes BN weight rows
    and walks K in BK slices: the int8 slice once to fp32 (exact), times each token's slice, summed along
    K in fp32 (products of a bf16/fp16 activation and an int8 integer are exact in fp32: the numerics of
    ``w8a16_gemm_kernel`` up to summation order). Same scale modes and epilogue (LoRA, bias)."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    cols = tl.arange(0, MS)
    rn_safe = tl.where(rn < N, rn, 0)
    b_ptrs = b_ptr + rn_safe.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BN, MS), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            w = tl.load(b_ptrs).to(tl.float32)
        else:
            w = tl.load(b_ptrs, mask=rk[None, :] < K - k0, other=0).to(tl.float32)
        part = tl.zeros((BN, MS), dtype=tl.float32)
        for mi in tl.static_range(MS):
            kmask = (rk < K - k0) & (tl.full((BK,), mi, tl.int32) < M)
            xm = tl.load(a_ptr + mi * stride_am + k0 + rk, mask=kmask, other=0).to(tl.float32)
            part = tl.where(cols[None, :] == mi, tl.sum(w * xm[None, :], axis=1)[:, None], part)
        if WS_MODE == 2:
            acc += part * tl.load(ws_ptr + (rn_safe // GROUP) * (K // GROUP) + k0 // GROUP)[:, None]
        else:
            acc += part
        b_ptrs += BK
    acc = _scale_weight_rows(acc, ws_ptr, rn_safe, WS_MODE)
    cm = tl.where(cols < M, cols, 0)
    if LORA_R > 0:  # Cᵀ += up[rn, :R] · h[m, :R]ᵀ, in fp32 on CUDA cores as well
        rr = tl.arange(0, LORA_R)
        u = tl.load(lu_ptr + rn_safe.to(tl.int64)[:, None] * LORA_R + rr[None, :]).to(tl.float32)
        for mi in tl.static_range(MS):
            hm = tl.load(lh_ptr + tl.minimum(mi, M - 1) * LORA_R + rr).to(tl.float32)
            acc += tl.where(cols[None, :] == mi, tl.sum(u * hm[None, :], axis=1)[:, None], 0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn_safe).to(tl.float32)[:, None]
    c_ptrs = c_ptr + cm.to(tl.int64)[None, :] * N + rn[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(cols[None, :] < M) & (rn[:, None] < N))


@triton.jit
def dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_on, stride_sn, stride_sk,
                   WS_MODE: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out = q.float() · scale (scalar / per-row / block-wise), cast to out's dtype."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rk[None, :], mask=mask, other=0)
    if WS_MODE == 0:
        s = tl.load(s_ptr)
        w = q.to(tl.float32) * s
    elif WS_MODE == 1:
        s = tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0)
        w = q.to(tl.float32) * s[:, None]
    else:
        s = tl.load(s_ptr + (rn // GROUP)[:, None] * stride_sn + (rk // GROUP)[None, :] * stride_sk,
                    mask=mask, other=0)
        w = q.to(tl.float32) * s
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)
