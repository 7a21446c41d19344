"""Issue 15: every shipped UI workflow (``example_workflows/*.json``, what drag-and-drop and ComfyUI's template
browser open) passes the frontend's workflow schema (``workflow_schema``: the zod rules written out), so
it opens without "Invalid workflow against zod schema"; its nodes do not overlap in the shipped layout;
and it holds the same nodes and links as its API twin in ``example_workflows/api``. No ComfyUI needed."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workflow_schema import workflow_schema_problems  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(HERE), "example_workflows")
NAMES = sorted(n[:-5] for n in os.listdir(EXAMPLES) if n.endswith(".json"))
TITLE_H = 30  # LiteGraph draws a node's title bar above its pos


def _load(name, api=False):
    with open(os.path.join(EXAMPLES, "api" if api else "", name + ".json")) as f:
        return json.load(f)


def test_every_ui_workflow_has_an_api_twin():
    assert NAMES and NAMES == sorted(n[:-5] for n in os.listdir(os.path.join(EXAMPLES, "api")))


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_passes_the_frontend_schema(name):
    assert workflow_schema_problems(_load(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_nodes_do_not_overlap(name):
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in _load(name)["nodes"]]
    overlaps = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
    assert overlaps == []


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_matches_its_api_twin(name):
    ui, api = _load(name), _load(name, api=True)
    assert sorted((str(n["id"]), n["type"]) for n in ui["nodes"]) == sorted((k, v["class_type"]) for k, v in api.items())
    # every API link [source id, output] is a UI link into the same node
    ui_links = {(str(l[3]), str(l[1]), l[2]) for l in ui["links"]}
    api_links = {(k, str(v[0]), v[1]) for k, n in api.items() for v in n["inputs"].values()
                 if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)}
    assert api_links == ui_links


@pytest.mark.parametrize("bad, where", [
    (lambda w: w.update(floatingLinks=None), "workflow.floatingLinks: null"),
    (lambda w: w.update(definitions=None), "workflow.definitions: null"),
    (lambda w: w["extra"].update(reroutes=None), "extra.reroutes: null"),
    (lambda w: w["nodes"][0]["outputs"][0].update(slot_index=None), "nodes[0].outputs[0].slot_index: null"),
    (lambda w: w["nodes"][0].update(pos=[1, "x"]), "nodes[0].pos: invalid"),
    (lambda w: w["links"][0].pop(), "workflow.links: invalid"),
    (lambda w: w.pop("last_link_id"), "workflow.last_link_id: required"),
    (lambda w: w.update(id="not-a-uuid"), "workflow.id: invalid"),
])
def test_schema_rules_refuse_what_the_frontend_refuses(bad, where):
    wf = _load("convert_and_save")
    wf.setdefault("extra", {})
    bad(wf)
    problems = workflow_schema_problems(wf)
    assert len(problems) == 1 and problems[0].startswith(where), problems


def test_schema_rules_accept_what_the_frontend_accepts():
    wf = _load("convert_and_save")
    wf["extra"] = None  # nullable
    wf["config"] = None  # nullable
    wf["nodes"][0]["inputs"] = [{"name": "x", "type": "MODEL", "link": None, "slot_index": "0"}]
    wf["nodes"][0]["outputs"][0]["links"] = None  # nullable
    wf["id"] = "00000000-0000-0000-0000-000000000000"
    assert workflow_schema_problems(wf) == []
