"""OptimizeReport: what a pipeline did, per pass and per weight, JSON-serialisable."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    peak_rss_mb: float  # the process's peak resident memory once the pass has run
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the pass touched


@dataclasses.dataclass
class WeightRecord:
    name: str  # the weight initializer's name in the input model
    layer: str  # the module path (torch.onnx metadata) or the consuming node's name
    kind: str  # matmul | gemm | lm_head | embedding
    shape: list[int]  # [K, N] as multiplied (embeddings: [V, D])
    bits: int
    axis: str  # oc | ic (embeddings: groups along D, reported as "ic")
    group_size: int
    symmetric: bool
    method: str
    bytes_before: int
    bytes_after: int
    relative_error: float  # ||W - W_hat||_F / ||W||_F
    output_error: float | None = None  # trace(dW^T H dW) / trace(W^T H W), when calibrated
    axis_errors: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # AdaDim: output error of each axis's candidate
    #: Under a size budget: per candidate width, {"axis", "error" (trace(dW^T H dW), not relative), "bytes"}.
    width_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SkippedWeight:
    name: str
    layer: str
    kind: str
    reason: str


@dataclasses.dataclass
class OptimizeReport:
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    weights: list[WeightRecord] = dataclasses.field(default_factory=list)
    skipped: list[SkippedWeight] = dataclasses.field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        """Float bytes of the quantized weights in the input model (not of the cluster weights that layer
        splitting added: they are parts of an input weight)."""
        return sum(w.bytes_before for w in self.weights) - self._pass_total("split_bytes")

    @property
    def bytes_after(self) -> int:
        """Bytes of the quantized weights plus the float outliers kept beside them (dense-and-sparse)."""
        return sum(w.bytes_after for w in self.weights) + self._pass_total("sparse_bytes")

    @property
    def budget(self) -> dict[str, Any] | None:
        """What the size budget allowed and used (QuantizeWeightsPass's ``budget`` details), or None."""
        return next((record.details["budget"] for record in self.passes if "budget" in record.details), None)

    def _pass_total(self, key: str) -> int:
        return sum(int(record.details.get(key, 0)) for record in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> OptimizeReport:
        data = json.loads(text)
        return cls(
            recipe=data.get("recipe", {}),
            passes=[PassRecord(**p) for p in data.get("passes", [])],
            weights=[WeightRecord(**w) for w in data.get("weights", [])],
            skipped=[SkippedWeight(**s) for s in data.get("skipped", [])],
        )

    @property
    def fused(self) -> dict[str, int]:
        """What FuseQDQPass fused weights into: op (``lowbit::QuantMatMul oc4``, ...) -> count."""
        counts: dict[str, int] = {}
        for record in self.passes:
            if record.name == "FuseQDQPass":
                for op, count in record.details.get("fused", {}).items():
                    counts[op] = counts.get(op, 0) + count
        return counts

    def form(self, fused_requested: bool, lowbit_runner: str, stock_runner: str) -> str:
        """What the written model needs to run, for a command's last line: lowbit's ops (run by
        ``lowbit_runner``), ONNX Runtime's own fused ops or the portable QDQ form (``stock_runner``)."""
        if any(op.startswith("lowbit::") for op in self.fused):
            return f"fused lowbit ops ({lowbit_runner})"
        if self.fused:
            return f"fused ONNX Runtime contrib ops ({stock_runner})"
        return f"portable QDQ ({stock_runner}" + ("; nothing was fused)" if fused_requested else ")")

    @property
    def unfused(self) -> dict[str, str]:
        """Quantized weights that FuseQDQPass left in the portable form: DequantizeLinear node -> reason."""
        return {
            node: reason
            for record in self.passes
            if record.name == "FuseQDQPass"
            for node, reason in record.details.get("unfused", {}).items()
        }

    def notices(self, fused: bool) -> list[str]:
        """What a command line says on stderr after the summary: weights not fused (with ``fused``) and
        weights left in float, counted (the summary above lists each with its reason)."""
        lines = []
        if fused and self.unfused:
            lines.append(
                f"lowbit: warning: {len(self.unfused)} quantized weight(s) stay in the portable form, not fused "
                "(listed above with the reasons)"
            )
        if self.skipped:
            lines.append(f"lowbit: note: {len(self.skipped)} weight(s) left in float (listed above with the reasons)")
        return lines

    def summary(self) -> str:
        """A few lines for a terminal: passes, weights quantized and skipped, bytes."""
        lines = [f"{'pass':<24}{'modified':>10}{'seconds':>10}{'peak RSS MB':>13}"]
        lines += [f"{p.name:<24}{str(p.modified):>10}{p.seconds:>10.2f}{p.peak_rss_mb:>13.0f}" for p in self.passes]
        if self.weights:
            mean_error = sum(w.relative_error for w in self.weights) / len(self.weights)
            lines.append(
                f"quantized {len(self.weights)} weights: {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB, mean relative weight error {mean_error:.4f}"
            )
        else:
            lines.append("quantized no weights")
        if self.budget is not None:
            budget = self.budget
            widths = ", ".join(f"{count} at {bits} bits" for bits, count in budget["widths"].items() if count)
            lines.append(
                f"budget {budget['budget']}: the quantized weights take {budget['bytes'] / 1e6:.2f} MB of "
                f"{budget['limit_bytes'] / 1e6:.2f} MB allowed ({budget['bits_per_weight']:.3f} bits per weight); "
                f"{widths}"
            )
        for skipped in self.skipped:
            lines.append(f"left in float: {skipped.layer} ({skipped.kind}, {skipped.name}): {skipped.reason}")
        for node, reason in self.unfused.items():
            lines.append(f"not fused (portable form, slower): {node}: {reason}")
        return "\n".join(lines)
