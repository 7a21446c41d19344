"""INT8 attention (``kernels/attention.py``) and the loaders' ``attention`` option (``nodes/attention.py``).

* The Triton kernels (CPU: TRITON_INTERPRET=1 at tiny ragged shapes; GPU: compiled, larger shapes) against
  float64 softmax attention and against the torch reference of the same quantized math.
* The torch reference against float64 at moderate shapes, and the K smoothing it relies on.
* ComfyUI's override convention: layouts, per-call fallbacks that return exactly the original function's
  result, torch.compile.
* In a real ComfyUI (COMFYUI_DIR / COMFYUI_PYTHON; skipped without): the loader option installs the override,
  LoRA clones keep it, and a tiny Wan sampled end to end with attention=int8 (torch path on CPU) lands
  within tolerance of attention=default.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT = "CTQ_RESULT "
CHECKS = ("loader_option_sets_override", "sampled_latent_close_to_default", "compiled_model_matches_eager")

if __name__ != "__main__":
    import pytest
    import torch
    import torch.nn.functional as F

    from convert_to_quant.kernels import attention as A
    from convert_to_quant.kernels import launch

    sys.path.insert(0, HERE)
    from comfy_helpers import SKIP_REASON, check_detail, comfy_env, run_check_script  # noqa: E402

    DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    TRITON_OK = launch.triton_usable(DEV)
    needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA sm80+ or TRITON_INTERPRET=1")

    def cosine(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        return float(a @ b / (a.norm() * b.norm()))

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def exact_attention(q, k, v, sm_scale=None):
        """float64 softmax attention of (B, H, L, D) operands -> (B, Lq, H, D)."""
        sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * sm_scale
        return torch.matmul(torch.softmax(s, dim=-1), v.double()).transpose(1, 2)

    def operands(b, h, lq, lk, d, dtype, seed=0, k_bias=1.0, std=1.0, layout="blhd"):
        """q, k, v as (B, H, L, D) views; "blhd": views of (B, L, H, D) storage as ComfyUI's (B, L, H·D)
        activations are (row stride H·D); "bhld": contiguous (B, H, L, D)."""
        g = torch.Generator().manual_seed(seed)

        def make(n, bias=0.0):
            x = torch.randn(b, n, h, d, generator=g) * std + bias * torch.randn(1, 1, h, d, generator=g)
            x = x.to(DEV, dtype)
            return x.transpose(1, 2) if layout == "blhd" else x.transpose(1, 2).contiguous()
        return make(lq), make(lk, k_bias), make(lk)

    # ------------------------------------------------------------------------------------------------
    # Triton kernels
    # ------------------------------------------------------------------------------------------------
    SMALL = [(1, 2, 37, 53, 64), (2, 1, 40, 32, 128), (1, 2, 19, 7, 128)]  # ragged Lq/Lk; cross-attention shapes
    if DEV.type == "cuda":
        SMALL += [(2, 3, 300, 517, 128), (1, 4, 1000, 1000, 64)]

    @needs_triton
    @pytest.mark.parametrize("shape", SMALL)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_quantize_kernel_equals_reference_bit_for_bit(shape, dtype):
        b, h, lq, lk, d = shape
        q, k, _ = operands(b, h, lq, lk, d, dtype, seed=1, k_bias=3.0)
        ref = A.quantize_qk_reference(q, k, 0.125)
        tri = A.quantize_qk_triton(q, k, 0.125)
        for name, r, t in zip(("q int8", "q scale", "k int8", "k scale"), ref, tri):
            assert r.dtype == t.dtype and r.shape == t.shape, name
            assert torch.equal(r, t), f"{name}: {int((r != t).sum())} of {r.numel()} differ"

    @needs_triton
    @pytest.mark.parametrize("shape", SMALL)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("heads_last", [True, False])
    @pytest.mark.parametrize("pv", ["v", "fp8"])
    def test_triton_attention_matches_float64_and_reference(shape, dtype, heads_last, pv):
        b, h, lq, lk, d = shape
        q, k, v = operands(b, h, lq, lk, d, dtype, seed=2)
        out = A.int8_attention(q, k, v, backend="triton", heads_last=heads_last, pv=pv)
        ref = A.reference_int8_attention(q, k, v, pv=pv)  # (B, Lq, H, D)
        want_shape = (b, lq, h, d) if heads_last else (b, h, lq, d)
        assert out.shape == want_shape and out.is_contiguous() and out.dtype == dtype
        o = out if heads_last else out.transpose(1, 2)
        exact = exact_attention(q, k, v)
        assert cosine(o, exact) >= 0.999
        if pv == "fp8":
            # P is rounded to e4m3 (3 mantissa bits) relative to the running max in the kernel, to the final
            # max in the reference: the two round different values; both are as close to float64
            assert rel(o, ref) < 3e-2
            assert rel(o, exact) < 1.3 * rel(ref, exact) + 2e-3
            return
        # same quantized math: only the flash-style P rounding (relative to the running max) and the
        # accumulation order differ; the interpreter's fp32->bf16 conversion truncates
        tol = 2e-2 if (dtype == torch.bfloat16) else 4e-3
        err = (o.float() - ref.float()).abs().max().item()
        assert err <= tol * max(1.0, ref.float().abs().max().item()), err
        assert rel(o, ref) < (8e-3 if dtype == torch.bfloat16 else 1.5e-3)

    @needs_triton
    @pytest.mark.parametrize("shape", SMALL)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_v_fp8_quantization_kernel_equals_reference_bit_for_bit(shape, dtype):
        """V -> V^T float8_e4m3fn per (batch, head, channel) (P·V "fp8"): the kernel gives torch's bits,
        zero padding to a multiple of 16 tokens, every channel's absmax at 448, round to nearest."""
        b, h, lq, lk, d = shape
        _, _, v = operands(b, h, lq, lk, d, dtype, seed=13)
        v = v * torch.linspace(1e-3, 30.0, d, device=v.device).to(dtype)  # channels of very different ranges
        vt_r, sv_r = A.quantize_v_fp8_reference(v.cpu())
        vt_t, sv_t = A.quantize_v_fp8_triton(v)
        assert vt_t.shape == (b, h, d, -(-lk // 16) * 16) and vt_t.dtype == torch.float8_e4m3fn
        assert torch.equal(sv_r, sv_t.cpu())
        # equal values (an H200 run once gave +0.0 where torch keeps the -0.0 of a tiny negative value: the
        # same number; the kernel now ORs the sign bit in), and the bits wherever the value is not zero
        a, t = vt_r.float(), vt_t.cpu().float()
        assert torch.equal(a, t), f"{int((a != t).sum())} of {a.numel()} differ"
        nz = a != 0
        assert torch.equal(vt_r.view(torch.uint8)[nz], vt_t.cpu().view(torch.uint8)[nz])
        vt_t, sv_t = vt_t.cpu(), sv_t.cpu()
        assert not bool(vt_t[..., lk:].float().any())
        deq = vt_t[..., :lk].float().transpose(-1, -2) * sv_t[:, :, None, :]
        vf = v.float().cpu()
        assert bool((vt_t[..., :lk].float().abs().amax(-1) == 448).all())
        # e4m3 has 3 mantissa bits: |error| <= 2^-4 of the value (normals) or half the subnormal step
        err = (deq - vf).abs()
        bound = torch.maximum(vf.abs() * 2.0 ** -4, sv_t[:, :, None, :] * 2.0 ** -10) * (1 + 1e-6)
        assert bool((err <= bound).all())

    @pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
    @pytest.mark.parametrize("pv", ["v", "fp8"])
    @pytest.mark.parametrize("where", ["q nan", "k nan", "v nan", "v inf", "q inf"])
    def test_non_finite_inputs_give_non_finite_outputs_where_exact_attention_does(backend, pv, where):
        """A NaN/inf in Q, K or V is not turned into plausible numbers: the quantization scales keep it
        (NaN-propagating absmax and clamps), so exactly the outputs float64 softmax attention makes
        non-finite are non-finite, and the others stay finite."""
        q, k, v = operands(1, 2, 37, 53, 64, torch.bfloat16, seed=21)
        q, k, v = q.clone(), k.clone(), v.clone()  # (B, H, L, D) contiguous: one element each
        name, kind = where.split()
        t = {"q": q, "k": k, "v": v}[name]
        t[0, 1, 7, 3] = float(kind)
        out = A.int8_attention(q, k, v, backend=backend, pv=pv).float().cpu()
        exact = exact_attention(q.cpu(), k.cpu(), v.cpu())
        bad = ~torch.isfinite(exact)
        assert bool(bad.any())
        assert torch.equal(~torch.isfinite(out), bad), f"{int((~torch.isfinite(out) != bad).sum())} outputs differ"

    def test_pv_mode_choice(monkeypatch):
        monkeypatch.delenv(A.PV_ENV, raising=False)
        assert A.pv_mode(torch.device("cpu"), "torch") == "v"
        assert A.pv_mode(torch.device("cpu"), "triton") == "v"  # the interpreter: only when asked
        assert A.pv_mode(torch.device("cpu"), "torch", "fp8") == "fp8"
        monkeypatch.setattr(A, "arch_of", lambda dev: "sm90")
        assert A.pv_mode(torch.device("cuda"), "triton") == "fp8"
        assert A.pv_mode(torch.device("cuda"), "torch") == "v"
        for arch in ("sm80", "sm89"):  # no FP8 tensor cores / not checked on such a card
            monkeypatch.setattr(A, "arch_of", lambda dev: arch)
            assert A.pv_mode(torch.device("cuda"), "triton") == "v"
        assert A.pv_mode(torch.device("cuda"), "triton", "fp8") == "fp8"  # sm89 when asked for
        monkeypatch.setattr(A, "arch_of", lambda dev: "sm80")
        with pytest.raises(A.AttentionInputError, match="FP8 tensor cores"):
            A.pv_mode(torch.device("cuda"), "triton", "fp8")
        assert A.pv_mode(torch.device("cuda"), "torch", "fp8") == "fp8"  # the reference runs anywhere
        monkeypatch.setenv(A.PV_ENV, "fp8")
        assert A.pv_mode(torch.device("cpu"), "torch") == "fp8"
        assert A.pv_mode(torch.device("cpu"), "torch", "v") == "v"  # the argument wins
        monkeypatch.setenv(A.PV_ENV, "int4")
        with pytest.raises(A.AttentionInputError, match="P·V mode"):
            A.pv_mode(torch.device("cpu"), "torch")
        q, k, v = (t.cpu() for t in operands(1, 1, 4, 4, 64, torch.bfloat16))
        with pytest.raises(A.AttentionInputError, match="P·V mode"):
            A.int8_attention(q, k, v, pv="fp4")

    def test_reference_fp8_pv_matches_float64_moderate_shapes():
        q, k, v = (t.cpu() for t in operands(1, 2, 700, 900, 128, torch.bfloat16, seed=5, k_bias=2.0))
        exact = exact_attention(q, k, v)
        c8 = cosine(A.reference_int8_attention(q, k, v, pv="fp8"), exact)
        cv = cosine(A.reference_int8_attention(q, k, v), exact)
        assert 0.999 <= c8 < cv, (c8, cv)

    @needs_triton
    def test_triton_attention_contiguous_and_strided_inputs_agree():
        q, k, v = operands(1, 2, 33, 41, 64, torch.float16, seed=3, layout="blhd")
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        a = A.int8_attention(q, k, v, backend="triton")
        c = A.int8_attention(qc, kc, vc, backend="triton")
        assert torch.equal(a, c)

    @needs_triton
    @pytest.mark.parametrize("d", [64, 128])
    def test_every_tile_config_matches_the_reference(d):
        """Every candidate the tuner may pick on this card (GPU: the arch's list; CPU: the interpreter's)."""
        lq, lk = (300, 389) if DEV.type == "cuda" else (37, 45)
        q, k, v = operands(2, 2, lq, lk, d, torch.bfloat16, seed=12)
        quant = A.quantize_qk_triton(q, k, d ** -0.5)
        ref = A.reference_int8_attention(q, k, v)
        ref8 = A.reference_int8_attention(q, k, v, pv="fp8")
        v8 = A.quantize_v_fp8_triton(v)
        for cfg in A._CONFIGS[launch.arch_of(DEV)]:
            out = A.attention_from_quantized_triton(*quant, v, configs=[cfg])
            assert rel(out, ref) < 8e-3, cfg.short()
            out8 = A.attention_from_quantized_triton(*quant, v, configs=[cfg], v8=v8)
            assert rel(out8, ref8) < 3e-2, cfg.short()

    @pytest.mark.gpu
    @pytest.mark.parametrize("lq, lk", [(4096, 4096), (2000, 512)])
    def test_gpu_tuned_kernel_long_sequences(lq, lk):
        q, k, v = operands(1, 8, lq, lk, 128, torch.bfloat16, seed=4, std=1.5)
        sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        for pv in ("v", "fp8"):
            out = A.int8_attention(q, k, v, pv=pv)
            assert cosine(out, sdpa) >= 0.999, pv
            assert rel(out, A.reference_int8_attention(q, k, v, pv=pv)) < (8e-3 if pv == "v" else 3e-2), pv

    # ------------------------------------------------------------------------------------------------
    # torch reference
    # ------------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("d", [64, 128])
    @pytest.mark.parametrize("std", [1.0, 2.0])
    def test_reference_matches_float64_moderate_shapes(d, std):
        q, k, v = (t.cpu() for t in operands(1, 2, 700, 900, d, torch.bfloat16, seed=5, k_bias=2.0, std=std))
        out = A.reference_int8_attention(q, k, v)
        c = cosine(out, exact_attention(q, k, v))
        assert c >= (0.9995 if std == 1.0 else 0.999), c

    def test_reference_quantization_is_per_token_round_to_nearest():
        q, k, _ = (t.cpu() for t in operands(2, 3, 50, 70, 64, torch.float32, seed=6, k_bias=5.0))
        sm = 0.1
        qi, qs, ki, ks = A.quantize_qk_reference(q, k, sm)
        mult = torch.tensor(sm * A.LOG2E, dtype=torch.float32)
        sq = qs / mult
        ksm = k.float() - k.float().mean(dim=2, keepdim=True)
        for x, xi, s in ((q.float(), qi, sq), (ksm, ki, ks)):
            assert s.shape == x.shape[:3]  # one scale per (batch, head, token)
            assert torch.allclose(s, x.abs().amax(-1) / 127, rtol=1e-6)
            assert int(xi.abs().amax(-1).min()) == 127  # every token uses the full range
            err = (xi.float() * s[..., None] - x).abs()
            assert bool((err <= s[..., None] * 0.5 * (1 + 1e-5)).all())

    def test_k_smoothing_is_what_keeps_a_shared_k_offset_harmless():
        """A large per-channel offset shared by all keys does not change softmax attention; after smoothing
        it does not change the quantized result's accuracy either, while quantizing the raw K loses it."""
        q, k, v = (t.cpu() for t in operands(1, 2, 256, 256, 128, torch.float32, seed=7, k_bias=0.0))
        offset = 8.0 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(8))
        ko = k + offset
        exact = exact_attention(q, k, v)
        assert cosine(exact_attention(q, ko, v), exact) > 0.999999  # softmax invariance
        smoothed = cosine(A.reference_int8_attention(q, ko, v), exact)
        qi, qs, _, _ = A.quantize_qk_reference(q, ko, 128 ** -0.5)
        ki, ks = A._quant_groups(ko.float(), A.K_GRAN)  # the same quantization without the mean removed
        raw = cosine(A.attention_from_quantized(qi, qs, ki.contiguous(), ks, v), exact)
        assert smoothed >= 0.9995 and raw < smoothed - 1e-3, (smoothed, raw)

    def test_reference_chunks_rows_without_changing_the_result(monkeypatch):
        q, k, v = (t.cpu() for t in operands(1, 2, 64, 80, 64, torch.bfloat16, seed=9))
        whole = A.reference_int8_attention(q, k, v)
        monkeypatch.setattr(A, "REF_CHUNK_BYTES", 2 * 80 * 4 * 5)  # 5 query rows per chunk
        assert torch.equal(A.reference_int8_attention(q, k, v), whole)

    def test_bad_operands_are_clear_errors():
        q, k, v = (t.cpu() for t in operands(1, 2, 8, 8, 64, torch.bfloat16))
        with pytest.raises(A.AttentionInputError, match="head dim 80"):
            A.int8_attention(*(t.cpu() for t in operands(1, 2, 8, 8, 80, torch.bfloat16)))
        with pytest.raises(A.AttentionInputError, match="shapes"):
            A.int8_attention(q, k[:, :1], v[:, :1])
        with pytest.raises(A.AttentionInputError, match="mixed dtypes"):
            A.int8_attention(q, k.float(), v)
        with pytest.raises(A.AttentionInputError, match="unit stride"):
            A.int8_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
        with pytest.raises(A.AttentionInputError, match="backend must be"):
            A.int8_attention(q, k, v, backend="cuda")
        if TRITON_OK:
            with pytest.raises(A.AttentionInputError, match="float16/bfloat16"):
                A.attention_backend(DEV, torch.float32, "triton")
        else:
            with pytest.raises(A.AttentionInputError, match="cannot run"):
                A.attention_backend(torch.device("cpu"), torch.bfloat16, "triton")

    def test_backend_choice():
        assert A.attention_backend(torch.device("cpu"), torch.float32) == "torch"
        assert A.attention_backend(torch.device("cpu"), torch.bfloat16) == "torch"  # never the interpreter unasked
        # float32 on CUDA is a precision request, other devices have no kernel: the caller keeps its attention
        assert A.attention_backend(torch.device("cuda"), torch.float32) is None
        assert A.attention_backend(torch.device("mps"), torch.float16) is None
        assert A.attention_backend(torch.device("cuda"), torch.float16, "torch") == "torch"

    # ------------------------------------------------------------------------------------------------
    # ComfyUI's override convention (no ComfyUI needed: ``func`` mimics its attention functions)
    # ------------------------------------------------------------------------------------------------
    CALLS = []

    def comfy_like_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                             skip_output_reshape=False, **kwargs):
        """ComfyUI's attention_pytorch, written out: SDPA on (B, H, L, D)."""
        CALLS.append(kwargs.get("transformer_options"))
        if skip_reshape:
            b, _, _, d = q.shape
        else:
            b, _, hd = q.shape
            d = hd // heads
            q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if mask is not None and mask.ndim == 2:
            mask = mask[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)

    def comfy_operands(b=2, lq=24, lk=24, heads=2, d=64, dtype=torch.float32, seed=10):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(b, n, heads * d, generator=g).to(dtype) for n in (lq, lk, lk)]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("lq, lk", [(24, 24), (24, 9)])
    def test_override_runs_int8_in_comfy_layouts(dtype, lq, lk):
        q, k, v = comfy_operands(lq=lq, lk=lk, dtype=dtype)
        ov = A.Int8AttentionOverride()
        CALLS.clear()
        out = ov(comfy_like_attention, q, k, v, 2, transformer_options={}, _inside_attn_wrapper=True)
        assert CALLS == [] and ov.stats == {"int8 torch": 1}
        q4, k4, v4 = (t.view(2, -1, 2, 64).transpose(1, 2) for t in (q, k, v))
        want = A.reference_int8_attention(q4, k4, v4).reshape(2, lq, 128)
        assert out.shape == (2, lq, 128) and out.dtype == dtype and torch.equal(out, want)
        assert cosine(out, comfy_like_attention(q, k, v, 2)) > 0.999
        # skip_reshape (B, H, L, D) in, and (B, H, Lq, D) out with skip_output_reshape
        o2 = ov(comfy_like_attention, q4, k4, v4, heads=2, skip_reshape=True)
        assert torch.equal(o2, want)
        o3 = ov(comfy_like_attention, q4, k4, v4, 2, None, None, True, True)
        assert o3.shape == (2, 2, lq, 64) and torch.equal(o3.transpose(1, 2).reshape(2, lq, 128), want)
        assert ov.stats == {"int8 torch": 3}

    @pytest.mark.parametrize("case", ["mask", "head_dim_80", "kwarg", "v_width", "mixed_dtype"])
    def test_override_falls_back_to_the_original_function_exactly(case):
        q, k, v = comfy_operands(d=64)
        args, kw = [q, k, v, 2], {"transformer_options": {"x": 1}}
        if case == "mask":
            kw["mask"] = torch.randn(24, 24, generator=torch.Generator().manual_seed(11))
        elif case == "head_dim_80":
            q, k, v = comfy_operands(d=80)
            args = [q, k, v, 2]
        elif case == "kwarg":
            kw["some_future_option"] = True
        elif case == "v_width":
            args[2] = v[..., :64]
        elif case == "mixed_dtype":
            args[1] = k.bfloat16()
        if case == "kwarg":
            func = lambda *a, some_future_option=None, **k_: comfy_like_attention(*a, **k_)  # noqa: E731
        elif case == "mixed_dtype":
            func = lambda q_, k_, *a, **kw_: comfy_like_attention(q_, k_.to(q_.dtype), *a, **kw_)  # noqa: E731
        else:
            func = comfy_like_attention
        ov = A.Int8AttentionOverride()
        CALLS.clear()
        got = ov(func, *args, **kw)
        want = func(*args, **kw)
        assert torch.equal(got, want) and len(CALLS) == 2
        assert list(ov.stats) and all(s.startswith("fallback: ") for s in ov.stats)

    def test_override_falls_back_through_a_previous_override():
        seen = []

        def previous(func, *args, **kwargs):
            seen.append(func)
            return func(*args, **kwargs) * 2
        q, k, v = comfy_operands(d=80)
        ov = A.Int8AttentionOverride(previous=previous)
        out = ov(comfy_like_attention, q, k, v, 2)
        assert seen == [comfy_like_attention] and torch.equal(out, 2 * comfy_like_attention(q, k, v, 2))
        q, k, v = comfy_operands(d=64)
        ov(comfy_like_attention, q, k, v, 2)  # supported: ours, not the previous one
        assert len(seen) == 1

    def test_override_compiles_as_one_graph():
        """Under torch.compile the kernel is the convert_to_quant::int8_attention custom op (no graph break)."""
        q, k, v = comfy_operands(dtype=torch.float32)
        ov = A.Int8AttentionOverride()

        def f(q, k, v):
            return ov(comfy_like_attention, q * 1.5, k, v, 2, transformer_options={}) + 1

        eager = f(q, k, v)
        torch._dynamo.reset()
        comp = torch.compile(f, backend="aot_eager", fullgraph=True)
        assert torch.equal(comp(q, k, v), eager)

    def test_custom_op_passes_opcheck():
        q, k, v = (t.cpu() for t in operands(1, 2, 8, 12, 64, torch.bfloat16, layout="bhld"))
        for heads_last in (True, False):
            for pv in ("", "fp8"):
                torch.library.opcheck(torch.ops.convert_to_quant.int8_attention,
                                      (q, k, v, 0.125, "torch", heads_last, pv),
                                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    # ------------------------------------------------------------------------------------------------
    # inside a real ComfyUI (subprocess with COMFYUI_PYTHON)
    # ------------------------------------------------------------------------------------------------
    comfy = pytest.mark.skipif(comfy_env() is None, reason=SKIP_REASON)

    @pytest.fixture(scope="module")
    def comfy_results():
        return run_check_script(__file__, CHECKS, RESULT)

    _check = check_detail

    @comfy
    @pytest.mark.comfyui
    def test_comfyui_loader_option_sets_override(comfy_results):
        d = _check(comfy_results, "loader_option_sets_override")
        assert d["optional_input"] == ["default", "int8"]

    @comfy
    @pytest.mark.comfyui
    def test_comfyui_sampled_latent_close_to_default(comfy_results):
        d = _check(comfy_results, "sampled_latent_close_to_default")
        assert d["int8_calls"] > 0 and d["rel_err"] < 0.02, d

    @comfy
    @pytest.mark.comfyui
    def test_comfyui_compiled_model_matches_eager(comfy_results):
        _check(comfy_results, "compiled_model_matches_eager")


# ================================================================================================
# everything below runs inside ComfyUI's python
# ================================================================================================
def _setup():
    from comfy_helpers import load_pack_inside_comfyui
    return load_pack_inside_comfyui()


class Ctx:
    def __init__(self):
        import tempfile
        import folder_paths
        from comfy_helpers import save_tensors, wan21_state_dict
        from convert_to_quant.quant_core.formats import make_spec
        from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
        from convert_to_quant.quant_core.plan import PlanOptions
        self.dir = tempfile.mkdtemp(prefix="ctq-attn-")
        sd = wan21_state_dict()
        qsd = quantize_tensors(sd, plan_for_tensors(sd, PlanOptions(spec=make_spec(), presets=("auto",))))
        save_tensors(os.path.join(self.dir, "wan_int8.safetensors"), qsd)
        folder_paths.add_model_folder_path("diffusion_models", self.dir, is_default=True)

    def load(self, attention=None):
        from convert_to_quant.nodes.runtime import QuantDiffusionModelLoader
        kw = {} if attention is None else {"attention": attention}
        return QuantDiffusionModelLoader().load("wan_int8.safetensors", "default", **kw)[0]

    def cleanup(self):
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def check_loader_option_sets_override(c: Ctx):
    import comfy.sd
    from comfy_helpers import wan21_lora
    from convert_to_quant.kernels.attention import Int8AttentionOverride
    from convert_to_quant.nodes.attention import attention_override, with_attention
    from convert_to_quant.nodes.runtime import QuantDiffusionModelLoader, QuantizeModelOnTheFly
    it = QuantDiffusionModelLoader.INPUT_TYPES()
    assert "attention" not in it["required"], "attention must stay optional (old workflows and API prompts)"
    opt = list(it["optional"]["attention"][0])
    assert it["optional"]["attention"][1]["default"] == "default"
    assert "attention" in QuantizeModelOnTheFly.INPUT_TYPES()["optional"]
    old, default, int8 = c.load(), c.load("default"), c.load("int8")
    assert attention_override(old) is None and attention_override(default) is None
    ov = attention_override(int8)
    assert isinstance(ov, Int8AttentionOverride) and ov.previous is None
    # a LoRA loaded afterwards (what LoraLoaderModelOnly runs) clones the MODEL: the option travels with it
    lora = {k: v for k, v in wan21_lora().items()}
    with_lora, _ = comfy.sd.load_lora_for_models(int8, None, lora, 1.0, 0.0)
    assert attention_override(with_lora) is ov, with_lora.model_options
    assert len(with_lora.patches) == 16, list(with_lora.patches)[:4]
    assert attention_override(int8) is ov and not int8.patches
    # an override installed by another node first is kept as our fallback; setting int8 twice adds nothing
    other = lambda func, *a, **k: func(*a, **k)  # noqa: E731
    pre = old.clone()
    pre.model_options["transformer_options"]["optimized_attention_override"] = other
    chained = attention_override(with_attention(pre, "int8"))
    assert chained.previous is other
    assert attention_override(with_attention(int8, "int8")) is ov
    try:
        with_attention(old, "fp8")
        raise AssertionError("a bad attention value was accepted")
    except Exception as e:  # ConvertError naming the choices
        assert "default, int8" in str(e), e
    return {"optional_input": opt}


def _sample(model, seed=7, steps=3):
    import torch
    import nodes as comfy_nodes
    g = torch.Generator().manual_seed(11)
    pos = [[torch.randn(1, 8, 4096, generator=g), {}]]
    neg = [[torch.randn(1, 8, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 8, 8)}  # 3 latent frames of 8x8: 48 video tokens
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, 3.0, "euler", "simple", pos, neg, latent)
    return out["samples"].float()


def check_sampled_latent_close_to_default(c: Ctx):
    import torch
    from convert_to_quant.nodes.attention import attention_override
    default = _sample(c.load("default"))
    m = c.load("int8")
    int8 = _sample(m)
    ov = attention_override(m)
    calls = sum(n for k, n in ov.stats.items() if k.startswith("int8"))
    err = float((int8 - default).norm() / default.norm())
    assert torch.isfinite(int8).all() and not torch.equal(int8, default), "the option changed nothing"
    return {"rel_err": err, "int8_calls": calls, "stats": ov.stats}


def check_compiled_model_matches_eager(c: Ctx):
    """TorchCompileModel's wrapper (aot_eager on CPU) over the int8-attention MODEL: same latent as eager."""
    import torch
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    eager = _sample(c.load("int8"), steps=1)
    m = c.load("int8").clone()
    set_torch_compile_wrapper(model=m, backend="aot_eager")
    torch._dynamo.reset()
    comp = _sample(m, steps=1)
    err = float((comp - eager).norm() / eager.norm())
    assert err < 1e-4, err
    return {"rel_err": err}


def main(names):
    _setup()
    import logging
    logging.basicConfig(level=logging.WARNING)
    c = Ctx()
    try:
        for name in names:
            try:
                detail = globals()["check_" + name](c) or {}
                r = {"check": name, "ok": True, "detail": detail}
            except BaseException:
                r = {"check": name, "ok": False, "error": traceback.format_exc()}
            print(RESULT + json.dumps(r), flush=True)
    finally:
        c.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:] or CHECKS)
