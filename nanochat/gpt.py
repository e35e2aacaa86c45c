"""
GPT model, after karpathy/nanochat's gpt.py.

Notable features:
- rotary position embeddings (no learned positions); tables cover 4x sequence_len and grow on demand
- QK-norm, then q and k each scaled by qk_scale (nanochat's record: 1.2, sharper attention); every norm
  is parameter-free (RMSNorm, or LayerNorm as a variant), including one right after the token embedding
- ReLU² MLP (GELU and SwiGLU as variants); no biases anywhere
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads
- untied token embedding and lm_head; logits soft-capped: softcap * tanh(logits / softcap)
- sliding-window layers from a pattern string cycled over the layers ("SSSL": S sees a quarter of
  the context, L all of it); the last layer is always L
- value embeddings (ResFormer) on alternating layers, mixed into v through an input-dependent gate
- per-layer learnable scalars: resid_lambdas scale the residual stream, x0_lambdas blend the
  embedding back in (modded-nanogpt)
- optional, off by default (nanochat's record run has both): smear, which adds a gated share of the
  previous token's embedding to each token's (cheap bigram information before any attention), and
  backout, which subtracts a learned share of the middle layer's residual stream before the final norm
- nanochat's init (uniform matrices, zero output projections) and depth dial (GPTConfig.from_depth)
- sliding-window layers train through FlexAttention on a GPU (model.attention = auto), whose block mask
  skips the score tiles a window hides; SDPA with a boolean mask, the fallback, computes them all
- two paths: forward() trains on full sequences; forward_cached() runs inference through
  any KVCacheLike (nanochat/kv_cache.py), so that serving can bring a paged cache, and computes the
  logits only at the positions the caller asks for
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from nanochat.kv_cache import KVCacheLike


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.size(-1),))


NORMS = {"rmsnorm": rms_norm, "layernorm": layer_norm}
ACTIVATIONS = ("relu2", "gelu", "swiglu")
VE_GATE_CHANNELS = 12  # the value-embedding gate reads only the first channels of its input
SMEAR_GATE_CHANNELS = 24  # likewise the smear gate (nanochat's choice)
# training attention: flex = FlexAttention everywhere; sdpa = SDPA everywhere (a window is a dense mask);
# auto = FlexAttention for the window layers on a GPU, SDPA otherwise (on a CPU compiling costs more than it saves)
ATTENTION = ("auto", "sdpa", "flex")


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training context: sizes the sliding windows and the first rotary table
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA); must divide n_head
    n_embd: int = 768
    window_pattern: str = "L"  # cycled over layers: L = full context, S = a quarter of it; last layer always L
    softcap: float = 15.0  # logits are squashed smoothly into (-softcap, softcap)
    rope_base: float = 10000.0  # nanochat's record uses 100000; this default is what older checkpoints were trained with
    qk_scale: float = 1.0  # q and k are multiplied by it after QK-norm (record: 1.2); 1.0 for older checkpoints
    # architecture variants (research experiments choose these from config)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (both parameter-free)
    activation: str = "relu2"  # "relu2" | "gelu" | "swiglu"
    qk_norm: bool = True
    attention: str = "auto"  # the training path's attention kernels, one of ATTENTION (inference is unaffected)
    smear: bool = False  # mix a gated share of the previous token's embedding into each token's (record: on)
    backout: bool = False  # subtract a learned share of the middle layer's output before the final norm (record: on)

    def __post_init__(self):
        self.window_pattern = self.window_pattern.upper()
        # in order: later rules may divide by fields that earlier ones checked
        self._require(self.sequence_len >= 1, "sequence_len", "must be >= 1")
        self._require(self.vocab_size >= 1, "vocab_size", "must be >= 1")
        self._require(self.n_layer >= 1, "n_layer", "must be >= 1")
        self._require(self.n_embd >= 1, "n_embd", "must be >= 1")
        self._require(self.n_head >= 1 and self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        self._require(self.head_dim % 2 == 0, "n_embd", f"n_embd / n_head={self.n_head} must be even (rotary rotates pairs)")
        self._require(self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0, "n_kv_head",
                      f"must divide n_head={self.n_head}")
        self._require(self.window_pattern != "" and set(self.window_pattern) <= {"S", "L"}, "window_pattern",
                      "must be a non-empty string of S and L")
        self._require(self.softcap > 0, "softcap", "must be > 0")
        self._require(self.rope_base > 0, "rope_base", "must be > 0")
        self._require(self.qk_scale > 0, "qk_scale", "must be > 0")
        self._require(self.norm in NORMS, "norm", f"must be one of {sorted(NORMS)}")
        self._require(self.activation in ACTIVATIONS, "activation", f"must be one of {list(ACTIVATIONS)}")
        self._require(self.attention in ATTENTION, "attention", f"must be one of {list(ATTENTION)}")

    def _require(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{field}={getattr(self, field)!r}: {rule}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128, aspect_ratio: int = 64,
                   n_kv_head: int | None = None, **overrides) -> "GPTConfig":
        """nanochat's depth dial: width = aspect_ratio * depth, in ceil(width / head_dim) heads, or
        the next head count that splits the width into even head dimensions."""
        for name, value in (("depth", depth), ("head_dim", head_dim), ("aspect_ratio", aspect_ratio)):
            if value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1")
        n_embd = aspect_ratio * depth
        n_head = math.ceil(n_embd / head_dim)
        while n_head <= n_embd and (n_embd % n_head or (n_embd // n_head) % 2):
            n_head += 1
        if n_head > n_embd:
            raise ValueError(f"aspect_ratio={aspect_ratio!r}: width {n_embd} has no even head dimension")
        fields = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                      n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=n_embd)
        return cls(**{**fields, **overrides})


def window_sizes(config: GPTConfig) -> list[int | None]:
    """Attention window per layer, None = full context. nanochat rounds the short window up to 128
    for FA3's tiles; SDPA has no tiles, so a plain quarter here."""
    short = max(1, config.sequence_len // 4)
    pattern = config.window_pattern
    sizes = [short if pattern[i % len(pattern)] == "S" else None for i in range(config.n_layer)]
    sizes[-1] = None  # the last layer always sees the whole context
    return sizes


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


def rotary_tables(n_pos: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (n_pos, head_dim/2), kept in float32 and cast where used."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs of channels (i, i + D/2) of x (B, T, H, D) by angles cos/sin (B or 1, T, 1, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# compiled at its first call: uncompiled, FlexAttention materializes every score and skips nothing
compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, block_mask: BlockMask | None = None) -> Tensor:
    """Causal attention over whole sequences, (B, T, H, D) in and out. With a block mask (see
    window_block_mask), FlexAttention, which skips the tiles the mask hides. Otherwise SDPA: full context
    takes its is_causal path (flash); a window needs a dense mask, which the memory-efficient kernel takes
    and still computes every score of."""
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if block_mask is not None:
        y = compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))
    elif window is None or window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
    else:
        k, v, gqa = grouped_kv(q, k, v)
        delta = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(delta >= 0) & (delta <= window), enable_gqa=gqa)
    return y.transpose(1, 2)


