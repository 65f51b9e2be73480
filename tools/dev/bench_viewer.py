"""Benchmark the viewer: HTML size and time to first render in headless Chromium.

    python -m lowbit.tools.dev.bench_viewer                                   # the generated 20,000-node graph
    python -m lowbit.tools.dev.bench_viewer --smollm2 smol.onnx --quantized smol.w4.onnx --report smol.report.json

Cases: a seeded generated graph of ``--nodes`` nodes (a stack of transformer-like layers named by
module path, after a run of unnamed preprocessing nodes), the same graph quantized with
``lowbit.optimize`` and viewed with ``--compare`` and ``--report``, and SmolLM2 (fp32, then quantized
with ``--compare`` and ``--report``) when its files are given. Time to first render is
``performance.now()`` when the page has drawn its first view and the browser has run the frame after
it, i.e. from navigation start: HTML parse, JSON parse, layout and drawing; the first of ``--repeat``
fresh loads and their median. Then, in the loaded page: expanding the largest collapsed group on
screen, and a search over all node names. Needs Chromium (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import tempfile
import time

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

import lowbit
from lowbit.tools.viewer import write_view
from lowbit.tools.viewer.browser import Browser

_FLOAT = ir.DataType.FLOAT
_PREPROCESSING = 300  # unnamed nodes at the top level: exercises grouping without module paths
_NODES_PER_LAYER = 31


class _Builder:
    """Appends named nodes and seeded weights to one graph."""

    def __init__(self, seed: int, hidden: int):
        self.rng = np.random.default_rng(seed)
        self.hidden = hidden
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def op(self, op_type: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=name)
        node.outputs[0].name = f"{name}_out"
        self.nodes.append(node)
        return node.outputs[0]

    def weight(self, name: str, shape: tuple[int, ...]) -> ir.Value:
        return self.constant(name, (self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def norm(self, x: ir.Value, prefix: str) -> ir.Value:
        """RMSNorm as exporters write it: 7 nodes."""
        two = self.weight(f"{prefix}.two", (1,))
        epsilon = self.weight(f"{prefix}.eps", (1,))
        squared = self.op("Pow", [x, two], f"{prefix}.Pow")
        axes = self.constant(f"{prefix}.axes", np.array([-1], dtype=np.int64))
        mean = self.op("ReduceMean", [squared, axes], f"{prefix}.ReduceMean", keepdims=1)  # axes input: opset 18+
        root = self.op("Sqrt", [self.op("Add", [mean, epsilon], f"{prefix}.Add")], f"{prefix}.Sqrt")
        scaled = self.op("Mul", [x, self.op("Reciprocal", [root], f"{prefix}.Reciprocal")], f"{prefix}.Mul")
        return self.op("Mul", [scaled, self.weight(f"{prefix}.weight", (self.hidden,))], f"{prefix}.Mul_1")

    def linear(self, x: ir.Value, prefix: str, k: int, n: int) -> ir.Value:
        return self.op("MatMul", [x, self.weight(f"{prefix}.weight", (k, n))], f"{prefix}.MatMul")

    def layer(self, x: ir.Value, prefix: str) -> ir.Value:
        """Attention and gated MLP with residuals: ``_NODES_PER_LAYER`` nodes."""
        h, f = self.hidden, 2 * self.hidden
        normed = self.norm(x, f"{prefix}.input_layernorm")
        q, k, v = (self.linear(normed, f"{prefix}.self_attn.{p}_proj", h, h) for p in "qkv")
        keys = self.op("Transpose", [k], f"{prefix}.self_attn.Transpose", perm=[0, 2, 1])
        scores = self.op("MatMul", [q, keys], f"{prefix}.self_attn.MatMul")
        scale = self.weight(f"{prefix}.self_attn.scale", (1,))
        scaled = self.op("Mul", [scores, scale], f"{prefix}.self_attn.Mul")
        probs = self.op("Softmax", [scaled], f"{prefix}.self_attn.Softmax", axis=-1)
        context = self.op("MatMul", [probs, v], f"{prefix}.self_attn.MatMul_1")
        x = self.op("Add", [x, self.linear(context, f"{prefix}.self_attn.o_proj", h, h)], f"{prefix}.Add")
        normed = self.norm(x, f"{prefix}.post_attention_layernorm")
        gate = self.linear(normed, f"{prefix}.mlp.gate_proj", h, f)
        up = self.linear(normed, f"{prefix}.mlp.up_proj", h, f)
        activated = self.op("Mul", [gate, self.op("Sigmoid", [gate], f"{prefix}.mlp.Sigmoid")], f"{prefix}.mlp.Mul")
        gated = self.op("Mul", [activated, up], f"{prefix}.mlp.Mul_1")
        return self.op("Add", [x, self.linear(gated, f"{prefix}.mlp.down_proj", f, h)], f"{prefix}.Add_1")


def generated_model(num_nodes: int = 20_000, seed: int = 0, hidden: int = 32) -> ir.Model:
    """A seeded graph of exactly ``num_nodes`` nodes: unnamed preprocessing, then layers, then a head."""
    builder = _Builder(seed, hidden)
    x = ir.Value(name="x", shape=ir.Shape([1, 16, hidden]), type=ir.TensorType(_FLOAT))
    y = x
    for number in range(_PREPROCESSING):  # node_<Op>_<n>: no module path, no name prefix
        op = ("Identity", "Relu", "Neg")[int(builder.rng.integers(3))]
        y = builder.op(op, [y], f"node_{op}_{number}")
    layers = (num_nodes - _PREPROCESSING - 1) // _NODES_PER_LAYER
    for layer in range(layers):
        y = builder.layer(y, f"model.layers.{layer}")
    while len(builder.nodes) < num_nodes - 1:
        y = builder.op("Identity", [y], f"model.norm.Identity_{len(builder.nodes)}")
    y = builder.linear(y, "lm_head", hidden, hidden)
    y.name = "logits"
    graph = ir.Graph(
        [x],
        [y],
        nodes=builder.nodes,
        initializers=builder.initializers,
        opset_imports={"": 21},
        name="generated_decoder",
    )
    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    return model


@functools.cache
def _node_count(path: pathlib.Path) -> int:
    return len(lowbit.load(path).graph)


def first_render_ms(browser: Browser, page: pathlib.Path, repeat: int) -> list[float]:
    """Time to first render of ``repeat`` fresh loads of ``page`` (the first one is the coldest)."""
    times = []
    for _ in range(repeat):
        browser.open(page)
        times.append(float(browser.wait_for("window.__firstRenderMs", timeout=120)))
    return times


#: In the loaded page: milliseconds to expand the largest collapsed group on screen (layout and
#: drawing included), then to search all node names for a substring and redraw.
_INTERACTION = """(() => {
  const app = window.lowbitViewer, pane = app.main;
  const collapsed = pane.visible.filter((i) => i >= pane.N && !pane.expanded[i - pane.N]);
  if (!collapsed.length) return [-1, -1];
  const largest = collapsed.reduce((a, b) => (pane.group(a).nodes >= pane.group(b).nodes ? a : b));
  let start = performance.now();
  app.toggleGroup(pane, largest - pane.N);
  const expand = performance.now() - start;
  start = performance.now();
  app.search("down_proj");
  return [expand, performance.now() - start];
})()"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=20_000, help="size of the generated graph")
    parser.add_argument("--smollm2", help="fp32 SmolLM2 ONNX (lowbit export smollm2 -o smollm2.onnx)")
    parser.add_argument("--quantized", help="quantized SmolLM2 ONNX (lowbit optimize ... --report)")
    parser.add_argument("--report", help="the optimizer's report for --quantized")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="folder for the models and pages (default: a temporary folder)")
    args = parser.parse_args(argv)
    if (args.quantized or args.report) and not args.smollm2:
        parser.error("--quantized and --report need --smollm2, the float model they are compared with")
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="lowbit-bench-viewer-"))
    out.mkdir(parents=True, exist_ok=True)

    generated = out / f"generated{args.nodes}.onnx"
    lowbit.save(generated_model(args.nodes), generated)
    generated_q, generated_report = out / f"generated{args.nodes}.w4.onnx", out / f"generated{args.nodes}.report.json"
    result = lowbit.optimize(lowbit.load(generated), lowbit.Recipe(bits=4, group_size=16, axis="ic"))
    lowbit.save(result.model, generated_q)
    generated_report.write_text(result.report.to_json())
    cases = [
        (f"generated {args.nodes} nodes, fp32", generated, None, None),
        (f"generated {args.nodes} nodes, w4 --compare --report", generated_q, generated, generated_report),
    ]
    if args.smollm2:
        cases.append(("SmolLM2-135M fp32", pathlib.Path(args.smollm2), None, None))
        if args.quantized:
            quantized = pathlib.Path(args.quantized)
            cases.append(("SmolLM2-135M w4 --compare --report", quantized, pathlib.Path(args.smollm2), args.report))

    rows = []
    with Browser() as browser:
        for label, model, compare, report in cases:
            page = out / (model.stem + (".compare" if compare else "") + ".html")
            start = time.perf_counter()
            write_view(model, page, compare=compare, report=report)
            seconds = time.perf_counter() - start
            nodes = _node_count(model) + (_node_count(compare) if compare else 0)
            times = first_render_ms(browser, page, args.repeat)
            expand, search = browser.evaluate(_INTERACTION)
            size = page.stat().st_size / 2**20
            rows.append((label, nodes, seconds, size, times[0], statistics.median(times), expand, search))
    print(
        f"{'case':<44}{'nodes':>7}{'write s':>9}{'HTML MiB':>10}{'first render ms':>17}{'(median)':>10}"
        f"{'expand ms':>11}{'search ms':>11}"
    )
    for label, nodes, seconds, size, first, median, expand, search in rows:
        print(
            f"{label:<44}{nodes:>7}{seconds:>9.1f}{size:>10.2f}{first:>17.0f}{median:>10.0f}{expand:>11.0f}{search:>11.0f}"
        )
    print(f"pages in {out}")


if __name__ == "__main__":
    main()
