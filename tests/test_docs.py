"""Every ```python block of docs/API.md runs (in order, sharing one namespace, in a scratch folder)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(path):
    return re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), flags=re.S)


def test_api_doc_examples_run(tmp_path, minilm_path, monkeypatch):
    pytest.importorskip("transformers")
    code = blocks(os.path.join(ROOT, "docs", "API.md"))
    assert len(code) >= 6
    monkeypatch.chdir(tmp_path)
    ns = {"MINILM": minilm_path}
    for i, src in enumerate(code):
        try:
            exec(compile(src, f"docs/API.md block {i + 1}", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/API.md block {i + 1} failed: {type(e).__name__}: {e}") from e
    assert os.path.exists(tmp_path / "minilm_int8.safetensors")
    assert os.path.exists(tmp_path / "minilm_report.md")
