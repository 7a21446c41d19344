"""The rules ComfyUI's frontend checks a UI workflow against before loading it (``zComfyWorkflow``, schema
version 0.4, in ``src/platform/workflow/validation/schemas/workflowSchema.ts`` of comfyui-frontend-package
1.28, zod 3.24), written out in Python so a plain test can check the shipped workflows without a browser.

A workflow that breaks one of them opens with "Invalid workflow against zod schema" in the frontend. zod's
``.optional()`` accepts a missing key but not ``null``; only fields marked ``.nullable()`` take ``null``
(``extra``, ``config``, an input's ``link``, an output's ``links``). Unknown keys pass (``.passthrough()``).
"""
from __future__ import annotations

import re
from typing import Callable, List

# zod 3.24's uuid check (any version nibble, case-insensitive)
UUID = re.compile(r"^[0-9a-fA-F]{8}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{12}$", re.I)

Check = Callable[[object], bool]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return _num(v) and float(v).is_integer()


def _str(v) -> bool:
    return isinstance(v, str)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _node_id(v) -> bool:
    return _int(v) or _str(v)


def _slot_index(v) -> bool:  # an integer, or a string that parses as one
    return _int(v) or (_str(v) and re.match(r"^\s*[+-]?\d", v) is not None)


def _data_type(v) -> bool:
    return _str(v) or _num(v) or (isinstance(v, list) and all(_str(x) for x in v))


def _vector2(v) -> bool:
    if isinstance(v, list):
        return len(v) == 2 and all(_num(x) for x in v)
    return isinstance(v, dict) and _num(v.get("0")) and _num(v.get("1"))


def _array_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _obj(v) -> bool:
    return isinstance(v, dict)


class _Problems:
    def __init__(self):
        self.items: List[str] = []

    def field(self, obj: dict, key: str, check: Check, where: str, required=False, nullable=False):
        if key not in obj:
            if required:
                self.items.append(f"{where}.{key}: required")
            return
        v = obj[key]
        if v is None:
            if not nullable:
                self.items.append(f"{where}.{key}: null where the schema wants a value or no key")
            return
        if not check(v):
            self.items.append(f"{where}.{key}: invalid value {v!r:.80}")


def _link_tuple(v) -> bool:
    return (isinstance(v, list) and len(v) == 6 and _num(v[0]) and _node_id(v[1]) and _slot_index(v[2])
            and _node_id(v[3]) and _slot_index(v[4]) and _data_type(v[5]))


def _link_object(p: _Problems, v, where):
    if not _obj(v):
        p.items.append(f"{where}: not an object")
        return
    p.field(v, "id", _num, where, required=True)
    p.field(v, "origin_id", _node_id, where, required=True)
    p.field(v, "origin_slot", _slot_index, where, required=True)
    p.field(v, "target_id", _node_id, where, required=True)
    p.field(v, "target_slot", _slot_index, where, required=True)
    p.field(v, "type", _data_type, where, required=True)
    p.field(v, "parentId", _num, where)


def _reroute(p: _Problems, v, where):
    if not _obj(v):
        p.items.append(f"{where}: not an object")
        return
    p.field(v, "id", _num, where, required=True)
    p.field(v, "parentId", _num, where)
    p.field(v, "pos", _vector2, where, required=True)
    p.field(v, "linkIds", _array_of(_num), where, nullable=True)  # .nullish()
    p.field(v, "floating", lambda f: _obj(f) and f.get("slotType") in ("input", "output"), where)


def _slot(p: _Problems, s, where, output: bool):
    if not _obj(s):
        p.items.append(f"{where}: not an object")
        return
    p.field(s, "name", _str, where, required=True)
    p.field(s, "type", _data_type, where, required=True)
    if output:
        p.field(s, "links", _array_of(_num), where, nullable=True)
    else:
        p.field(s, "link", _num, where, nullable=True)
    p.field(s, "slot_index", _slot_index, where)


