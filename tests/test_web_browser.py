"""The web extension in a real browser: headless Chromium (Debian's, driven by Playwright) against the real
ComfyUI server with this pack.

Checks that the extension loads without errors of its own, that the Load Weights node shows what the
server route reads from the header, that after a run the Quality Report node renders an SQNR chart and a
sortable table, and that the example workflows load in the frontend. A screenshot is saved under the
test's tmp dir (and copied to $CTQ_SCREENSHOT_DIR when set; docs/quality_report.png comes from there).

Run as a script to regenerate ``example_workflows/*.json`` (UI format) from ``example_workflows/api``:
``python tests/test_web_browser.py --export-examples``.
"""
import copy
import json
import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfy_helpers import (REPO, SKIP_REASON, ComfyServer, comfy_env, save_tensors,  # noqa: E402
                           wan21_state_dict)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLES = os.path.join(REPO, "example_workflows")
EXT_URL = "/extensions/convert_to_quant/"
MODEL = "wan_tiny.safetensors"


def _browser_skip():
    if comfy_env() is None:
        return SKIP_REASON
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs Playwright (pip install playwright; the browser itself is the system chromium)"
    if not os.path.exists(CHROMIUM):
        return f"needs Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


def start_server(base):
    save_tensors(os.path.join(base, "models", "diffusion_models", MODEL), wan21_state_dict())
    os.makedirs(os.path.join(base, "user", "default"), exist_ok=True)
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)  # no template dialog over the graph
    return ComfyServer(base)


class Page:
    """A Chromium page on the server that records errors and never leaves 127.0.0.1."""

    def __init__(self, pw, server):
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": 1600, "height": 1000})
        self.errors, self.console_errors, self.bad_responses, self.ext_responses = [], [], [], []
        origin = server.url
        self.page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(origin) else r.abort())
        self.page.on("pageerror", lambda e: self.errors.append(f"{e}\n{e.stack}"))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

        def on_response(r):
            if EXT_URL in r.url:
                self.ext_responses.append((r.status, r.url))
            if r.status >= 400:
                self.bad_responses.append((r.status, r.url))
        self.page.on("response", on_response)
        self.page.goto(server.url, wait_until="load")
        self.page.wait_for_function(
            "() => window.app && app.graph && app.extensions.some(e => e.name === 'convert_to_quant.nodes')",
            timeout=90000)

    def ours(self, items):
        return [x for x in items if "convert_to_quant" in str(x)]

    def close(self):
        self.browser.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    reason = _browser_skip()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    srv = start_server(str(tmp_path_factory.mktemp("comfy_web")))
    try:
        with sync_playwright() as pw:
            p = Page(pw, srv)
            yield p
            p.close()
    finally:
        srv.stop()


def load_api(name):
    with open(os.path.join(EXAMPLES, "api", name + ".json")) as f:
        return json.load(f)


def test_extension_loads_without_errors(page):
    assert page.ext_responses and all(s == 200 for s, _ in page.ext_responses), page.ext_responses
    assert not page.ours(page.errors), page.errors
    assert not page.ours(page.console_errors), page.console_errors
    assert not page.ours(page.bad_responses), page.bad_responses


