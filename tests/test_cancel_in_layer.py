"""Issue 15: Cancel stops within 2 s for every optimizer, also in the middle of one long layer.

Interrupts used to be checked only between tensors: a learned-rounding layer took minutes to notice
Cancel. The optimizer loops now call ``quant_core.checkpoint.checkpoint`` (rate-limited), which runs the
pipeline's ``check_cancel`` and reports progress inside the layer. Each test converts a file whose layer
takes many seconds; a second thread waits for the first in-layer progress report (an event, no sleep),
then raises the interrupt flag the way ComfyUI's /interrupt does; the conversion must stop within 2 s,
before the layer finished, leaving nothing on disk.
"""
import os
import threading
import time

import pytest
import torch

from convert_to_quant.quant_core.calibration import collect
from convert_to_quant.quant_core.checkpoint import checkpoint, checkpoint_scope, progress_span
from convert_to_quant.quant_core.errors import ConversionCancelled
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.safetensors_io import save_file

STOP_WITHIN_S = 2.0


def _model(d, out, n, layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {f"blocks.{i}.fc.weight": (torch.randn(out, n, generator=g) / n ** 0.5).bfloat16() for i in range(layers)}
    path = os.path.join(d, "model.safetensors")
    save_file(sd, path)
    return path


def _calibration(d, out, n):
    """Real statistics of a Linear of the layer's width (the GPTQ-family objective; no SVD proxy)."""
    m = torch.nn.Module()
    m.blocks = torch.nn.ModuleList([torch.nn.Module()])
    m.blocks[0].fc = torch.nn.Linear(n, out, bias=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(512, n, generator=g) for _ in range(2)]
    path = os.path.join(d, "calib.safetensors")
    collect(m, batches, forward=lambda mod, b: mod.blocks[0].fc(b)).save(path)
    return path


class Interrupter:
    """ComfyUI's pattern: /interrupt sets a flag, the worker's check raises when it sees it."""

    def __init__(self, wait_for: threading.Event):
        self.flag = threading.Event()
        self.t_interrupt = None
        self.thread = threading.Thread(target=self._run, args=(wait_for,), daemon=True)
        self.thread.start()

    def _run(self, wait_for):
        if wait_for.wait(600):
            self.t_interrupt = time.monotonic()
            self.flag.set()

    def check(self):
        if self.flag.is_set():
            raise ConversionCancelled("interrupted")


def _run_and_cancel(tmp_path, model, opts, sync_on_layer_done=False):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "q.safetensors")
    opts.report_path = str(out_dir / "q_quality.json")
    started = threading.Event()
    layers_done, inner = [], []

    def progress(done, n, name):
        layers_done.append(done)
        if sync_on_layer_done:
            started.set()

    def layer_progress(done, n, name):
        inner.append(done)
        started.set()

    stopper = Interrupter(started)
    with pytest.raises(ConversionCancelled):
        convert_file(model, out, opts, progress=progress, check_cancel=stopper.check, layer_progress=layer_progress)
    t_stop = time.monotonic()
    stopper.thread.join(5)
    assert stopper.t_interrupt is not None
    assert t_stop - stopper.t_interrupt < STOP_WITHIN_S, t_stop - stopper.t_interrupt
    assert os.listdir(out_dir) == [], os.listdir(out_dir)  # no output, .partial, report or temp file
    return layers_done, inner


@pytest.mark.parametrize("optimizer, out, n, options", [
    ("gptq", 8192, 1024, {}),
    ("quip", 8192, 1024, {}),
    ("original", 512, 1024, {"num_iter": 5000}),
])
def test_cancel_inside_a_long_layer(tmp_path, optimizer, out, n, options):
    model = _model(str(tmp_path), out, n)
    opts = ConvertOptions(optimizer=optimizer, optimizer_options=dict(options),
                          calibration_data=_calibration(str(tmp_path), out, n))
    layers_done, inner = _run_and_cancel(tmp_path, model, opts)
    assert layers_done == [], "the layer finished: the cancel was not inside it"
    assert inner and all(0 <= f < 1 for f in inner) and inner == sorted(inner), inner


