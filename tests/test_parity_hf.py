"""Numerical parity with `transformers`: import → build → load → same logits, same tokens.

For each family a tiny random model is made from a config object (no download),
saved with `save_pretrained`, imported with `forgec import-hf`, built, and
filled by `runtime.hf.load_hf_checkpoint`. In fp32 and eval mode, with HF on
its eager attention:

* the logits of a random batch agree within 1e-5 (absolute);
* 32 greedily decoded tokens are identical — forgec decoding with its KV cache
  (`make_kv_caches`, `forward(..., kv_caches=...)`), HF with its own cache
  (`cache`), one token at a time.

The configs exercise what differs between the families: Llama 3 RoPE scaling
(with wavelengths in all three bands), q/k/v/o biases, a sliding window shorter
than the sequence (Mistral; Qwen2 on its upper layers only), q/k/v biases and a
tied head (Qwen2), qk-norm with head_dim ≠ dim / heads (Qwen3), softmax top-2
routing renormalised (Mixtral) and not (Qwen3-MoE, whose dense and sparse layers
are interleaved by mlp_only_layers), a shared expert behind a sigmoid gate
(Qwen2-MoE), experts with qk-norm over the projections (OLMoE) or multipliers
(GraniteMoE), and the state-space hybrids Jamba and Mamba-2 and Qwen3-Next's gated
DeltaNet layers (beside gated attention), whose scans agree within 1e-4 (`ATOL`: HF's
sequential fp32 recurrence and forgec's round differently).

Weights are drawn with std 0.15 (`initializer_range`): at HF's 0.02 a tiny random
model's greedy decode falls into a loop of one or two tokens, which would prove
little (the test requires 8 distinct tokens of 32). The logits are then of size
~5, and the two implementations' fp32 rounding differs by ~5e-6 (about 1e-6
relative: different but equivalent op orders — SDPA vs eager softmax, fused
rms_norm, packed vs per-expert matmuls); at std 0.2 it would reach 1.5e-5.
`test_a_wrong_weight_would_be_caught` shows 1e-5 is still tight enough to see a
1e-3 change of one norm weight.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from conftest import THREADS

from forgec.compiler.build import build
from forgec.compiler.cli import main as forgec
from forgec.compiler.driver import compile_spec
from forgec.runtime.generate import generate
from forgec.runtime.hf import load_hf_checkpoint, save_hf_checkpoint
from forgec.runtime.parallel import COMPILE_BACKEND_ENV

PROMPT, NEW = 20, 32
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.15)  # see below

# name: (config class, model class, extra config)
FAMILIES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(
        # head_dim 16, theta 5e5: wavelengths 6.3 (kept), 32 (blended), 168+ (slowed)
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama_bias": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(attention_bias=True)),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2,
        tie_word_embeddings=True)),
    "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM, dict(head_dim=24, rms_norm_eps=1e-5)),
    "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (hf.Qwen3MoeConfig, hf.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        head_dim=24, norm_topk_prob=False, mlp_only_layers=[0, 2])),
    # parallel attention + MLP with norms of their own, LayerNorm with biases, a quarter of
    # each head rotating, exact-GELU MLP, fused per-head query_key_value
    "gpt_neox": (hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, dict(
        num_key_value_heads=None, initializer_range=0.3)),
    "gpt_neox_sequential": (hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, dict(
        num_key_value_heads=None, initializer_range=0.3, use_parallel_residual=False,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                         "partial_rotary_factor": 0.5})),
    # one LayerNorm read by attention and MLP, interleaved rotary on 8 of 16 channels,
    # gelu_new MLP, a head with a bias; GPT-2-style field names
    "gptj": (hf.GPTJConfig, hf.GPTJForCausalLM, dict(
        hidden_size=None, intermediate_size=None, num_hidden_layers=None,
        num_attention_heads=None, num_key_value_heads=None, max_position_embeddings=None,
        n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128, rotary_dim=8,
        initializer_range=0.3)),
    # phi-2: one LayerNorm for parallel attention + MLP, half of each head rotating, biases
    # everywhere (the head's included), gelu_new
    "phi": (hf.PhiConfig, hf.PhiForCausalLM, dict(initializer_range=0.3)),
    # LayerNorm, a quarter rotating, SwiGLU, q/k/v biases; the parallel form shares its norm
    "stablelm": (hf.StableLmConfig, hf.StableLmForCausalLM, dict(use_qkv_bias=True)),
    "stablelm_parallel": (hf.StableLmConfig, hf.StableLmForCausalLM, dict(
        use_parallel_residual=True)),
    # LayerNorm, gelu-tanh MLP, biases, a sliding window, a tied head
    "starcoder2": (hf.Starcoder2Config, hf.Starcoder2ForCausalLM, dict(
        initializer_range=0.3, sliding_window=8)),
    # Llama with layers 1 and 3 of 4 attending without positions (no_rope_layers 0)
    "smollm3": (hf.SmolLM3Config, hf.SmolLM3ForCausalLM, dict(
        num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0)),
    # non-parametric LayerNorm, SwiGLU, q/k/v clamped (clip_qkv)
    "olmo": (hf.OlmoConfig, hf.OlmoForCausalLM, dict(clip_qkv=0.5, pad_token_id=0)),
    # multipliers on the embedding, each residual branch, the scores and the logits
    "granite": (hf.GraniteConfig, hf.GraniteForCausalLM, dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=0.5, pad_token_id=0)),
    # parallel attention + MLP on a bias-free LayerNorm, interleaved rotary, logit_scale
    "cohere": (hf.CohereConfig, hf.CohereForCausalLM, dict(logit_scale=0.5, pad_token_id=0)),
    # post-norms only, qk-norm over the whole projections
    "olmo2": (hf.Olmo2Config, hf.Olmo2ForCausalLM, dict(pad_token_id=0)),
    # sandwich norms, interleaved partial rotary, q/k/v biases, fused gate_up_proj,
    # head_dim 24 ≠ hidden_size / heads
    "glm4": (hf.Glm4Config, hf.Glm4ForCausalLM, dict(head_dim=24, pad_token_id=0)),
    # fused qkv_proj / gate_up_proj, partial rotary, a sliding window
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, dict(
        sliding_window=8, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5})),
    # Gemma: norms scaling by 1 + w, the embedding by sqrt(dim), GeGLU; Gemma 2: sandwich
    # norms, soft-capped scores and logits, local / global layers (every 2: global),
    # 1 / sqrt(query_pre_attn_scalar); Gemma 3: per-head qk-norm with unit offset, the local
    # layers' own RoPE base, 5 local : 1 global. Untied heads: tied, the sqrt(dim)-scaled
    # embedding of the last token dominates a tiny model's residual stream, and greedy
    # decoding repeats it (a tied head is tested with Qwen2)
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
    "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        tie_word_embeddings=False)),
    "gemma3": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, dict(
        num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        tie_word_embeddings=False)),
    # multi-head latent attention (queries through a 32-wide bottleneck, a 16-wide
    # key/value latent, 8 interleaved-RoPE channels per head), a dense first layer, then 8
    # experts in 4 groups, 2 per token from the 2 best groups, sigmoid scores with a
    # random score-correction bias, weights normalised and scaled by 2.5, a shared expert
    "deepseek_v3": (hf.DeepseekV3Config, hf.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, n_shared_experts=1)),
    # queries projected directly, RoPE on the halves of the rotated channels
    "deepseek_v3_direct_q": (hf.DeepseekV3Config, hf.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=False,
        rope_interleave=False, first_k_dense_replace=1, n_shared_experts=1)),
    # DeepSeek-V2-Lite's: queries projected directly, RoPE on the halves, greedy softmax
    # routing without renormalisation
    "deepseek_v2": (hf.DeepseekV2Config, hf.DeepseekV2ForCausalLM, dict(
        num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1)),
    # attention sinks, q/k/v/o biases, a window on every other layer (0, 2, ...), experts
    # with biases and a SwiGLU clamped at 1.0 (where it changes values at this scale), a
    # router with a bias
    "gpt_oss": (hf.GptOssConfig, hf.GptOssForCausalLM, dict(
        head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, rms_norm_eps=1e-5, swiglu_limit=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # experts on every layer, qk-norm over the whole projections, top-k renormalised
    "olmoe": (hf.OlmoeConfig, hf.OlmoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0,
        eos_token_id=2)),
    # a shared expert scaled by its sigmoid gate, a dense first layer (mlp_only_layers)
    "qwen2_moe": (hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM, dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[0])),
    # Granite's multipliers around experts packed as input_linear / output_linear
    "granitemoe": (hf.GraniteMoeConfig, hf.GraniteMoeForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=0.5,
        pad_token_id=0)),
    # state-space hybrids (a scan: 1e-4, see ATOL): Mamba, Mamba + experts, attention
    # without positions, Mamba + experts (attn_layer_period / expert_layer_period)
    "jamba": (hf.JambaConfig, hf.JambaForCausalLM, dict(
        num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
        attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16,
        use_mamba_kernels=False)),
    # Mamba-2 (SSD) mixers alone, the scan chunked by 8: every sequence spans several chunks
    "mamba2": (hf.Mamba2Config, hf.Mamba2ForCausalLM, dict(
        intermediate_size=None, num_attention_heads=None, num_key_value_heads=None,
        max_position_embeddings=None, num_heads=8, head_dim=16, expand=2, state_size=16,
        n_groups=2, chunk_size=8)),
    # ---- hybrids listing their attention layers (branch zhyb) ----
    # Bamba: Mamba-2 mixers (chunks of 8, 2 groups) and an attention layer rotating half of
    # each head, an MLP on every layer, q/k/v/o biases
    "bamba": (hf.BambaConfig, hf.BambaForCausalLM, dict(
        num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=16,
        mamba_n_groups=2, mamba_chunk_size=8, attention_bias=True, pad_token_id=0)),
    # LFM2: short convolutions with biases and attention with per-head qk-norm by
    # layer_types, a tied head, the MLP's width by its rule (int(1.5 · 2 · 96 / 3) = 96,
    # a multiple of 32)
    "lfm2": (hf.Lfm2Config, hf.Lfm2ForCausalLM, dict(
        num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_bias=True,
        block_ffn_dim_multiplier=1.5, block_multiple_of=32, pad_token_id=0)),
    # ---- RoPE scaling (transformers' rope types; the frequencies op for op)
    # every frequency divided by the factor
    "llama_linear": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    # dynamic NTK past max_position_embeddings 32: the logits' 52 positions and the decode
    # from 20 to 52 recompute the base per forward (for the new positions only)
    "llama_dynamic": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(
        max_position_embeddings=32,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    # YaRN with its attention factor (0.1 ln 4 + 1 on cos and sin), ramp not truncated
    "qwen2_yarn": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 16.0,
                         "beta_slow": 1.0, "truncate": False})),
    # LongRoPE past original_max_position_embeddings 32 (the top-level field, Phi-3's):
    # the short factors up to 32 positions, the long ones in a longer forward; factor
    # derived as 128 / 32
    "phi3_longrope": (hf.Phi3Config, hf.Phi3ForCausalLM, dict(
        pad_token_id=0, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
                         "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]})),
    # DeepSeek's YaRN: cos and sin times mscale(4, 1) / mscale(4, 0.8), the softmax scale
    # times mscale(4, 0.8)²
    "deepseek_v3_yarn": (hf.DeepseekV3Config, hf.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, n_shared_experts=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})),
    # gpt-oss's released rope_parameters at a small scale: YaRN, truncate false
    "gpt_oss_yarn": (hf.GptOssConfig, hf.GptOssForCausalLM, dict(
        head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, rms_norm_eps=1e-5, swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 16})),
    # Gemma 3's global layers scaled linearly (its released 4B-27B: factor 8), the local
    # layers' base not
    "gemma3_linear": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, dict(
        num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # ---- further mixture-of-experts families (issue #13) ----
    # PhiMoE: LayerNorms with biases, q/k/v/o and head biases, a sliding window, sparsemixer
    # routing whose window (router_jitter_noise 0.3) often holds several experts
    "phimoe": (hf.PhimoeConfig, hf.PhimoeForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        sliding_window=8, router_jitter_noise=0.3)),
    # GLM-4-MoE: a dense first layer, then 8 experts in 4 groups (2 per token from the 2
    # best) on biased sigmoid scores, normalised and scaled, a shared expert; q/k/v
    # biases, half of each head rotating, a per-head qk-norm
    "glm4_moe": (hf.Glm4MoeConfig, hf.Glm4MoeForCausalLM, dict(
        num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, n_shared_experts=1, attention_bias=True, use_qk_norm=True)),
    # dots.llm1: the same mixture (no groups, not normalised, 2 shared experts) under
    # q/k/v/o biases, a per-head qk-norm and a sliding window on the last layer (of 3)
    "dots1": (hf.Dots1Config, hf.Dots1ForCausalLM, dict(
        num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=2,
        attention_bias=True, sliding_window=8, max_window_layers=2)),
    # GraniteMoE's packed experts with a shared SwiGLU expert (shared_mlp); the default
    # attention_multiplier 1.0 (scores scaled by 1, not 1/sqrt(head_dim))
    "granitemoeshared": (hf.GraniteMoeSharedConfig, hf.GraniteMoeSharedForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
        pad_token_id=0)),
    # GraniteMoeSWA: a window on layers 1, 2, sinks, layers 0 and 3 without positions
    "granitemoe_swa": (hf.GraniteMoeSWAConfig, hf.GraniteMoeSWAForCausalLM, dict(
        num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=48, attention_multiplier=0.2, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"], layer_rope_theta=[0, 10000.0, 10000.0, 0],
        pad_token_id=0)),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and experts, the layers' kinds listed
    # (mlp_layer_types: dense, sparse, dense)
    "glm4_moe_lite": (hf.Glm4MoeLiteConfig, hf.Glm4MoeLiteForCausalLM, dict(
        num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        mlp_layer_types=["dense", "sparse", "dense"])),
    # Solar Open: GLM-4-MoE's experts on every layer (no dense MLP, no intermediate_size),
    # 2 groups, Llama's attention with q/k/v biases
    "solar_open": (hf.SolarOpenConfig, hf.SolarOpenForCausalLM, dict(
        intermediate_size=None, head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, attention_bias=True)),
    # MiniMax-M2: Mixtral's names and layout, biased sigmoid routing normalised, qk-norm
    # over the projections, half of each head rotating
    "minimax_m2": (hf.MiniMaxM2Config, hf.MiniMaxM2ForCausalLM, dict(
        intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        rotary_dim=8, bos_token_id=1, eos_token_id=2)),
    # EXAONE-MoE: a dense first layer (mlp_layer_types), then biased sigmoid routing with
    # a shared expert; per-head qk-norm; windows on layers 0-2, layer 3 global without
    # positions
    "exaone_moe": (hf.ExaoneMoeConfig, hf.ExaoneMoeForCausalLM, dict(
        num_hidden_layers=4, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        sliding_window=8, sliding_window_pattern=4, first_k_dense_replace=1,
        eos_token_id=2)),
    # FlexOlmo: OLMo 2's post-norms and qk-norm over the projections, OLMoE's experts
    "flex_olmo": (hf.FlexOlmoConfig, hf.FlexOlmoForCausalLM, dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        pad_token_id=0,
        eos_token_id=2)),
    # Qwen3-Next (a scan: 1e-4): gated DeltaNet layers (2 query/key heads serving 4 value
    # heads) and a gated attention layer (full_attention_interval 4) with (1 + w) qk-norms
    # and a quarter of each head rotating; experts with a shared expert behind a sigmoid
    # gate, a dense MLP on layer 1 (mlp_only_layers)
    "qwen3_next": (hf.Qwen3NextConfig, hf.Qwen3NextForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        mlp_only_layers=[1])),
    # ---- more decoders (issue #13)
    # Mistral's layers, sliding after layer_types (one of each)
    "ministral": (hf.MinistralConfig, hf.MinistralForCausalLM, dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    # q/k/v and o_proj biases of their own fields, a gated MLP with biases (a module)
    "seed_oss": (hf.SeedOssConfig, hf.SeedOssForCausalLM, dict(
        head_dim=16, attention_out_bias=True, mlp_bias=True, attention_dropout=0.0,
        residual_dropout=0.0, pad_token_id=0)),
    # interleaved rotary pairs, q/k/v biases
    "helium": (hf.HeliumConfig, hf.HeliumForCausalLM, dict(
        head_dim=16, attention_bias=True, pad_token_id=0)),
    # interleaved rotary pairs, biases everywhere (use_bias), a tied head
    "ernie4_5": (hf.Ernie4_5Config, hf.Ernie4_5ForCausalLM, dict(
        head_dim=16, use_bias=True, pad_token_id=0)),
    # interleaved half rotary, q/k/v biases, fused gate_up_proj, no sandwich norms
    "glm": (hf.GlmConfig, hf.GlmForCausalLM, dict(head_dim=16, pad_token_id=0)),
    # a two-layer ReLU² MLP written as a module
    "arcee": (hf.ArceeConfig, hf.ArceeForCausalLM, dict(pad_token_id=0)),
    # Gemma 2 without post-norms
    "vaultgemma": (hf.VaultGemmaConfig, hf.VaultGemmaForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        tie_word_embeddings=False)),
    # post-norms, qk-norm over the projections, 3 sliding : 1 full, a RoPE base per type
    "olmo3": (hf.Olmo3Config, hf.Olmo3ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=8, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 500000.0}})),
    # Cohere's parallel block, sliding layers that turn and full layers without positions
    "cohere2": (hf.Cohere2Config, hf.Cohere2ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=8, logit_scale=0.5, pad_token_id=0)),
    # post-norms, per-head qk-norm, sliding layers that turn, a full layer without positions
    "exaone4": (hf.Exaone4Config, hf.Exaone4ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=8, pad_token_id=0)),
    # Granite's multipliers, sinks, sliding layers, layer 1 without positions (untied: see
    # Gemma's)
    "granite_swa": (hf.GraniteSWAConfig, hf.GraniteSWAForCausalLM, dict(
        num_hidden_layers=4, sliding_window=8, tie_word_embeddings=False, embedding_multiplier=3.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=0.5, pad_token_id=0,
        layer_rope_theta=[10000.0, 0.0, 10000.0, 10000.0])),
    # per-head qk-norm after RoPE, q/k/v/o biases
    "hunyuan_v1_dense": (hf.HunYuanDenseV1Config, hf.HunYuanDenseV1ForCausalLM, dict(
        head_dim=16, attention_bias=True)),
    # LayerNorm1P (1 + weight, with a bias), a two-layer ReLU² MLP with biases, a quarter of
    # each head rotating
    "nemotron": (hf.NemotronConfig, hf.NemotronForCausalLM, dict(
        head_dim=16, mlp_bias=True, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25})),
    # RMSNorms of the heads' output and of the gated ReLU² MLP's hidden
    "bitnet": (hf.BitNetConfig, hf.BitNetForCausalLM, dict(pad_token_id=0)),
    # LayerNorm qk-norms with biases, half rotary, ReLU², fused per-head query_key_value
    # (at std 0.35: smaller weights decode in loops)
    "persimmon": (hf.PersimmonConfig, hf.PersimmonForCausalLM, dict(
        num_key_value_heads=None, initializer_range=0.35)),
    # Falcon-7B's layout: one KV head, attention + MLP in parallel on one LayerNorm, biases;
    # the new decoder architecture's (Falcon-40B): 2 KV heads, parallel on two LayerNorms;
    # and the sequential one with q, k, v per head
    "falcon": (hf.FalconConfig, hf.FalconForCausalLM, dict(
        num_key_value_heads=None, intermediate_size=None, ffn_hidden_size=96, bias=True,
        initializer_range=0.25, tie_word_embeddings=False)),
    "falcon_new": (hf.FalconConfig, hf.FalconForCausalLM, dict(
        num_key_value_heads=None, intermediate_size=None, ffn_hidden_size=96,
        new_decoder_architecture=True, num_kv_heads=2, initializer_range=0.3)),
    "falcon_sequential": (hf.FalconConfig, hf.FalconForCausalLM, dict(
        num_key_value_heads=None, intermediate_size=None, ffn_hidden_size=96,
        multi_query=False, parallel_attn=False, initializer_range=0.3)),
}
# the logits' tolerance: a scan's sequential fp32 recurrence (HF) and forgec's rounds
# differently
ATOL = {"jamba": 1e-4, "mamba2": 1e-4, "bamba": 1e-4, "qwen3_next": 1e-4}
# families whose HF model numbers a step's positions from 0 unless given position_ids
# (BambaModel ignores its cache there; generate() passes them)
POSITIONS_GIVEN = ("bamba",)


LLAMA_STYLE = ("llama", "llama_bias", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _import_module(pkg: Path, name: str):
    path = pkg / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"parity_{name}_{id(pkg)}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def atol(family) -> float:
    return ATOL.get(family, 1e-5)


@pytest.fixture(scope="module")
def pair(family, tmp_path_factory):
    """(HF model, forgec model with the same weights, the written spec's text)."""
    name = family
    config_cls, model_cls, extra = FAMILIES[name]
    tmp = tmp_path_factory.mktemp(name)
    # None removes a field of BASE (GPT-J names them otherwise), and sets any other
    config = config_cls(**{k: v for k, v in {**BASE, **extra}.items()
                           if v is not None or k not in BASE})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    if name not in LLAMA_STYLE:
        # HF starts norms at 1 / 0 and biases at 0: random ones check that each lands in
        # its place (and keep a tiny LayerNorm model's greedy decode from looping)
        with torch.no_grad():
            for p in ref.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p), alpha=0.2)
            for key, b in ref.named_buffers():  # DeepSeek-V3's: it changes which experts win
                if key.endswith("e_score_correction_bias"):
                    b.normal_(0.0, 0.1)
    assert ref.config._attn_implementation == "eager"
    ref.save_pretrained(tmp / "hf")
    spec = tmp / f"{name}.forge"
    assert forgec(["import-hf", str(tmp / "hf"), "-o", str(spec)]) == 0
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = _import_module(tmp / "pkg", name).Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, spec.read_text(), tmp


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def test_logits_match_transformers(pair, atol):
    ref, model, *_ = pair
    ids = _tokens(PROMPT + NEW, 2, seed=2)  # longer than every sliding window
    expected = ref(ids).logits
    got = model(ids)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@torch.no_grad()
