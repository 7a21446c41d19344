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
from workflow_schema import workflow_schema_problems  # noqa: E402

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
        self.dialogs = []  # window.alert / confirm / prompt: recorded and dismissed
        self.page.on("dialog", lambda d: (self.dialogs.append(f"{d.type}: {d.message}"), d.dismiss()))
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

    def alerts(self):
        """Text of the frontend's toasts and open dialogs (a workflow the schema refuses shows
        "Invalid workflow against zod schema" as a toast alert)."""
        return self.page.evaluate("""() => [...document.querySelectorAll(
            '.p-toast-message, .p-dialog, [role=alertdialog]')].map(e => e.innerText.trim()).filter(Boolean)""")

    def clear_alerts(self):
        self.page.evaluate("""() => { for (const b of document.querySelectorAll(
            '.p-toast-message .p-toast-close-button, .p-dialog .p-dialog-close-button')) b.click(); }""")
        self.page.wait_for_function("""() => !document.querySelector('.p-toast-message, .p-dialog')""",
                                    timeout=10000)

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
    """The UI-format example (what drag-and-drop and the template browser open) loads through the
    frontend's own validation without an alert, dialog or page error; it has every node type registered,
    the same nodes as its API twin, and links the frontend accepts."""
    with open(os.path.join(EXAMPLES, name + ".json")) as f:
        ui = json.load(f)
    api = load_api(name)
    pg = page.page
    page.clear_alerts()
    errors_before, dialogs_before = len(page.errors), len(page.dialogs)
    res = pg.evaluate("""async (wf) => {
        await app.loadGraphData(wf, true, true, 'example');
        const nodes = app.graph._nodes;
        return {types: nodes.map(n => n.type), missing: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
                prompt: (await app.graphToPrompt()).output,
                validation: app.extensionManager?.setting?.get?.('Comfy.Validation.Workflows')};
    }""", ui)
    pg.wait_for_timeout(500)  # toasts are added on the next tick
    assert res["validation"] is not False, "the frontend's workflow validation is off: nothing would be checked"
    assert page.alerts() == [] and page.dialogs[dialogs_before:] == [], (page.alerts(), page.dialogs)
    assert page.errors[errors_before:] == [], page.errors[errors_before:]
    assert not res["missing"], res["missing"]
    assert sorted(res["types"]) == sorted(n["class_type"] for n in api.values())
    # the frontend turns the UI workflow back into the same API prompt (inputs and links)
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in res["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want


def test_invalid_workflow_alert_is_seen(page):
    """The check above can fail: a null the schema refuses shows the frontend's alert."""
    with open(os.path.join(EXAMPLES, "convert_and_save.json")) as f:
        ui = json.load(f)
    ui["floatingLinks"] = None
    page.clear_alerts()
    page.page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'bad'); }", ui)
    page.page.wait_for_function("() => document.querySelector('.p-toast-message')", timeout=10000)
    assert any("zod schema" in a for a in page.alerts()), page.alerts()
    page.clear_alerts()


def test_shipped_layout_has_no_overlap_after_a_run(page):
    """The shipped convert_and_save layout, run: the Quality Report grows to show its chart and table, the
    Save node shows where it saved -- no node may then cover another."""
    with open(os.path.join(EXAMPLES, "convert_and_save.json")) as f:
        ui = json.load(f)
    pg = page.page
    page.clear_alerts()
    errors_before, dialogs_before = len(page.errors), len(page.dialogs)
    pg.evaluate("""async (wf) => {
        await app.loadGraphData(wf, true, true, 'convert_and_save');
        const set = (id, name, v) => { app.graph.getNodeById(id).widgets.find(w => w.name === name).value = v; };
        set(1, 'weights', 'diffusion_models/%s');
        set(2, 'device', 'cpu');
        set(5, 'filename', 'ctq/layout_test_int8.safetensors');
        await app.queuePrompt(0, 1);
    }""" % MODEL, ui)
    pg.wait_for_function("() => Number(document.querySelector('.ctq-chart')?.dataset.bars || 0) > 0", timeout=120000)
    pg.wait_for_function("() => document.querySelector('.ctq-save-info')?.textContent.startsWith('saved ')",
                         timeout=60000)
    saved = pg.evaluate("() => document.querySelector('.ctq-save-info').textContent")
    assert saved.startswith("saved diffusion_models/ctq/layout_test_int8.safetensors ("), saved
    pg.wait_for_timeout(500)
    boxes = pg.evaluate("""() => app.graph._nodes.map(n => {
        const b = n.getBounding(); return {id: n.id, type: n.type, x0: b[0], y0: b[1], x1: b[0] + b[2], y1: b[1] + b[3]};
    })""")
    overlaps = [(a["type"], b["type"]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]]
    assert overlaps == [], (overlaps, boxes)
    assert page.alerts() == [] and page.dialogs[dialogs_before:] == [], (page.alerts(), page.dialogs)
    assert page.errors[errors_before:] == [], page.errors[errors_before:]


