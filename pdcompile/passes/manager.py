"""Runs a pipeline of graph passes over one phase graph.

Every pass is ``fn(gm, ctx: PassContext) -> PassResult``. Everything that is the same
for every pass lives here: skipping disabled passes,
timing and logging, dead-code elimination + lint after each pass (and one recompile at
the end), refreshing the fake-tensor metadata the next pass reads, graph dumps when
``PDCOMPILE_DUMP_DIR`` names a folder, the cost estimate for the report, and
re-raising a failure with the pass's name and the passes that ran before it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..phase import PassContext, PhaseSignature

logger = logging.getLogger(__name__)

DUMP_ENV = "PDCOMPILE_DUMP_DIR"


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the graph module (changed in place), how many sites it rewrote,
    a sentence for the report (what matched, or why nothing did), and the phase's new
    signature when the pass changed the graph's inputs (``None``: unchanged)."""

    gm: torch.fx.GraphModule
    matches: int
    detail: str = ""
    signature: PhaseSignature | None = None


@dataclass(frozen=True)
class GraphPass:
    name: str
    fn: Callable[[torch.fx.GraphModule, PassContext], PassResult]
    doc: str = ""


@dataclass
class PassRecord:
    name: str
    status: str  # "applied" | "no match" | "disabled"
    matches: int = 0
    detail: str = ""
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    cost_before: dict = field(default_factory=dict)
    cost_after: dict = field(default_factory=dict)


class PassError(RuntimeError):
    pass


def cleanup(gm: torch.fx.GraphModule) -> None:
    """DCE (in-place cache writes are impure and stay) and lint, after each pass that changed
    the graph. The Python code is generated once, after the last pass (``gm.recompile()``,
    a tenth of a second per pass on a 30-layer graph): passes read the graph, never run it."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()


# node.meta key: the target and argument nodes (by name) a node's "val" was computed from
_COMPUTED_FROM = "pdcompile_val_from"


def _dim(d):
    # a symbolic size by its sympy expression: hashed once and compared structurally, where
    # printing it (str) costs sympy's printer on every comparison
    return d.node.expr if isinstance(d, (torch.SymInt, torch.SymFloat, torch.SymBool)) else d


def _meta_key(val):
    """What later nodes and passes read of a value: shape, strides and offset (symbolic), dtype, device."""
    if isinstance(val, torch.Tensor):
        return ("t", tuple(map(_dim, val.shape)), tuple(map(_dim, val.stride())), _dim(val.storage_offset()),
                val.dtype, val.device)
    if isinstance(val, (list, tuple)):
        return tuple(_meta_key(v) for v in val)
    return ("v", _dim(val))


def _computed_from(node: torch.fx.Node) -> tuple:
    """Target and arguments, argument nodes by name (FX never gives a name out twice in a
    graph: a node rewired to another input, or retargeted, no longer matches its record)."""
    def name(a):
        return ("node", a.name) if isinstance(a, torch.fx.Node) else a
    return (node.target, map_aggregate(node.args, name), map_aggregate(node.kwargs, name))


def _inputs_key(node: torch.fx.Node) -> tuple:
    """Target and arguments, each argument node replaced by its value's metadata: all a fake
    kernel sees, so two nodes with equal keys compute equal values."""
    def key(a):
        return _meta_key(a.meta.get("val")) if isinstance(a, torch.fx.Node) else a
    return (node.target, map_aggregate(node.args, key), map_aggregate(node.kwargs, key))


def _writes_its_input(target) -> bool:
    """An in-place op (its result is one of its inputs, ``Tensor(a!)``)."""
    returns = getattr(getattr(target, "_schema", None), "returns", ())
    return any(r.alias_info is not None and r.alias_info.is_write for r in returns)


class _IncrementalProp(FakeTensorProp):
    """FakeTensorProp that recomputes only what a rewrite can have changed: nodes without a
    value, nodes whose target or arguments differ from those their value was computed from,
    weights whose shape or dtype changed, and users of a node whose recomputed value differs
    (shape, stride, dtype, device). Everything else keeps its fake tensor: the walk costs
    microseconds per untouched node.

    Of the nodes it recomputes, one with the same target and the same input values as one
    computed before in this walk takes that node's value: the layers of a decoder are one
    structure and a pass rewrites each the same way, so the fake kernel (1-15 ms per op with
    symbolic shapes on this machine) runs once per distinct rewrite, not once per layer.
    Such nodes share one fake tensor: what passes and backends read of a value (shape,
    stride, dtype, device) is the same, only the storage identity of a view differs. Not
    shared: in-place ops (their result is their own input), results holding unbacked
    (data-dependent) sizes, which are new symbols per node, and inputs holding constants."""

    def __init__(self, gm, mode):
        super().__init__(gm, mode)
        self.changed: set[torch.fx.Node] = set()
        self.computed: dict = {}  # _inputs_key -> (result, meta val) of a node computed in this walk

    def _attr_changed(self, n: torch.fx.Node) -> bool:
        """A weight whose shape or dtype is not its value's (a pass replaced the attribute)."""
        attr = self.fetch_attr(n.target)
        val = n.meta["val"]
        return not (isinstance(attr, torch.Tensor) and isinstance(val, torch.Tensor)
                    and attr.shape == val.shape and attr.dtype == val.dtype)

    def _share_key(self, n: torch.fx.Node):
        """The key under which ``n``'s value may be shared, or None."""
        if n.op != "call_function" or _writes_its_input(n.target):
            return None
        if any(getattr(a.meta.get("val"), "constant", None) is not None for a in n.all_input_nodes):
            return None
        key = _inputs_key(n)
        try:
            hash(key)
        except TypeError:  # an unhashable constant argument (a slice)
            return None
        return key

    def run_node(self, n: torch.fx.Node):
        stale = (n.op in ("placeholder", "output") or "val" not in n.meta
                 or n.meta.get(_COMPUTED_FROM) != _computed_from(n)
                 or (n.op == "get_attr" and self._attr_changed(n))
                 or any(a in self.changed for a in n.all_input_nodes))
        if not stale:
            return n.meta["val"]
        before = _meta_key(n.meta["val"]) if "val" in n.meta else None
        key = self._share_key(n)
        if key is not None and key in self.computed:
            result, n.meta["val"] = self.computed[key]
        else:
            result = super().run_node(n)
            if key is not None and not free_unbacked_symbols(result):
                self.computed[key] = result, n.meta.get("val")
        n.meta[_COMPUTED_FROM] = _computed_from(n)
        if n.op != "placeholder" and ("val" not in n.meta or _meta_key(n.meta["val"]) != before):
            self.changed.add(n)
        return result


