"""Text generation and scoring for single-process DeepSeek models.

`generate` runs batched prompts through a latent-only KV cache (MLA with absorbed
up-projections), dropless MoE, greedy or seeded top-k / top-p sampling, optional self-speculative
decoding with the MTP depths; `score_tokens` gives the summed next-token loss of a token stream.
"""

from megatron.core.inference.engine import InferenceEngine, check_inference_model
from megatron.core.inference.generation import (
    GenerationOutput,
    generate,
    generate_with_logits,
)
from megatron.core.inference.kv_cache import (
    LatentCache,
    full_kv_elements_per_token,
    latent_elements_per_token,
)
from megatron.core.inference.sampling import mask_padded_vocab, sample_next
from megatron.core.inference.scoring import ScoreResult, score_tokens
from megatron.core.inference.speculative import SpeculativeStats, speculative_generate

__all__ = [
    "GenerationOutput",
    "InferenceEngine",
    "LatentCache",
    "ScoreResult",
    "SpeculativeStats",
    "check_inference_model",
    "full_kv_elements_per_token",
    "generate",
    "generate_with_logits",
    "latent_elements_per_token",
    "mask_padded_vocab",
    "sample_next",
    "score_tokens",
    "speculative_generate",
]