def _greedy_hf(ref, prompt: torch.Tensor, n: int, positions: bool = False) -> list[int]:
    out = ref(prompt, use_cache=True)
    tokens = []
    for i in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        where = {"position_ids": torch.tensor([[prompt.shape[1] + i]])} if positions else {}
        out = ref(nxt, cache=out.cache, use_cache=True, **where)
    return tokens


@torch.no_grad()
def _greedy_forgec(model, prompt: torch.Tensor, n: int) -> list[int]:
    caches = model.make_kv_caches(1, prompt.shape[1] + n)
    x, tokens = prompt, []
    for _ in range(n):
        x = model(x, kv_caches=caches)[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(x))
    return tokens


def test_greedy_decoding_with_kv_cache_matches_transformers(pair, family):
    ref, model, *_ = pair
    prompt = _tokens(PROMPT, 1, seed=3)
    expected = _greedy_hf(ref, prompt, NEW, positions=family in POSITIONS_GIVEN)
    assert len(set(expected)) >= 8, f"a degenerate reference decode proves little: {expected}"
    assert _greedy_forgec(model, prompt, NEW) == expected


# families whose decoding differs in kind: multi-head latent attention (keys and values
# of different widths in the cache), RoPE tables that follow the length (dynamic NTK,
# LongRoPE: 10 + 40 positions cross their threshold of 32), learned sinks, a second RoPE
# base for local layers, sliding windows
STATIC_DECODE = ("deepseek_v3", "llama_dynamic", "phi3_longrope", "gpt_oss", "gemma3",
                 "mistral")


