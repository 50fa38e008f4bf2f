"""The sparse mixture-of-experts MLP (Qwen3.5-MoE, Qwen3-Next style), as a decoder layer's
feed-forward part (``ffn=`` of ``decoder_layer`` and ``gated_deltanet_layer``):

    n -> router linear -> moe_route (softmax, top-k, renormalised)
      -> moe_experts (each token's k experts' SwiGLU, weighted and summed)
      +  sigmoid(shared_expert_gate(n)) * shared_expert SwiGLU (n)

Expert weights are stacked per layer, [E, 2I, H] gate+up (gate first) and [E, H, I] down,
read from either checkpoint layout: one ``mlp.experts.<e>.{gate,up,down}_proj.weight``
per expert (hub checkpoints and ``save_pretrained``) or transformers' fused
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``. The router and the shared
expert's gate keep the ``router`` role (the quantize pass leaves them float: they pick
experts, a discrete choice). ``routed_fraction`` is what decode reads of the experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ...errors import UnsupportedModelError, WeightError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import TensorType
from .layers import act_kind, linear


@dataclass(frozen=True)
class SparseMoe:
    experts: int
    top_k: int
    expert_dim: int        # each routed expert's intermediate size
    shared_dim: int        # the shared expert's intermediate size (0: none)
    normalize: bool = True

    @classmethod
    def from_config(cls, text: dict[str, Any], *, normalize: bool = True) -> "SparseMoe":
        """From a text config's ``num_experts``, ``num_experts_per_tok``,
        ``moe_intermediate_size``, ``shared_expert_intermediate_size`` (transformers'
        Qwen3.5-MoE defaults for absent ones). ``normalize``: renormalise the top-k
        probabilities (Qwen3.5-MoE always does; Qwen3-MoE's ``norm_topk_prob``)."""
        moe = cls(int(text.get("num_experts", 256)), int(text.get("num_experts_per_tok", 8)),
                  int(text.get("moe_intermediate_size", 512)), int(text.get("shared_expert_intermediate_size", 512)),
                  bool(normalize))
        if min(moe.experts, moe.top_k, moe.expert_dim) < 1 or moe.shared_dim < 0 or moe.top_k > moe.experts:
            raise UnsupportedModelError(f"mixture-of-experts sizes {moe} are not valid (1 <= top_k <= experts)")
        return moe

    @property
    def routed_fraction(self) -> float:
        """The share of the routed experts' weights one token reads."""
        return self.top_k / self.experts

    def meta(self) -> dict[str, Any]:
        return {"experts": self.experts, "top_k": self.top_k, "expert_dim": self.expert_dim,
                "shared_dim": self.shared_dim, "normalize": self.normalize}

    def declare(self, w: Weights, h: int, prefix_fmt: str, sources: Sequence[int], source_fmt: str
                ) -> tuple[dict[str, TensorType], dict[str, str]]:
        """Each layer's MoE params (``prefix_fmt`` over the block's index, read from
        ``source_fmt`` over its decoder layer); the block's relative types and roles."""
        e, i, s = self.experts, self.expert_dim, self.shared_dim
        dense: dict[str, tuple[tuple[int, ...], str]] = {"mlp.gate.weight": ((e, h), "router")}
        if s:
            dense.update({"mlp.shared_expert.gate_proj.weight": ((s, h), "gate"),
                          "mlp.shared_expert.up_proj.weight": ((s, h), "up"),
                          "mlp.shared_expert.down_proj.weight": ((h, s), "down"),
                          "mlp.shared_expert_gate.weight": ((1, h), "router")})
        stacked = {"mlp.experts.gate_up_proj": ((e, 2 * i, h), "experts_gate_up"),
                   "mlp.experts.down_proj": ((e, h, i), "experts_down")}
        for local, layer in enumerate(sources):
            prefix, src = prefix_fmt.format(i=local), source_fmt.format(i=layer)
            for rel, (shape, role) in dense.items():
                w.add(prefix + rel, shape, role=role, part="text", layer=layer, source=src + rel)
            for rel, (shape, role) in stacked.items():
                names, transforms = self._expert_sources(w, src, rel, h)
                w.add(prefix + rel, shape, role=role, part="text", layer=layer, source=names, transforms=transforms)
        both = {**dense, **stacked}
        return ({rel: TensorType(shape, "float32") for rel, (shape, _) in both.items()},
                {rel: role for rel, (_, role) in both.items()})

    def _expert_sources(self, w: Weights, src: str, rel: str, h: int) -> tuple[list[str], list]:
        """The checkpoint tensors of one stacked param and the transforms that stack them."""
        e, i = self.experts, self.expert_dim
        fused = (e, 2 * i, h) if rel.endswith("gate_up_proj") else (e, h, i)
        if w.has(src + rel):  # transformers' fused layout
            if tuple(w.ref(src + rel).shape) != fused:
                raise WeightError(f"weight {src + rel!r} has shape {list(w.ref(src + rel).shape)}, expected {list(fused)}")
            return [src + rel], []
        per = ["gate_proj", "up_proj"] if rel.endswith("gate_up_proj") else ["down_proj"]
        names = [f"{src}mlp.experts.{x}.{leaf}.weight" for leaf in per for x in range(e)]
        want = (i, h) if len(per) == 2 else (h, i)
        for n in names:
            if tuple(w.ref(n).shape) != want:
                raise WeightError(f"weight {n!r} has shape {list(w.ref(n).shape)}, expected {list(want)}")
        if len(per) == 1:
            return names, [("stack", {})]
        # [gate_0..gate_E-1, up_0..up_E-1] -> [2, E, I, H] -> [E, 2, I, H] -> [E, 2I, H]
        return names, [("stack", {}), ("reshape", {"shape": [2, e, i, h]}), ("transpose", {"axes": [1, 0, 2, 3]}),
                       ("reshape", {"shape": [e, 2 * i, h]})]

    def apply(self, fb: FunctionBuilder, n: str, hidden_act: str) -> str:
        """The MoE output for normed hidden states ``n`` [B, L, H]."""
        kind = act_kind(hidden_act)
        logits = linear(fb, n, "mlp.gate", bias=False)
        weights, experts = fb.op("moe_route", logits, top_k=self.top_k, normalize=self.normalize, n_out=2,
                                 name="route")
        y = fb.op("moe_experts", n, weights, experts, fb.param("mlp.experts.gate_up_proj"),
                  fb.param("mlp.experts.down_proj"), kind=kind, name="experts")
        if not self.shared_dim:
            return y
        g = linear(fb, n, "mlp.shared_expert.gate_proj", bias=False)
        u = linear(fb, n, "mlp.shared_expert.up_proj", bias=False)
        s = linear(fb, fb.op("glu", g, u, kind=kind, name="shared"), "mlp.shared_expert.down_proj", bias=False)
        gate = fb.op("act", linear(fb, n, "mlp.shared_expert_gate", bias=False), kind="sigmoid", name="shared_gate")
        return fb.op("add", y, fb.op("mul", s, gate, name="shared"), name="moe")


def expert_bytes_per_token(text: dict[str, Any], bits_per_weight: float = 16.0) -> dict[str, float]:
    """Bytes of MLP weights one decode token reads in a MoE decoder (from a text config):
    ``routed`` (the router, the top-k experts and the shared expert in every layer) against
    ``all_experts`` (the dense equivalent: every expert read, as a dense decoder of the same
    parameters would). ``bits_per_weight``: 16 for bf16, ~4.5 for q4 with group-64 bf16
    scales and biases. The router and shared gate stay float (16 bits)."""
    moe = SparseMoe.from_config(text)
    h, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    expert = 3 * moe.expert_dim * h * bits_per_weight / 8
    shared = 3 * moe.shared_dim * h * bits_per_weight / 8
    router = (moe.experts + (1 if moe.shared_dim else 0)) * h * 2
    routed = layers * (moe.top_k * expert + shared + router)
    every = layers * (moe.experts * expert + shared + router)
    return {"routed": routed, "all_experts": every, "ratio": every / routed}
