"""Helpers for tests against a real ComfyUI (COMFYUI_DIR / COMFYUI_PYTHON): start and stop a server with
this node pack, drive it through its HTTP API, and build small models of real ComfyUI architectures.

The server runs with ``--base-directory`` pointing at a fresh temporary folder, so models, outputs and
custom nodes of the test never touch the ComfyUI checkout. Its ``custom_nodes`` holds a symlink to this
repository and a tiny test-only node pack (``ctq_test_nodes``) that provides CONDITIONING from a seed --
the small generated models have no text encoder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "convert_to_quant"

# every node this pack registers (the contract the object_info test checks)
OUR_NODES = ("QuantLoadWeights", "QuantMergeLoRA", "QuantQuantize", "QuantQualityReport", "QuantSave",
             "QuantDiffusionModelLoader", "QuantCLIPLoader", "QuantizeModelOnTheFly", "QuantCalibrationCapture")


def comfy_env():
    """(COMFYUI_DIR, COMFYUI_PYTHON) or None when either is unset or missing."""
    d, py = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not d or not py or not os.path.isfile(os.path.join(d, "main.py")) or not os.path.exists(py):
        return None
    return d, py


SKIP_REASON = ("needs a real ComfyUI: set COMFYUI_DIR (a ComfyUI source checkout) and COMFYUI_PYTHON (a python "
               "with its requirements) -- see docs/NODES.md")


def run_check_script(script: str, checks, prefix: str, timeout: int = 900) -> Dict[str, dict]:
    """Run ``script`` (a test file whose ``__main__`` runs named checks inside ComfyUI) with COMFYUI_PYTHON
    in the ComfyUI folder; its ``<prefix>{json}`` lines become ``{check: result}`` (plus ``_stderr``)."""
    import pytest
    comfy_dir, python = comfy_env()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["COMFYUI_DIR"] = comfy_dir
    proc = subprocess.run([python, os.path.abspath(script), *checks], cwd=comfy_dir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out: Dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(prefix):
            r = json.loads(line[len(prefix):])
            out[r["check"]] = r
    if not out:
        pytest.fail(f"check runner produced no results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    out["_stderr"] = proc.stderr
    return out


def load_pack_inside_comfyui():
    """For the check scripts, inside ComfyUI's python: ComfyUI from COMFYUI_DIR (the working folder, CPU
    mode, no argument parsing) and this repository imported as the package ``convert_to_quant`` by file
    location, as ComfyUI imports a custom node. Returns the package."""
    import importlib.util
    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.chdir(comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pkg
    spec.loader.exec_module(pkg)
    assert pkg.NODE_CLASS_MAPPINGS, "nodes did not register"
    return pkg


def check_detail(results: Dict[str, dict], name: str):
    """The detail of check ``name`` from ``run_check_script``; fails the test if it did not run or failed."""
    r = results.get(name)
    assert r is not None, f"check {name} did not run:\n{results['_stderr'][-4000:]}"
    assert r["ok"], f"{name} failed:\n{r.get('error')}"
    return r["detail"]


# ------------------------------------------------------------------------------------------------
# a test-only node pack: CONDITIONING without a text encoder
# ------------------------------------------------------------------------------------------------
TEST_NODES_SOURCE = '''
import torch


class CTQTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                             "dim": ("INT", {"default": 4096, "min": 1, "max": 16384})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, dim):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"CTQTestConditioning": CTQTestConditioning}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server on 127.0.0.1 with this pack; ``base`` is its base directory."""

    def __init__(self, base: str, extra_args=(), startup_timeout: float = 180.0):
        env = comfy_env()
        if env is None:
            raise RuntimeError(SKIP_REASON)
        self.comfy_dir, self.python = env
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        nodes_dir = os.path.join(base, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        link = os.path.join(nodes_dir, PACK_NAME)
        if not os.path.lexists(link):
            os.symlink(REPO, link)
        test_pack = os.path.join(nodes_dir, "ctq_test_nodes")
        os.makedirs(test_pack, exist_ok=True)
        with open(os.path.join(test_pack, "__init__.py"), "w") as f:
            f.write(TEST_NODES_SOURCE)
        for sub in ("diffusion_models", "loras", "text_encoders", "checkpoints"):
            os.makedirs(os.path.join(base, "models", sub), exist_ok=True)
        self.log_path = os.path.join(base, "server.log")
        env_vars = dict(os.environ)
        env_vars.pop("TRITON_INTERPRET", None)  # pytest sets it for in-process kernel tests only
        env_vars.pop("PYTHONPATH", None)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", base, "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               *extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env_vars, start_new_session=True)
        self._wait_up(startup_timeout)

    def _wait_up(self, timeout: float):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # --- HTTP ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def queue(self, prompt: Dict) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240.0) -> Dict:
        """The prompt's history entry once it finished (success or error)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_tail()}")

    def run(self, prompt: Dict, timeout: float = 240.0) -> Dict:
        entry = self.wait(self.queue(prompt), timeout)
        return entry

    def interrupt(self):
        self.request("POST", "/interrupt", {})

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    # --- folders ------------------------------------------------------------------------------
    def models(self, *parts) -> str:
        return os.path.join(self.base, "models", *parts)

    def output(self, *parts) -> str:
        return os.path.join(self.base, "output", *parts)


class PromptRejected(Exception):
    def __init__(self, status, body):
        super().__init__(f"POST /prompt rejected ({status}): {body}")
        self.status, self.body = status, body


def status_messages(entry: Dict):
    return entry.get("status", {}).get("messages", [])


def execution_error(entry: Dict) -> Optional[Dict]:
    for kind, data in status_messages(entry):
        if kind == "execution_error":
            return data
    return None


def ui_outputs(entry: Dict, node_id: str) -> Dict:
    return entry.get("outputs", {}).get(node_id, {})


def read_latent(path: str) -> torch.Tensor:
    from convert_to_quant.quant_core.safetensors_io import load_file
    return load_file(path)["latent_tensor"].float()


def latest_latent(output_dir: str, prefix: str) -> str:
    d = os.path.join(output_dir, "latents")
    rx = re.compile(re.escape(prefix) + r"_\d+_\.latent")
    names = sorted(n for n in os.listdir(d) if rx.fullmatch(n))
    if not names:
        raise FileNotFoundError(f"no latent {prefix}* in {d}")
    return os.path.join(d, names[-1])


# ------------------------------------------------------------------------------------------------
# small models of a real ComfyUI architecture: Wan 2.1 text-to-video
# ------------------------------------------------------------------------------------------------
def wan21_state_dict(dim: int = 256, ffn_dim: int = 512, blocks: int = 2, text_dim: int = 4096, in_dim: int = 16,
                     freq_dim: int = 256, seed: int = 0, dtype=torch.bfloat16) -> Dict[str, torch.Tensor]:
    """Wan 2.1 T2V keys and shapes as ComfyUI's ``WanModel`` has them; ComfyUI detects dim (from
    ``head.modulation``), ffn_dim and the block count from these weights. Linear weights ~ N(0, 1/in)."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return (torch.randn(o, i, generator=g) / i ** 0.5).to(dtype)

    def vec(n, scale=0.02, center=0.0):
        return (center + scale * torch.randn(n, generator=g)).to(dtype)

    sd = {"patch_embedding.weight": (torch.randn(dim, in_dim, 1, 2, 2, generator=g) / (in_dim * 4) ** 0.5).to(dtype),
          "patch_embedding.bias": vec(dim),
          "text_embedding.0.weight": lin(dim, text_dim), "text_embedding.0.bias": vec(dim),
          "text_embedding.2.weight": lin(dim, dim), "text_embedding.2.bias": vec(dim),
          "time_embedding.0.weight": lin(dim, freq_dim), "time_embedding.0.bias": vec(dim),
          "time_embedding.2.weight": lin(dim, dim), "time_embedding.2.bias": vec(dim),
          "time_projection.1.weight": lin(6 * dim, dim), "time_projection.1.bias": vec(6 * dim)}
    for i in range(blocks):
        p = f"blocks.{i}."
        sd[p + "modulation"] = (torch.randn(1, 6, dim, generator=g) / dim ** 0.5).to(dtype)
        for att in ("self_attn", "cross_attn"):
            for n in ("q", "k", "v", "o"):
                sd[f"{p}{att}.{n}.weight"] = lin(dim, dim)
                sd[f"{p}{att}.{n}.bias"] = vec(dim)
            sd[f"{p}{att}.norm_q.weight"] = vec(dim, 0.1, 1.0)
            sd[f"{p}{att}.norm_k.weight"] = vec(dim, 0.1, 1.0)
        sd[p + "norm3.weight"] = vec(dim, 0.1, 1.0)
        sd[p + "norm3.bias"] = vec(dim)
        sd[p + "ffn.0.weight"] = lin(ffn_dim, dim)
        sd[p + "ffn.0.bias"] = vec(ffn_dim)
        sd[p + "ffn.2.weight"] = lin(dim, ffn_dim)
        sd[p + "ffn.2.bias"] = vec(dim)
    sd["head.modulation"] = (torch.randn(1, 2, dim, generator=g) / dim ** 0.5).to(dtype)
    sd["head.head.weight"] = lin(in_dim * 4, dim)
    sd["head.head.bias"] = vec(in_dim * 4)
    return sd


