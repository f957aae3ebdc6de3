"""Published shapes of common models and GPUs; every field can be overridden with ``--set``.

Model numbers are from each model's released ``config.json`` on the Hugging Face Hub
(``seq_length`` is the native context: ``max_position_embeddings``, or 32768 for Qwen2.5 whose
YaRN extension is not counted) and, for GPT-3, from Brown et al. 2020 (arXiv:2005.14165,
Table 2.1) with Megatron-LM's 51200-token padded vocabulary.
"""

from __future__ import annotations

from miles.planner.specs import Cluster, ModelSpec

MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec(
        name="llama3-8b",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        seq_length=8192,
    ),
    "llama3-70b": ModelSpec(
        name="llama3-70b",
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_kv_heads=8,
        ffn_hidden_size=28672,
        vocab_size=128256,
        seq_length=8192,
    ),
    "qwen2.5-1.5b": ModelSpec(
        name="qwen2.5-1.5b",
        num_layers=28,
        hidden_size=1536,
        num_attention_heads=12,
        num_kv_heads=2,
        ffn_hidden_size=8960,
        vocab_size=151936,
        seq_length=32768,
        tied_embeddings=True,
    ),
    "qwen2.5-7b": ModelSpec(
        name="qwen2.5-7b",
        num_layers=28,
        hidden_size=3584,
        num_attention_heads=28,
        num_kv_heads=4,
        ffn_hidden_size=18944,
        vocab_size=152064,
        seq_length=32768,
    ),
    "qwen2.5-72b": ModelSpec(
        name="qwen2.5-72b",
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_kv_heads=8,
        ffn_hidden_size=29568,
        vocab_size=152064,
        seq_length=32768,
    ),
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        vocab_size=32000,
        seq_length=32768,
        num_experts=8,
        moe_top_k=2,
        moe_ffn_hidden_size=14336,
    ),
    "gpt3-175b": ModelSpec(
        name="gpt3-175b",
        num_layers=96,
        hidden_size=12288,
        num_attention_heads=96,
        num_kv_heads=96,
        ffn_hidden_size=4 * 12288,
        vocab_size=51200,
        seq_length=2048,
        gated_mlp=False,
        tied_embeddings=True,
        dropout=True,
    ),
}

# Per-GPU figures from the vendor data sheets: dense bf16 tensor-core peak; NVLink bandwidth
# per direction (half the quoted bidirectional figure); one InfiniBand NIC per GPU
# (HDR 200 Gb/s on DGX A100, NDR 400 Gb/s on DGX H100/H200).
GPU_PRESETS: dict[str, Cluster] = {
    "a100-40gb": Cluster(
        gpu_memory_gib=40, peak_tflops=312, intra_node_gbps=300, inter_node_gbps=25
    ),
    "a100-80gb": Cluster(
        gpu_memory_gib=80, peak_tflops=312, intra_node_gbps=300, inter_node_gbps=25
    ),
    "h100": Cluster(gpu_memory_gib=80, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50),
    "h200": Cluster(gpu_memory_gib=141, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50),
}
