"""Model presets: the KV geometry of real models, and the GEMMs of one layer.

Every figure comes from the model's published ``config.json`` on the Hugging
Face hub (the ``source`` of each preset). KV geometry is per tensor-parallel
rank, as one GPU holds it: MHA/GQA KV heads are split over ``tp`` ranks (and
replicated when ``tp`` exceeds them); MLA's latent vector
(``kv_lora_rank + qk_rope_head_dim``) is replicated on every rank.

Example:
    >>> g = PRESETS["llama-3.1-8b"]
    >>> g.kv_heads_per_rank, g.head_dim, g.item_bytes, g.token_layer_bytes
    (8, 128, 2048, 4096)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["ModelPreset", "PRESETS", "DTYPES", "TINY"]

# Names accepted by --dtype, mapped to torch dtypes (KV is moved as raw bytes).
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class ModelPreset:
    """A model's KV geometry and the sizes its stand-in forward pass needs.

    Args:
        name: preset name (``--preset``).
        layers: transformer layers holding KV.
        kv_heads: KV heads of the whole model (MHA/GQA); 1 for MLA.
        head_dim: elements per KV head; for MLA the latent width
            ``kv_lora_rank + qk_rope_head_dim``.
        q_heads: attention (query) heads of the whole model.
        hidden: hidden size.
        intermediate: MLP width per token (for MoE: the routed experts a token
            visits plus the shared ones, times the expert width).
        tp: tensor-parallel ranks the preset describes one of.
        mla: one latent KV vector per token and layer instead of K and V.
        q_lora_rank: MLA's query compression width (0 for MHA).
        kv_lora_rank: MLA's KV compression width; the rest of ``head_dim`` is
            the shared rotary part (0 for MHA).
        v_head_dim: MLA's value head width (0 for MHA).
        dtype: KV dtype.
        source: where the figures come from.
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int
    hidden: int
    intermediate: int
    tp: int = 1
    mla: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    v_head_dim: int = 0
    dtype: torch.dtype = torch.bfloat16
    source: str = ""

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads one rank stores (MLA: 1; GQA: split, at least 1 when replicated)."""
        return 1 if self.mla else max(1, self.kv_heads // self.tp)

    @property
    def q_heads_per_rank(self) -> int:
        return max(1, self.q_heads // self.tp)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def item_bytes(self) -> int:
        """Bytes of one token of one layer of K (or of V, or MLA's latent)."""
        return self.kv_heads_per_rank * self.head_dim * self.element_size

    @property
    def planes(self) -> int:
        """2 (K and V) for MHA, 1 for MLA."""
        return 1 if self.mla else 2

    @property
    def token_layer_bytes(self) -> int:
        """Bytes one token holds in one layer, K and V together."""
        return self.item_bytes * self.planes

    def with_geometry(self, **changes) -> "ModelPreset":
        """A copy with some fields changed, named ``custom`` when the KV geometry changes."""
        if not changes:
            return self
        return replace(self, name=changes.pop("name", f"{self.name}+custom"), **changes)

    def gemm_shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of the weight GEMMs of one layer on one rank.

        MHA/GQA: fused QKV, output projection, fused gate/up, down.
        MLA: query down/up projections, KV down projection (to the latent),
        KV up projection, output projection, then the MLP.
        """
        tp, h = self.tp, self.hidden
        inter = max(1, self.intermediate // tp)
        if self.mla:
            heads = self.q_heads_per_rank
            rope = self.head_dim - self.kv_lora_rank
            attn = [
                (h, self.q_lora_rank),
                (self.q_lora_rank, heads * (self.v_head_dim + rope)),
                (h, self.head_dim),
                (self.kv_lora_rank, heads * 2 * self.v_head_dim),
                (heads * self.v_head_dim, h),
            ]
        else:
            qkv = (self.q_heads_per_rank + 2 * self.kv_heads_per_rank) * self.head_dim
            attn = [(h, qkv), (self.q_heads_per_rank * self.head_dim, h)]
        return attn + [(h, 2 * inter), (inter, h)]

    def describe(self) -> str:
        kv = (f"MLA latent {self.head_dim}" if self.mla
              else f"{self.kv_heads_per_rank} KV heads x {self.head_dim}")
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.name}: {self.layers} layers, {kv}, {dtype}, tp {self.tp} "
                f"({self.token_layer_bytes} B per token per layer)")


PRESETS: dict[str, ModelPreset] = {p.name: p for p in [
    ModelPreset(
        "qwen3-0.6b", layers=28, kv_heads=8, head_dim=128, q_heads=16, hidden=1024,
        intermediate=3072,
        source="huggingface.co/Qwen/Qwen3-0.6B config.json: num_hidden_layers=28, "
               "num_key_value_heads=8, head_dim=128, num_attention_heads=16, "
               "hidden_size=1024, intermediate_size=3072",
    ),
    ModelPreset(
        "llama-3.1-8b", layers=32, kv_heads=8, head_dim=128, q_heads=32, hidden=4096,
        intermediate=14336,
        source="huggingface.co/meta-llama/Llama-3.1-8B config.json: num_hidden_layers=32, "
               "num_key_value_heads=8, hidden_size=4096 / num_attention_heads=32 -> head_dim 128, "
               "intermediate_size=14336",
    ),
    ModelPreset(
        "llama-3.1-70b", layers=80, kv_heads=8, head_dim=128, q_heads=64, hidden=8192,
        intermediate=28672, tp=8,
        source="huggingface.co/meta-llama/Llama-3.1-70B config.json: num_hidden_layers=80, "
               "num_key_value_heads=8, hidden_size=8192 / num_attention_heads=64 -> head_dim 128, "
               "intermediate_size=28672; tp 8 leaves 1 KV head per rank",
    ),
    ModelPreset(
        # MLA: the cache holds kv_lora_rank (512) + qk_rope_head_dim (64) = 576 elements.
        # MoE: each token visits 8 routed experts + 1 shared, each 2048 wide.
        "deepseek-v3", layers=61, kv_heads=1, head_dim=512 + 64, q_heads=128, hidden=7168,
        intermediate=(8 + 1) * 2048, tp=8, mla=True, q_lora_rank=1536, kv_lora_rank=512, v_head_dim=128,
        source="huggingface.co/deepseek-ai/DeepSeek-V3 config.json: num_hidden_layers=61, "
               "kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=128, "
               "hidden_size=7168, q_lora_rank=1536, v_head_dim=128, "
               "moe_intermediate_size=2048, num_experts_per_tok=8, n_shared_experts=1; "
               "the latent is replicated on each of tp 8 ranks",
    ),
]}

# The stand-in a machine without a GPU runs (e2e on CPU): small enough for a 2-core box.
TINY = ModelPreset("tiny-cpu", layers=4, kv_heads=2, head_dim=32, q_heads=4, hidden=128,
                   intermediate=256, source="a made-up toy model for CPU runs")
