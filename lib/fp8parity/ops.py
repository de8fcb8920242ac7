"""The ops of the forward, by name (torch-free: llama.cpp's worker process maps ggml nodes onto them without torch).

An op is a point of the forward ("stage" is reserved for the cascade's A-F); global ops (embedding, final_norm,
logits) have layer -1.
"""

EMBEDDING = "embedding"
FINAL_NORM = "final_norm"
LOGITS = "logits"
LAYER_OPS = (
    "attn_norm", "q_proj", "k_proj", "v_proj", "q_post_rope", "k_post_rope", "attention", "attn_out",
    "post_attn_residual", "ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "post_ffn_residual",
)
GLOBAL_LAYER = -1
ALL_OPS = (EMBEDDING, *LAYER_OPS, FINAL_NORM, LOGITS)