def test_report_widget_renders_chart_and_sortable_table(page, tmp_path):
    wf = load_api("convert_and_save")
    wf["1"]["inputs"]["weights"] = f"diffusion_models/{MODEL}"
    wf["2"]["inputs"]["device"] = "cpu"
    wf["2"]["inputs"]["quality_threshold"] = 43.0  # a few layers below it: red bars and rows
    wf["5"]["inputs"]["filename"] = "ctq/browser_test_int8.safetensors"
    errors_before = len(page.errors)
    pg = page.page
    pg.evaluate("async (wf) => { await app.loadApiJson(wf, 'convert_and_save'); }", wf)
    # Load Weights shows family / layers / size from the server route
    pg.wait_for_function("() => document.querySelector('.ctq-weights-info')?.dataset.state === 'ok'", timeout=30000)
    info = pg.evaluate("() => document.querySelector('.ctq-weights-info').textContent")
    assert "family: wan" in info and "26 linear layers, 20 to quantize" in info, info
    pg.evaluate("async () => { await app.queuePrompt(0, 1); }")
    pg.wait_for_function("() => Number(document.querySelector('.ctq-chart')?.dataset.bars || 0) > 0", timeout=120000)
    assert pg.evaluate("() => document.querySelector('.ctq-chart').dataset.bars") == "20"
    # the canvas really has bars drawn: count blue and red pixels
    colors = pg.evaluate("""() => {
        const c = document.querySelector('.ctq-chart'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0, red = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i] === 0x50 && d[i + 1] === 0xaa && d[i + 2] === 0xff) blue++;
            if (d[i] === 0xeb && d[i + 1] === 0x50 && d[i + 2] === 0x50) red++;
        }
        return {blue, red};
    }""")
    assert colors["blue"] > 500 and colors["red"] > 20, colors
    assert pg.evaluate("() => document.querySelectorAll('.ctq-row').length") == 26
    summary = pg.evaluate("() => document.querySelector('.ctq-summary').textContent")
    assert "layers quantized: 20" in summary, summary
    # sort by SQNR (click the header twice: ascending, then descending)
    header = pg.locator(".ctq-table th[data-key='sqnr_db']")
    values = []
    for _ in range(2):
        header.click()
        cells = pg.evaluate("() => [...document.querySelectorAll('.ctq-row')].map(r => r.children[3].textContent)")
        values.append([float(v) for v in cells if v])
    assert len(values[0]) == 20 and values[0] == sorted(values[0]) and values[1] == sorted(values[1], reverse=True)
    header.click()  # back to ascending for the screenshot: the worst layers on top
    pg.evaluate("""() => {
        const pos = {1: [20, 60], 2: [360, 60], 3: [800, 60], 4: [20, 300], 5: [360, 600]};
        for (const n of app.graph._nodes) { if (pos[n.id]) n.pos = pos[n.id]; }
        app.graph.getNodeById(3).setSize([640, 500]);
        app.graph.getNodeById(4).setSize([320, 240]);
        app.canvas.deselectAll?.();
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [10, 10]; app.canvas.setDirty(true, true);
    }""")
    pg.wait_for_timeout(500)
    shot = tmp_path / "quality_report.png"
    pg.screenshot(path=str(shot))
    assert shot.stat().st_size > 20000
    if os.environ.get("CTQ_SCREENSHOT_DIR"):
        shutil.copy(shot, os.path.join(os.environ["CTQ_SCREENSHOT_DIR"], "quality_report.png"))
    assert page.errors[errors_before:] == [], page.errors[errors_before:]
    assert not page.ours(page.console_errors) and not page.ours(page.bad_responses)


@pytest.mark.parametrize("name", ["convert_and_save", "load_and_sample_with_lora", "quantize_on_the_fly"])
def test_example_workflow_loads_in_frontend(page, name):
    """The UI-format example (what the template browser opens) has every node type registered, the same
    nodes as its API twin, and links the frontend accepts."""
    with open(os.path.join(EXAMPLES, name + ".json")) as f:
        ui = json.load(f)
    api = load_api(name)
    pg = page.page
    res = pg.evaluate("""async (wf) => {
        await app.loadGraphData(wf, true, true, 'example');
        const nodes = app.graph._nodes;
        return {types: nodes.map(n => n.type), missing: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
                prompt: (await app.graphToPrompt()).output};
    }""", ui)
    assert not res["missing"], res["missing"]
    assert sorted(res["types"]) == sorted(n["class_type"] for n in api.values())
    # the frontend turns the UI workflow back into the same API prompt (inputs and links)
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in res["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want


# ------------------------------------------------------------------------------------------------
# regenerate the UI-format examples from the API ones (a development tool, not a test)
# ------------------------------------------------------------------------------------------------
def export_examples():
    import tempfile
    from playwright.sync_api import sync_playwright
    srv = start_server(tempfile.mkdtemp(prefix="ctq-export-"))
    try:
        with sync_playwright() as pw:
            p = Page(pw, srv)
            for fname in sorted(os.listdir(os.path.join(EXAMPLES, "api"))):
                name = fname[:-len(".json")]
                wf = load_api(name)
                ui = p.page.evaluate("""async ([wf, name]) => {
                    await app.loadApiJson(wf, name);
                    for (const n of app.graph._nodes) {
                        const t = wf[String(n.id)]?._meta?.title; if (t) n.title = t;
                        for (const w of n.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
                    }
                    return app.graph.serialize();
                }""", [copy.deepcopy(wf), name])
                with open(os.path.join(EXAMPLES, fname), "w") as f:
                    json.dump(ui, f, indent=1)
                    f.write("\n")
                print("wrote", os.path.join(EXAMPLES, fname))
            p.close()
    finally:
        srv.stop()


if __name__ == "__main__":
    if "--export-examples" in sys.argv:
        export_examples()
