"""
The serving engine, in nano-vllm's split: sequence (request state), block_manager (KV cache blocks and
prefix caching), scheduler (continuous batching), sampler, paged_cache and model_runner (the tensors).
Only the last three touch torch.
"""
