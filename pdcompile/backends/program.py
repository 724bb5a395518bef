"""A transformed phase graph as a fresh ``ExportedProgram`` (for AOTInductor, ONNX, TensorRT).

The passes work on a plain FX GraphModule; ahead-of-time backends want an
ExportedProgram with the phase's dynamic dimensions. :func:`export_program` re-exports the
(straight-line, aten-level) graph, keeping every ``pdcompile::`` op for the backend to
lower; :func:`program_from_graph` wraps the graph as it is, without that second trace
(the onnxruntime backend's path; written by hand: torch has no public "lift this
GraphModule" helper).
"""

from __future__ import annotations

import torch

from ..cost import example_inputs
from ..passes.functional_cache import functionalize_cache_writes
from ..passes.utils import attr
from ..phase import PassContext


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph; parameters are shared, not copied."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def export_program(gm: torch.fx.GraphModule, ctx: PassContext, functional: bool = False) -> torch.export.ExportedProgram:
    """Export ``gm`` (left untouched) with the phase's dynamic dims (from its signature);
    optionally with functional cache writes (updated caches returned after the logits)."""
    sig = ctx.signature
    gm = copy_graph_module(gm)
    if functional:
        functionalize_cache_writes(gm, sig)
    # Example sizes inside the declared ranges, distinct and > 1 (see capture.py); batch 3
    # whatever max_batch_size is (the Dim range covers it): with 2, the batch would equal
    # the example block table's 2 blocks and export would tie the two dims together.
    prompt = min(5, ctx.max_seq_len - 1)
    # On the graph's device: a CUDA model's weights do not mix with CPU example inputs.
    device = next(n.meta["val"].device for n in gm.graph.nodes if n.op == "placeholder")
    capacity = min(23, max(ctx.max_seq_len, 3))
    if sig.block_size:  # at least two blocks per row: a block table one block wide would be specialised
        capacity = max(2 * sig.block_size, prompt + 2)
    args = example_inputs(sig, 3, prompt, capacity, device=device)
    with torch.no_grad():
        return torch.export.export(gm, tuple(args), dynamic_shapes=sig.export_dims(ctx.max_batch_size, ctx.max_seq_len),
                                   strict=False)


def program_from_graph(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram | None:
    """``gm`` as an ``ExportedProgram`` without tracing it again, or None where that cannot be done.

    Capture exported the model once and the passes kept every node's fake value (symbolic
    shapes included, see passes/manager.refresh_meta), so the graph is already what a
    re-export would trace: this only lifts its weights from ``get_attr`` nodes to placeholders
    (parameters first, then other tensors, then the user inputs, the order an
    ExportedProgram's signature requires) and writes the signature. A re-export
    (:func:`export_program`) costs ~1.5 s per phase of a 4-layer model on 2 cores, most of it
    symbolic-shape arithmetic. None when a node is not an ATen/custom op overload with a
    fake value (a Python-level decomposition left for the re-export to trace, a submodule).
    """
    import torch.utils._pytree as pytree
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)

    gm = copy_graph_module(gm)
    graph = gm.graph
    inputs = list(graph.find_nodes(op="placeholder"))
    vals = [n.meta.get("val") for n in inputs]
    mode = torch._guards.detect_fake_mode(vals)
    if not inputs or mode is None or mode.shape_env is None or any(v is None for v in vals):
        return None
    for node in graph.nodes:
        if node.op == "call_function":
            traced = isinstance(node.target, torch._ops.OpOverload) or \
                getattr(node.target, "__module__", None) in ("_operator", "torch")  # getitem, symbolic sizes
            if not traced or ("val" not in node.meta and node.users):
                return None
        node.meta.setdefault("nn_module_stack", {})  # nodes a pass made: no module scope to record
    # One size node per symbol, as a trace writes it (passes read sizes from whichever input
    # was at hand): the first in graph order comes before every use of the later ones.
    sizes: dict = {}
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int)):
        size = node.meta.get("val")
        if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
            first_size = sizes.setdefault(size.node.expr, node)
            if first_size is not node:
                node.replace_all_uses_with(first_size)
                graph.erase_node(node)
    tensors: dict[str, torch.Tensor] = {}  # get_attr target -> tensor
    for node in graph.find_nodes(op="get_attr"):
        value = attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            return None
        tensors[node.target] = value
    params = {t: v for t, v in tensors.items() if isinstance(v, torch.nn.Parameter)}
    constants = {t: v for t, v in tensors.items() if t not in params}
    lifted: dict[str, torch.fx.Node] = {}
    with graph.inserting_before(inputs[0]):  # the signature's order: parameters, constants, user inputs
        for target in [*params, *constants]:
            lifted[target] = graph.placeholder("w_" + target.replace(".", "_"))
            lifted[target].meta["val"] = mode.from_tensor(tensors[target], static_shapes=True)
    for node in list(graph.find_nodes(op="get_attr")):
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    specs = [InputSpec(InputKind.PARAMETER, TensorArgument(lifted[t].name), t) for t in params]
    specs += [InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(lifted[t].name), t) for t in constants]
    specs += [InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in inputs]
    out = graph.output_node().args[0]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.fx.Node) for o in outs):
        return None
    graph.output_node().args = (tuple(outs),)
    signature = ExportGraphSignature(specs, [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), None)
                                             for o in outs])
    for target in tensors:  # the placeholders read them now
        owner, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
    gm.recompile()
    env = mode.shape_env
    symbols = {s for v in vals for d in v.shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
    ranges = {s: env.var_to_range[s] for s in symbols if s in env.var_to_range}
    # what ep.module() / run_decompositions need to call it: positional user inputs, a tuple out
    args = [TensorArgument(n.name) for n in inputs]
    results = [TensorArgument(o.name) for o in outs]
    call = ModuleCallSignature(args, results, pytree.tree_flatten((tuple(inputs), {}))[1],
                               pytree.tree_flatten(tuple(outs))[1])
    return torch.export.ExportedProgram(root=gm, graph=graph, graph_signature=signature, state_dict=params,
                                        range_constraints=ranges, module_call_graph=[ModuleCallEntry("", call)],
                                        constants=constants)
