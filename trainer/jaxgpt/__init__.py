"""
The JAX backend (optional `jax` extra): the same GPT, optimizer split and checkpoint format as the torch
trainer, one code path for CPU devices, GPUs and TPU slices through a jax.sharding mesh.

- model.py: the GPT as pure functions over the torch state dict's names and layouts
- optim.py: Muon (orthogonalised updates) for block matrices, AdamW (optax) for the rest
- train.py: the sharded train step and `nanochat train base --backend jax` as a Ray Train JaxTrainer job
"""