def grouped_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Keys and values (B, H_kv, S, D) ready for a masked SDPA of q (B, H, T, D), and its enable_gqa. On a
    CPU SDPA takes the grouped heads as they are, far faster than copying every key and value to each query
    head of its group; on a GPU the masked kernels do not all take GQA (SDPA could fall back to its slow
    math path), so there every query head gets its own copy."""
    if k.size(1) == q.size(1):
        return k, v, False
    if q.device.type == "cpu":
        return k, v, True
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    return k, v, False


@lru_cache(maxsize=32)
def window_block_mask(seq_len: int, window: int | None, device: torch.device) -> BlockMask:
    """FlexAttention's form of the causal mask with a window (None: full context), built once per
    (seq_len, window, device): which 128 x 128 tiles of the scores hold any visible key (the kernel skips
    the others) and which are wholly visible (no per-score mask there). Query p sees keys p - window .. p,
    as in the SDPA path and the KV caches."""
    if window is None:
        def visible(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def visible(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(visible, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None
        self.qk_norm = NORMS[config.norm] if config.qk_norm else None
        self.qk_scale = config.qk_scale

    def forward(self, x: Tensor, ve: Tensor | None, cos: Tensor, sin: Tensor, cache: KVCacheLike | None,
                block_mask: BlockMask | None) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: each kv head lets in a gated share of the token's value embedding
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))  # (B, T, n_kv_head) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.qk_scale != 1.0:
            # unit-RMS q and k give logits of RMS ~1 after SDPA's 1/sqrt(head_dim): scaling both sharpens them
            q, k = q * self.qk_scale, k * self.qk_scale
        if cache is None:
            y = causal_attention(q, k, v, self.window, block_mask)
        else:
            y = cache.attend(self.layer_idx, q, k, v, self.window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.activation
        hidden = 4 * config.n_embd
        if self.activation == "swiglu":
            # two input matrices: 8/3 of the width keeps the parameter count of the 4x MLPs
            hidden = max(64, round(8 * config.n_embd / 3 / 64) * 64)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.activation == "relu2":
            h = F.relu(h).square()
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.norm = NORMS[config.norm]
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, ve: Tensor | None, cos: Tensor, sin: Tensor, cache: KVCacheLike | None,
                block_mask: BlockMask | None) -> Tensor:
        x = x + self.attn(self.norm(x), ve, cos, sin, cache, block_mask)
        return x + self.mlp(self.norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Shapes only: this may run on the meta device. init_weights() sets every value."""
        super().__init__()
        self.config = config
        self.norm = NORMS[config.norm]
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, w) for i, w in enumerate(self.window_sizes)]),
        })
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # optional: off, these parameters do not exist, so checkpoints written without them load unchanged
        self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        # rotary tables are derived, not learned: kept out of checkpoints, rebuilt by init_weights()
        cos, sin = rotary_tables(4 * config.sequence_len, config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init. Matrices are uniform (no outliers) with the std of N(0, 1/n_embd); output
        projections start at zero, so every block starts as the identity. Also call it after
        to_empty() from the meta device, before loading a checkpoint: it rebuilds the rotary tables."""
        cfg = self.config
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start a little above neutral
            for linear in (block.mlp.c_fc, getattr(block.mlp, "c_gate", None)):
                if linear is not None:
                    nn.init.uniform_(linear.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -s, s)  # like c_v, whose output they add to
        # early layers keep more of the residual and blend in more of the embedding than deep ones
        depth_frac = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        if self.smear_gate is not None:
            self.smear_lambda.zero_()  # smear starts closed: the model opens it as far as it helps
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)
        self.cos, self.sin = rotary_tables(self.cos.size(0), cfg.head_dim, cfg.rope_base, self.cos.device)

    def forward(self, idx: Tensor, targets: Tensor | None = None, loss_reduction: str = "mean") -> Tensor:
        """Training path over whole sequences idx (B, T): the loss if targets are given (-1 = ignore),
        else float32 logits (B, T, vocab_size)."""
        T = idx.size(1)
        self._ensure_rotary(T)
        cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        logits = self._logits(self._trunk(idx, cos, sin, None, self._block_masks(T, idx.device), None))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def forward_cached(self, idx: Tensor, cache: KVCacheLike, logits_at: Tensor | None = None,
                       prev_idx: Tensor | None = None) -> Tensor:
        """Inference path: float32 logits (B, T, vocab_size) for new tokens idx (B, T), which attend to
        everything the cache holds and to each other; the cache then holds them too. logits_at (indices
        into the B * T positions, row-major) asks for those positions' logits only, (len(logits_at),
        vocab_size): a prefill samples from one position per row, and the lm_head over the whole
        vocabulary at every position would be the largest matmul of a small model. prev_idx (B,): the token
        just before each row's first new token (any value where a row starts at position 0), which smear
        mixes in; or (B, T): the token before each new token, for rows that hold several sequences back to
        back (a packed prefill), where the token before a sequence's first is not the row's previous one.
        Required with config.smear, unused without."""
        positions, bound = cache.positions(idx.size(1))
        self._ensure_rotary(bound)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        before = None
        if self.smear_gate is not None:
            if prev_idx is None:
                raise ValueError("a model with smear needs prev_idx, the token before each row's new tokens")
            # the previous token's embedding, zero at position 0 (there is none)
            if prev_idx.dim() == 1:
                prev_idx, positions = prev_idx[:, None], positions[:, :1]
            before = self.norm(self.transformer.wte(prev_idx)) * (positions[..., None] > 0)
        x = self._trunk(idx, cos, sin, cache, [None] * self.config.n_layer, before)
        cache.advance(idx.size(1))
        if logits_at is not None:
            x = x.flatten(0, 1).index_select(0, logits_at)
        return self._logits(x)

    def _trunk(self, idx: Tensor, cos: Tensor, sin: Tensor, cache: KVCacheLike | None,
               block_masks: list[BlockMask | None], before: Tensor | None) -> Tensor:
        """The normed residual stream after the last block. before (B, 1, n_embd): the normed embedding of
        the token preceding idx[:, 0] for smear, or (B, T, n_embd) that of the token preceding each (None:
        there is none)."""
        x = self.norm(self.transformer.wte(idx))
        if self.smear_gate is not None:
            x = self._smear(x, before)
        x0 = x
        middle = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, cache, block_masks[i])
            if i == self.config.n_layer // 2:
                middle = x
        if self.backout_lambda is not None:
            # backout: the middle layer's stream still carries low-level (token, local) features that the
            # prediction does not want; the final norm sees the stream with a learned share of it removed
            x = x - self.backout_lambda * middle
        return self.norm(x)

    def _smear(self, x: Tensor, before: Tensor | None) -> Tensor:
        """Each position plus a gated share of the previous position's embedding: bigram information the
        first attention layer would otherwise have to spend itself on. The gate reads the current token's
        first channels and is scaled by smear_lambda, which starts at zero."""
        if before is None:
            before = torch.zeros_like(x[:, :1])
        previous = before if before.size(1) == x.size(1) else torch.cat([before, x[:, :-1]], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : self.smear_gate.in_features]))
        return x + gate * previous

    @torch.compiler.disable  # run eagerly under torch.compile: the masks are cached, not rebuilt in the graph
    def _block_masks(self, T: int, device: torch.device) -> list[BlockMask | None]:
        """Per layer, the FlexAttention block mask of a layer that trains through FlexAttention (None: SDPA),
        as config.attention chooses."""
        attention = self.config.attention
        if attention == "flex" and device.type == "cpu" and torch.is_grad_enabled():
            raise ValueError("attention='flex' (config key model.attention): FlexAttention has no backward pass "
                             "on a CPU; train there with 'auto' or 'sdpa'")
        windows = [None if w is None or w >= T - 1 else w for w in self.window_sizes]
        if attention == "flex":
            return [window_block_mask(T, w, device) for w in windows]
        if attention == "auto" and device.type == "cuda":
            return [None if w is None else window_block_mask(T, w, device) for w in windows]
        return [None] * len(windows)

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.lm_head(x).float()  # softcap and loss in float32
        return self.config.softcap * torch.tanh(logits / self.config.softcap)

    def _ensure_rotary(self, n_pos: int) -> None:
        """Grow the rotary tables (doubling) when positions run past them, e.g. long generations."""
        if n_pos > self.cos.size(0):
            size = max(n_pos, 2 * self.cos.size(0))
            with torch.inference_mode(False):  # grown during generation, the tables must still serve training
                self.cos, self.sin = rotary_tables(size, self.config.head_dim, self.config.rope_base, self.cos.device)

    def param_groups(self, fine: bool = False) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer treatment, each exactly once: block matrices go to Muon, the rest to AdamW.
        fine=True splits the AdamW parameters as nanochat's record recipe treats them: value embeddings
        apart from the token embedding, resid_lambdas apart from x0_lambdas, and smear and backout's
        parameters in a group of their own (empty when both are off); otherwise they are scalars."""
        smear = [] if self.smear_gate is None else [self.smear_gate.weight, self.smear_lambda]
        smear += [] if self.backout_lambda is None else [self.backout_lambda]
        groups = {
            "matrix": [p for p in self.transformer.h.parameters() if p.ndim == 2],
            "embedding": [self.transformer.wte.weight, *self.value_embeds.parameters()],
            "unembedding": [self.lm_head.weight],
            "scalar": [self.resid_lambdas, self.x0_lambdas, *smear],
        }
        if fine:
            groups["embedding"] = [self.transformer.wte.weight]
            groups["value_embedding"] = list(self.value_embeds.parameters())
            del groups["scalar"]
            groups["resid"], groups["x0"], groups["smear"] = [self.resid_lambdas], [self.x0_lambdas], smear
        return groups

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """FLOPs per token of a training step (forward + backward), nanochat's formula for MFU: 6 per
        matmul weight (2 forward, 4 backward; embedding lookups and scalars are not matmuls), plus
        12 * n_head * head_dim * keys seen per layer for q @ k and att @ v, a window capping the keys."""
        cfg = self.config
        not_matmul = self.transformer.wte.weight.numel() + self.resid_lambdas.numel() + self.x0_lambdas.numel()
        not_matmul += sum(p.numel() for p in self.value_embeds.parameters())
        not_matmul += sum(p.numel() for p in (self.smear_lambda, self.backout_lambda) if p is not None)
        t = cfg.sequence_len
        attention = sum(12 * cfg.n_head * cfg.head_dim * (t if w is None else min(w, t)) for w in self.window_sizes)
        return float(6 * (self.num_params() - not_matmul) + attention)