@pytest.mark.parametrize("family", STATIC_DECODE, indirect=True)
def test_the_compiled_static_decode_gives_the_eager_tokens(pair, family, monkeypatch):
    # generate(compile=True): fixed-size caches, one compiled step (aot_eager: the graph
    # inductor would compile, cheaply), a left-padded batch of two prompts
    _, model, *_ = pair
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    prompts = [_tokens(10, 1, seed=7)[0].tolist(), _tokens(3, 1, seed=8)[0].tolist()]
    eager = generate(model, prompts, 40, eos_id=None)
    assert generate(model, prompts, 40, eos_id=None, compile=True) == eager


def test_the_spec_says_where_it_came_from(pair):
    _, _, text, _ = pair
    assert "imported by `forgec import-hf`" in text
    # fields named in comments (GPT-J's config calls them n_embd and n_layer)
    assert ("hidden_size" in text and "num_hidden_layers" in text
            or "n_embd" in text and "n_layer" in text)


def test_a_wrong_weight_would_be_caught(pair, atol):
    # the comparison is sensitive: one perturbed norm weight moves the logits past 1e-5
    # (a scan's past 1e-4)
    ref, model, *_ = pair
    ids = _tokens(16, 1, seed=4)
    layer = model.layers["1"]
    # OLMo 2 norms the outputs only, Mamba-2 names its norm `norm`
    w = (getattr(layer, "attention_norm", None) or getattr(layer, "attention_post_norm", None)
         or layer.norm).weight
    if w is None:  # OLMo's norms learn nothing (and undo a shift of every channel)
        w = layer.attention.o_proj.weight[0]
    if hasattr(layer, "post_attention_norm"):
        # Gemma 2, 3: the post-norm undoes a layer's input norm moved as a whole
        # (with Gemma 3's qk-norms): one channel of the final norm instead
        w = model.norm.weight[:1]
    delta = 100 * atol  # 1e-3; 1e-2 where a scan's tolerance is 1e-4
    changes = [(w, slice(None), delta)]
    mixer = getattr(layer, "mamba", None) or getattr(layer, "mixer", None)
    if mixer is not None:  # and so does a small change of one channel's skip weight D
        changes.append((mixer.D, 2, delta))
    for w, where, delta in changes:
        with torch.no_grad():
            saved = w.clone()
            w[where] += delta
            try:
                diff = (model(ids) - ref(ids).logits).abs().max().item()
            finally:
                w.copy_(saved)  # exactly: later tests save these weights
        assert diff > atol


@torch.no_grad()
def test_a_saved_checkpoint_loads_back_into_transformers(pair):
    # save_hf_checkpoint writes the family's own names (fused and permuted projections
    # included): transformers loads it and computes the same logits as the original
    ref, model, _, tmp = pair
    out = tmp / "roundtrip"
    save_hf_checkpoint(model, out, config=tmp / "hf")
    back = type(ref).from_pretrained(out, attn_implementation="eager").eval()
    expected = dict(ref.named_parameters())
    got = dict(back.named_parameters())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    ids = _tokens(16, 1, seed=5)
    torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_training_loss_reads_the_same_logits(pair):
    # forward(targets=...) never materialises the logits (the head's fused loss, which
    # scales its input where a spec scales the logits): the same cross-entropy
    ref, model, *_ = pair
    ids = _tokens(16, 2, seed=6)
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    expected = torch.nn.functional.cross_entropy(
        ref(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
