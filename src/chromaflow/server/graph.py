"""ComfyUI API-format graphs: validation with ComfyUI-shaped errors, and execution with caching.

validate() checks a graph against the node registry the way ComfyUI does (unknown nodes, missing inputs, bad
links, type mismatches, values out of range or not in a list) and reports `node_errors` per node. The Executor
runs only what the output nodes need and reuses a node's outputs from the previous prompt when its class, its
literal inputs and everything upstream are unchanged (a content signature), reporting those in execution_cached.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .nodes import NODES


class Interrupted(Exception):
    """The job was interrupted (POST /interrupt)."""


class GraphError(Exception):
    """A 400 for /prompt: ComfyUI's {"error": {...}, "node_errors": {...}}."""

    def __init__(self, kind: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(message)
        self.body = {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                     "node_errors": node_errors or {}}


def _error(kind: str, message: str, details: str = "", **extra) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _convert(kind, value, name: str, spec: dict, server):
    """Coerce a literal like ComfyUI (int('5') is fine, 'abc' is not) -> (value, error or None)."""
    config = {"input_name": name, "input_config": [kind if isinstance(kind, str) else "COMBO", spec],
              "received_value": value}
    if isinstance(kind, (list, tuple)) or callable(kind):
        options = kind(server) if callable(kind) else kind
        if value not in options:
            shown = ", ".join(map(str, options[:20])) + (", ..." if len(options) > 20 else "")
            return None, _error("value_not_in_list", "Value not in list",
                                f"{name}: {value!r} not in [{shown}]", **config)
        return value, None
    try:
        if kind == "INT":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind == "FLOAT":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind == "STRING":
            if not isinstance(value, (str, int, float)):
                raise ValueError
            value = str(value)
        elif kind == "BOOLEAN":
            if not isinstance(value, bool):
                raise ValueError
    except (TypeError, ValueError):
        return None, _error("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                            f"{name}, {value!r}", **config)
    if kind in ("INT", "FLOAT"):
        if "min" in spec and value < spec["min"]:
            return None, _error("value_smaller_than_min", f"Value {value} smaller than min of {spec['min']}",
                                f"{name}", **config)
        if "max" in spec and value > spec["max"]:
            return None, _error("value_bigger_than_max", f"Value {value} bigger than max of {spec['max']}",
                                f"{name}", **config)
    return value, None


def validate(prompt, server) -> tuple[list[str], dict]:
    """-> (output node ids that validated, node_errors). Raises GraphError when nothing can run."""
    if not isinstance(prompt, dict) or not prompt:
        raise GraphError("no_prompt", "No prompt provided", "the body needs a non-empty 'prompt' object")
    for nid, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise GraphError("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                             f"Node ID '#{nid}'")
        if node["class_type"] not in NODES:
            raise GraphError("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                             f"Node ID '#{nid}'")
        if not isinstance(node.get("inputs", {}), dict):
            raise GraphError("invalid_prompt", "Node inputs must be an object", f"Node ID '#{nid}'")
    outputs = [nid for nid, node in prompt.items() if NODES[node["class_type"]].output_node]
    if not outputs:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs",
                         "add an output node such as SaveImage or PreviewImage")
    verdict: dict[str, bool] = {}
    errors: dict[str, list] = {}

    def check(nid: str) -> bool:
        if nid in verdict:
            return verdict[nid]
        verdict[nid] = True  # a cycle reaches this again: reported below as a bad link, not recursion
        node = prompt[nid]
        spec = NODES[node["class_type"]]
        inputs, mine, ok, literals = node.get("inputs", {}), [], True, {}
        for name, (kind, config) in {**spec.required, **spec.optional}.items():
            if name not in inputs:
                if name in spec.required:
                    mine.append(_error("required_input_missing", "Required input is missing", name,
                                       input_name=name))
                continue
            value = inputs[name]
            if is_link(value):
                src = value[0]
                if src not in prompt or src == nid:
                    mine.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                       "[string, int] naming an existing node", f"{name}: {value}",
                                       input_name=name, received_value=value))
                    continue
                produced = NODES[prompt[src]["class_type"]].outputs
                got = produced[value[1]] if 0 <= value[1] < len(produced) else None
                if got != kind:
                    mine.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                       f"{name}, received_type({got}) mismatch input_type({kind})",
                                       input_name=name, received_type=got, linked_node=value))
                    continue
                ok = check(src) and ok
            elif kind in ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "GUIDER", "SAMPLER",
                          "SIGMAS", "NOISE"):
                mine.append(_error("bad_linked_input", f"{name} must be a link [node_id, output_index] to a {kind}",
                                   f"{name}: {value!r}", input_name=name, received_value=value))
            else:
                literals[name], problem = _convert(kind, value, name, config, server)
                if problem:
                    mine.append(problem)
        if not mine and spec.check is not None:
            message = spec.check(server.limits, literals)
            if message:
                mine.append(_error("custom_validation_failed", "Custom validation failed for node", message))
        if mine:
            errors[nid] = mine
        verdict[nid] = ok and not mine
        return verdict[nid]

    good = [nid for nid in outputs if check(nid)]
    node_errors = {nid: {"errors": errs, "dependent_outputs": [o for o in outputs if not verdict[o]],
                         "class_type": prompt[nid]["class_type"]} for nid, errs in errors.items()}
    if not good:
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                         "; ".join(f"{prompt[n]['class_type']} #{n}: {e['message']} ({e['details']})"
                                   for n, errs in errors.items() for e in errs), node_errors)
    return good, node_errors