def refresh_meta(gm: torch.fx.GraphModule, full: bool = False) -> None:
    """Recompute node.meta['val'] (fake tensors, symbolic shapes) after a rewrite: of the
    nodes the rewrite can have changed (see _IncrementalProp), or of all with ``full``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = torch._guards.detect_fake_mode(vals)
    if mode is None:
        return
    with mode:
        (FakeTensorProp if full else _IncrementalProp)(gm, mode).propagate_dont_convert_inputs(*vals)


def _dump(gm: torch.fx.GraphModule, ctx: PassContext, index: int, name: str, when: str) -> None:
    folder = ctx.dump_dir or os.environ.get(DUMP_ENV)
    if not folder:
        return
    path = Path(folder) / ctx.phase
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{index:02d}_{name}_{when}.txt").write_text(gm.print_readable(print_output=False, include_stride=False))


def run_pipeline(
    gm: torch.fx.GraphModule,
    pipeline: list[GraphPass],
    ctx: PassContext,
    cost_fn: Callable[[torch.fx.GraphModule, PhaseSignature], dict] | None = None,
) -> tuple[torch.fx.GraphModule, list[PassRecord], PassContext]:
    """Apply ``pipeline`` in order; return the graph, one record per pass and the final context."""
    from ..cost import estimate_cost

    cost_fn = cost_fn or estimate_cost
    phase = ctx.phase
    records: list[PassRecord] = []
    done: list[str] = []
    _dump(gm, ctx, 0, "captured", "graph")
    # the graph comes with fresh values (the capture's, or a previous pipeline's): recorded
    # as computed from the nodes' present arguments, so the first refresh is incremental too
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta[_COMPUTED_FROM] = _computed_from(node)
    cost = None  # the graph's cost as the last pass left it
    changed_any = False
    for i, gpass in enumerate(pipeline, start=1):
        if not ctx.passes.enabled(gpass.name):
            records.append(PassRecord(gpass.name, "disabled"))
            logger.info("[%s] %s: disabled", phase, gpass.name)
            continue
        cost = cost if cost is not None else cost_fn(gm, ctx.signature)
        rec = PassRecord(gpass.name, "no match", nodes_before=len(gm.graph.nodes), cost_before=cost)
        t0 = time.perf_counter()
        try:
            result = gpass.fn(gm, ctx)
            gm = result.gm
            if result.signature is not None:
                ctx = ctx.with_signature(result.signature)
                ctx.signature.nodes(gm)  # the graph's inputs must be the new signature's
            changed = bool(result.matches) or result.signature is not None
            if changed:  # a pass that matched nothing left the graph as it was (passes/README.md)
                cleanup(gm)
                refresh_meta(gm)
                changed_any = True
        except Exception as e:
            before = ", ".join(done) if done else "none"
            raise PassError(f"pass {gpass.name!r} failed on the {phase} graph (passes run before it: {before}): {e}") from e
        rec.seconds = time.perf_counter() - t0
        rec.matches, rec.detail = result.matches, result.detail
        rec.status = "applied" if result.matches else "no match"
        rec.nodes_after = len(gm.graph.nodes)
        rec.cost_after = cost = cost_fn(gm, ctx.signature) if changed else cost
        records.append(rec)
        done.append(gpass.name)
        _dump(gm, ctx, i, gpass.name, "after")
        logger.info(
            "[%s] %s: %s, %d match(es), %d -> %d nodes, %.2f s%s",
            phase, gpass.name, rec.status, rec.matches, rec.nodes_before, rec.nodes_after, rec.seconds,
            f" ({rec.detail})" if rec.detail else "",
        )
    if changed_any:
        gm.recompile()
    return gm, records, ctx
