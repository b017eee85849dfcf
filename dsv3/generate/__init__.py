"""Generation with MLA's latent KV cache: batched group sampling with per-token log-probabilities and
self-speculative decoding with the MTP module. Runs the model from outside; the model knows nothing of it."""
from dsv3.generate.cache import DecodeState, LatentCache, cache_bytes_per_token
from dsv3.generate.decoder import CachedDecoder
from dsv3.generate.generator import Completion, GenerationResult, Generator, prompts_from_padded, routing_layers
from dsv3.generate.sampling import SamplingParams

__all__ = ["CachedDecoder", "Completion", "DecodeState", "GenerationResult", "Generator", "LatentCache",
           "SamplingParams", "cache_bytes_per_token", "prompts_from_padded", "routing_layers"]