def test_cancel_rtn_between_layers(tmp_path):
    """Round-to-nearest has no loop inside a layer: the check between tensors stops it."""
    model = _model(str(tmp_path), 1024, 1024, layers=40)
    layers_done, _ = _run_and_cancel(tmp_path, model, ConvertOptions(optimizer="rtn"), sync_on_layer_done=True)
    assert 1 <= len(layers_done) < 40, layers_done


def test_checkpoint_is_rate_limited_and_scoped():
    calls = []
    checkpoint(0.5)  # outside a scope: nothing happens
    with checkpoint_scope(lambda: calls.append("check"), lambda f: calls.append(f), interval=3600):
        for i in range(1000):
            checkpoint((i + 1) / 1000)
    assert calls == [0.001, "check"]  # the first call, then nothing for an hour
    calls.clear()
    with checkpoint_scope(lambda: None, calls.append, interval=0):
        checkpoint(0.5)
        with progress_span(0.5, 1.0):
            checkpoint(0.0)  # maps to 0.5: not more than already reported
            checkpoint(0.5)  # 0.75
            checkpoint(1.0)  # 1.0
        checkpoint(0.2)  # progress never goes back
    assert calls == [0.5, 0.75, 1.0]


def test_a_call_that_cannot_check_is_abandoned_on_cancel():
    """``interruptible``: one long call (a LAPACK factorization) runs in a worker while the caller keeps
    checking; Cancel is raised at once and the call finishes in the background, its result dropped."""
    from convert_to_quant.quant_core.checkpoint import interruptible
    release, started, finished = threading.Event(), threading.Event(), threading.Event()
    cancel = threading.Event()

    def long_call(x):
        started.set()
        release.wait(60)  # stands for seconds of LAPACK that no checkpoint can interrupt
        finished.set()
        return x * 2

    def check():
        if cancel.is_set():
            raise ConversionCancelled("cancelled")

    release.set()
    assert interruptible(long_call, 4) == 8  # outside a scope: a plain call, with its result
    release.clear()
    finished.clear()
    started.clear()
    with checkpoint_scope(check):
        threading.Thread(target=lambda: (started.wait(60), cancel.set()), daemon=True).start()
        with pytest.raises(ConversionCancelled):
            interruptible(long_call, 5)
    assert not finished.is_set()  # raised while the call was still running
    release.set()
    assert finished.wait(60)
    # errors of the call reach the caller
    with checkpoint_scope(lambda: None):
        with pytest.raises(ZeroDivisionError):
            interruptible(lambda: 1 / 0)


def test_wide_cpu_factorization_is_interruptible(monkeypatch):
    """GPTQ/QuIP's inverse Cholesky of a wide Hessian on the CPU goes through ``interruptible`` inside a
    cancellable conversion (and stays a plain call otherwise), with the same result."""
    from convert_to_quant.quant_core.optimizers import gptq
    calls = []
    real = gptq.interruptible
    monkeypatch.setattr(gptq, "interruptible", lambda fn, *a: calls.append(fn) or real(fn, *a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, gptq.INTERRUPTIBLE_MIN_WIDTH, generator=g, dtype=torch.float64)
    h = (x.T @ x).float()
    plain = gptq.inverse_cholesky(h)
    assert calls == []
    with checkpoint_scope(lambda: None):
        wrapped = gptq.inverse_cholesky(h)
        small = gptq.inverse_cholesky(h[:64, :64].contiguous())
    assert calls == [gptq._inverse_cholesky]  # the narrow one stays a plain call
    assert torch.equal(plain[0], wrapped[0]) and plain[1] == wrapped[1]
    assert small[0].shape == (64, 64)