def _node(p: _Problems, n, where):
    if not _obj(n):
        p.items.append(f"{where}: not an object")
        return
    p.field(n, "id", _node_id, where, required=True)
    p.field(n, "type", _str, where, required=True)
    p.field(n, "pos", _vector2, where, required=True)
    p.field(n, "size", _vector2, where, required=True)
    p.field(n, "flags", _obj, where, required=True)
    for k in ("collapsed", "pinned", "allow_interaction", "horizontal", "skip_repeated_outputs"):
        if _obj(n.get("flags")):
            p.field(n["flags"], k, _bool, where + ".flags")
    p.field(n, "order", _num, where, required=True)
    p.field(n, "mode", _num, where, required=True)
    for key, output in (("inputs", False), ("outputs", True)):
        p.field(n, key, lambda v: isinstance(v, list), where)
        for i, s in enumerate(n.get(key) or []):
            _slot(p, s, f"{where}.{key}[{i}]", output)
    p.field(n, "properties", _obj, where, required=True)
    if _obj(n.get("properties")):
        p.field(n["properties"], "Node name for S&R", _str, where + ".properties")
        p.field(n["properties"], "models", lambda v: isinstance(v, list), where + ".properties")
    p.field(n, "widgets_values", lambda v: isinstance(v, (list, dict)), where)
    p.field(n, "color", _str, where)
    p.field(n, "bgcolor", _str, where)


def _group(p: _Problems, g, where):
    if not _obj(g):
        p.items.append(f"{where}: not an object")
        return
    p.field(g, "id", _num, where)
    p.field(g, "title", _str, where, required=True)
    p.field(g, "bounding", lambda b: isinstance(b, list) and len(b) == 4 and all(_num(x) for x in b), where,
            required=True)
    p.field(g, "color", _str, where)
    p.field(g, "font_size", _num, where)
    p.field(g, "locked", _bool, where)


def workflow_schema_problems(wf) -> List[str]:
    """Everything in ``wf`` (a UI workflow, schema 0.4) that the frontend's zod schema refuses."""
    p = _Problems()
    if not _obj(wf):
        return ["workflow: not an object"]
    if wf.get("version") == 1:
        return ["workflow: schema version 1 is not what this pack ships (0.4)"]
    p.field(wf, "version", _num, "workflow", required=True)
    p.field(wf, "id", lambda v: _str(v) and UUID.match(v) is not None, "workflow")
    p.field(wf, "revision", _num, "workflow")
    p.field(wf, "last_node_id", _node_id, "workflow", required=True)
    p.field(wf, "last_link_id", _num, "workflow", required=True)
    p.field(wf, "nodes", lambda v: isinstance(v, list), "workflow", required=True)
    for i, n in enumerate(wf.get("nodes") or []):
        _node(p, n, f"nodes[{i}]")
    p.field(wf, "links", _array_of(_link_tuple), "workflow", required=True)
    p.field(wf, "floatingLinks", lambda v: isinstance(v, list), "workflow")
    for i, link in enumerate(wf.get("floatingLinks") or []):
        _link_object(p, link, f"floatingLinks[{i}]")
    p.field(wf, "groups", lambda v: isinstance(v, list), "workflow")
    for i, g in enumerate(wf.get("groups") or []):
        _group(p, g, f"groups[{i}]")
    p.field(wf, "config", _obj, "workflow", nullable=True)
    if _obj(wf.get("config")):
        p.field(wf["config"], "links_ontop", _bool, "config")
        p.field(wf["config"], "align_to_grid", _bool, "config")
    p.field(wf, "extra", _obj, "workflow", nullable=True)
    extra = wf.get("extra")
    if _obj(extra):
        p.field(extra, "ds", lambda d: _obj(d) and _num(d.get("scale")) and _vector2(d.get("offset")), "extra")
        p.field(extra, "frontendVersion", _str, "extra")
        p.field(extra, "linkExtensions", _array_of(lambda e: _obj(e) and _num(e.get("id"))
                                                   and _num(e.get("parentId"))), "extra")
        p.field(extra, "reroutes", lambda v: isinstance(v, list), "extra")
        for i, r in enumerate(extra.get("reroutes") or []):
            _reroute(p, r, f"extra.reroutes[{i}]")
    p.field(wf, "models", lambda v: isinstance(v, list), "workflow")
    p.field(wf, "definitions", lambda v: _obj(v) and isinstance(v.get("subgraphs"), list), "workflow")
    p.field(wf, "subgraphs", lambda v: isinstance(v, list), "workflow")
    return p.items