@dataclass
class Context:
    """What a node function may use: the server's catalog and folders, the prompt being run, and the job's
    progress reporting and interrupt flag."""
    server: object
    job: object
    prompt: dict
    extra_pnginfo: dict
    node_id: str = ""
    on_step: Callable = lambda ctx, pipe, info: None  # progress reporting, set by the API layer

    @property
    def catalog(self):
        return self.server.catalog

    @property
    def folders(self):
        return self.server.folders

    def step_callback(self, pipe, stop_after: int | None = None):
        def callback(info):
            self.on_step(self, pipe, info)
            if self.job.interrupt.is_set():
                return False
            return stop_after is None or info.step + 1 < stop_after
        return callback

    def raise_if_interrupted(self):
        if self.job.interrupt.is_set():
            raise Interrupted


@dataclass
class Executor:
    """Runs graphs; the previous prompt's node outputs are reused by signature."""
    cache: dict = field(default_factory=dict)  # signature -> (outputs, ui)

    def run(self, prompt: dict, outputs: list[str], ctx: Context, emit: Callable[[str, dict], None]) -> dict:
        order, signature = [], {}

        def visit(nid: str) -> str:
            if nid in signature:
                return signature[nid]
            node = prompt[nid]
            parts = {k: (["link", visit(v[0]), v[1]] if is_link(v) else v) for k, v in node.get("inputs", {}).items()}
            signature[nid] = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
            order.append(nid)
            return signature[nid]

        for nid in outputs:
            visit(nid)
        cached = [nid for nid in order if signature[nid] in self.cache]
        emit("execution_cached", {"nodes": cached})
        values, ui, fresh = {}, {}, {}
        for nid in order:
            node = prompt[nid]
            sig = signature[nid]
            if sig in self.cache:
                values[nid], out_ui = self.cache[sig]
            else:
                spec = NODES[node["class_type"]]
                ctx.node_id = nid
                emit("executing", {"node": nid, "display_node": nid})
                kwargs = {k: values[v[0]][v[1]] if is_link(v) else v for k, v in node.get("inputs", {}).items()
                          if k in spec.required or k in spec.optional}
                kwargs = {k: _literal(spec, k, v) for k, v in kwargs.items()}
                result = spec.fn(ctx, **kwargs)
                out_ui = result.get("ui") if isinstance(result, dict) else None
                values[nid] = result.get("result", ()) if isinstance(result, dict) else result
                if out_ui is not None:
                    emit("executed", {"node": nid, "display_node": nid, "output": out_ui})
            fresh[sig] = (values[nid], out_ui)
            if out_ui is not None:
                ui[nid] = out_ui
        self.cache = fresh  # like ComfyUI's default cache: what the last prompt used
        return ui


def _literal(spec, name, value):
    """Literal INT / FLOAT inputs arrive as JSON numbers or strings; pass the converted value."""
    kind = {**spec.required, **spec.optional}[name][0]
    if kind == "INT" and not isinstance(value, int):
        return int(value)
    if kind == "FLOAT" and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    return value


def error_report(e: BaseException) -> dict:
    return {"exception_message": str(e), "exception_type": type(e).__name__,
            "traceback": traceback.format_exception(e)}