WAN_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                    "ffn.0", "ffn.2")


def wan21_lora(dim: int = 256, ffn_dim: int = 512, blocks: int = 2, rank: int = 8, alpha: float = 4.0,
               scale: float = 0.5, seed: int = 1, dtype=torch.bfloat16) -> Dict[str, torch.Tensor]:
    """A PEFT-style LoRA (``diffusion_model.<layer>.lora_A/lora_B.weight`` + ``.alpha``) for
    ``wan21_state_dict`` with a clearly visible effect (B is not zero)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"ffn.0": (ffn_dim, dim), "ffn.2": (dim, ffn_dim)}
    out = {}
    for i in range(blocks):
        for t in WAN_LORA_TARGETS:
            o, n = shapes.get(t, (dim, dim))
            base = f"diffusion_model.blocks.{i}.{t}"
            out[base + ".lora_A.weight"] = (torch.randn(rank, n, generator=g) / n ** 0.5).to(dtype)
            out[base + ".lora_B.weight"] = (torch.randn(o, rank, generator=g) * scale / rank ** 0.5).to(dtype)
            out[base + ".alpha"] = torch.tensor(alpha)
    return out


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata=None) -> str:
    from convert_to_quant.quant_core.safetensors_io import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return save_file(tensors, path, metadata=metadata)


# ------------------------------------------------------------------------------------------------
# API prompts
# ------------------------------------------------------------------------------------------------
def sample_nodes(model_ref, prefix: str, seed: int = 7, steps: int = 1, start: int = 100) -> Dict[str, Dict]:
    """Nodes that run ``steps`` sampling steps of a Wan video latent (64x64, 1 frame) with test
    conditioning and save the latent as ``latents/<prefix>*.latent``. ``model_ref`` = [node id, output]."""
    s = str(start)
    return {
        s: {"class_type": "CTQTestConditioning", "inputs": {"seed": 11, "tokens": 8, "dim": 4096}},
        str(start + 1): {"class_type": "CTQTestConditioning", "inputs": {"seed": 12, "tokens": 8, "dim": 4096}},
        str(start + 2): {"class_type": "EmptyHunyuanLatentVideo",
                         "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}},
        str(start + 3): {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": [s, 0], "negative": [str(start + 1), 0],
            "latent_image": [str(start + 2), 0], "denoise": 1.0}},
        str(start + 4): {"class_type": "SaveLatent", "inputs": {"samples": [str(start + 3), 0],
                                                                "filename_prefix": f"latents/{prefix}"}},
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def clean_dir(path: str):
    shutil.rmtree(path, ignore_errors=True)