# ------------------------------------------------------------------------------------------------
# regenerate the UI-format examples from the API ones (a development tool, not a test)
# ------------------------------------------------------------------------------------------------
# sizes each node gets in the shipped layout: what it grows to after a run, so nothing overlaps then
MIN_NODE_SIZES = {"QuantQualityReport": [560, 440], "QuantSave": [400, 210], "PreviewImage": [420, 300],
                  "QuantQuantize": [400, 470], "QuantLoadWeights": [340, 170], "CLIPTextEncode": [400, 200]}
LAYOUT_GAP = [80, 80]  # between columns; between nodes of a column (the title bar sits above a node's pos)


def drop_nulls_the_schema_refuses(ui):
    """The graph's serializer leaves some fields undefined; Playwright and old exports turned them into
    ``null``, which the frontend's schema refuses (``Invalid workflow against zod schema``)."""
    ui = {k: v for k, v in ui.items() if not (v is None and k in ("floatingLinks", "groups", "definitions",
                                                                   "models", "subgraphs"))}
    if isinstance(ui.get("extra"), dict):
        ui["extra"] = {k: v for k, v in ui["extra"].items() if v is not None}
    for n in ui.get("nodes", []):
        for slot in (n.get("inputs") or []) + (n.get("outputs") or []):
            if slot.get("slot_index", 0) is None:
                del slot["slot_index"]
    return ui


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
                ui = p.page.evaluate("""async ([wf, name, minSizes, gap]) => {
                    await app.loadApiJson(wf, name);
                    for (const n of app.graph._nodes) {
                        const t = wf[String(n.id)]?._meta?.title; if (t) n.title = t;
                        for (const w of n.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
                    }
                    // layout: one column per depth in the graph; each node at least as large as it grows
                    // after a run (the Quality Report's chart and table, the Save node's text)
                    const depth = {};
                    const d = (n) => {
                        if (depth[n.id] !== undefined) return depth[n.id];
                        depth[n.id] = 0;
                        let v = 0;
                        for (const inp of n.inputs || []) {
                            if (inp.link == null) continue;
                            const l = app.graph.links[inp.link] ?? app.graph.links.get?.(inp.link);
                            v = Math.max(v, d(app.graph.getNodeById(l.origin_id)) + 1);
                        }
                        return (depth[n.id] = v);
                    };
                    const nodes = [...app.graph._nodes].sort((a, b) => a.id - b.id);
                    const cols = [];
                    for (const n of nodes) {
                        const min = n.computeSize(), want = minSizes[n.type] || [0, 0];
                        n.setSize([Math.max(min[0], want[0]), Math.max(min[1], want[1])]);
                        (cols[d(n)] ||= []).push(n);
                    }
                    let x = 40;
                    for (const col of cols) {
                        if (!col) continue;
                        let y = 60;
                        for (const n of col) { n.pos = [x, y]; y += n.size[1] + gap[1]; }
                        x += Math.max(...col.map((n) => n.size[0])) + gap[0];
                    }
                    app.graph.setDirtyCanvas(true, true);
                    // through JSON: keys the graph leaves undefined are dropped, not sent back as null
                    return JSON.parse(JSON.stringify(app.graph.serialize()));
                }""", [copy.deepcopy(wf), name, MIN_NODE_SIZES, LAYOUT_GAP])
                ui = drop_nulls_the_schema_refuses(ui)
                problems = workflow_schema_problems(ui)
                if problems:
                    raise SystemExit(f"{name}: the exported workflow breaks the frontend's schema: {problems}")
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
