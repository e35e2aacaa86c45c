"""
Typed run configuration: one pydantic model per concern, loaded from layered YAML files.

Notable:
- every section forbids unknown keys, so a typo in a YAML file or in `--set` is an error, not a silent default
- the depth dial (`model.depth`) derives width and heads, as in nanochat; the preset files only set what differs
- `load_config` layers: preset -> `--config` files (later wins) -> `--set a.b=c` overrides (values parsed as YAML)
- errors are raised as `ConfigError` whose message names the field path and what is allowed; the CLI exits 2
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


# a name that becomes one folder in storage: letters, digits, '_', '-' and '.', but not only dots ('.' and
# '..' would name the folder above, or its parent)
FOLDER_NAME = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A configuration problem a user can fix: the message names the field and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    depth: int = Field(4, ge=1, le=128, description="number of transformer layers; width = aspect_ratio * depth")
    aspect_ratio: int = Field(64, ge=8, description="model width per layer of depth (nanochat's dial)")
    head_dim: int = Field(128, ge=8, description="target attention head dimension; heads = ceil(width / head_dim)")
    n_kv_head: int | None = Field(None, ge=1, description="key/value heads for grouped-query attention (default: all heads)")
    window_pattern: str = Field("L", pattern=r"^[SL]+$", description="per-layer attention: L = full, S = sliding window; cycled over layers, the last layer is always L")
    softcap: float = Field(15.0, gt=0, description="tanh soft-capping of the logits")
    rope_base: float = Field(10000.0, gt=0, description="rotary base (theta); nanochat's record run uses 100000, which turns the slowest channels more slowly, for longer contexts")
    qk_scale: float = Field(1.0, gt=0, description="q and k are multiplied by it after QK-norm (nanochat's record run: 1.2, sharper attention); 1.0 is the plain QK-norm model")
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    activation: Literal["relu2", "gelu", "swiglu"] = "relu2"
    qk_norm: bool = True
    attention: Literal["auto", "sdpa", "flex"] = Field("auto", description="training attention kernels: auto = FlexAttention for the sliding-window layers on a GPU (its block mask skips the hidden score tiles) and SDPA elsewhere; sdpa = SDPA everywhere (a window is a dense mask and costs as much as full attention); flex = FlexAttention for every layer (GPU only for training: it has no backward pass on a CPU). Inference (KV caches, serving) is unaffected")
    smear: bool = Field(False, description="add to each token's embedding a gated share of the previous token's (nanochat's record run: on): bigram information before the first attention layer; adds 25 parameters")
    backout: bool = Field(False, description="subtract a learned share (initially 0.2) of the middle layer's residual stream before the final norm (nanochat's record run: on): removes low-level features the prediction does not want; adds 1 parameter")


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=256 + 9, description="BPE vocabulary size including the special tokens")
    max_chars: int = Field(20_000_000, ge=1, description="characters of the corpus used to train the tokenizer")
    doc_cap: int = Field(10_000, ge=1, description="characters taken from any one document for tokenizer training")


class DataConfig(Section):
    source: Literal["stdlib", "fineweb-edu", "climbmix", "local"] = Field(
        "stdlib", description="stdlib: Python's own library sources (no download); fineweb-edu/climbmix: hub parquet shards; local: a folder of parquet or text files"
    )
    corpus: str | None = Field(None, description="name under data/ in storage (default: the source name)")
    local_path: str | None = Field(None, description="folder read when source = local")
    base_url: str | None = Field(None, description="override the download URL of the hub shards (a mirror)")
    num_shards: int = Field(-1, ge=-1, description="shards to download for hub sources (-1: all the source has)")
    docs_per_shard: int = Field(2000, ge=1, description="documents per parquet shard written by `data prepare`")
    row_group_size: int = Field(256, ge=1, description="documents per parquet row group (the unit a worker streams)")
    val_shards: int = Field(1, ge=1, description="the last N shards form the validation split")
    tasks_dir: str | None = Field(None, description="folder of local task files (jsonl/parquet) used instead of Hugging Face downloads")
    offline: bool = Field(False, description="never download: tasks without local files are skipped (with the reason)")

    @property
    def corpus_name(self) -> str:
        return self.corpus or self.source


class TrainConfig(Section):
    seq_len: int = Field(256, ge=8, description="tokens per training row")
    device_batch_size: int = Field(8, ge=0, description="rows per worker per micro-step (0: auto, the most that fit the GPU's memory and divide the rows each worker trains per step, measured at the start of base pretraining; on a CPU, and for `eval loss`, 8 or the largest divisor below it)")
    total_batch_size: int = Field(4096, ge=1, description="tokens per optimizer step across all workers (gradient accumulation fills the gap)")
    max_steps: int = Field(-1, ge=-1, description="optimizer steps (-1: derive from target_param_data_ratio)")
    target_param_data_ratio: float = Field(12.0, gt=0, description="tokens = ratio * parameters, when max_steps = -1")
    workers: int = Field(2, ge=1, description="Ray Train workers (processes or GPU pods)")
    gpus_per_worker: float = Field(0, ge=0)
    threads_per_worker: int = Field(0, ge=0, description="torch threads of a CPU worker (0: the command's OMP_NUM_THREADS where set, else the node's CPUs divided among the workers on that node)")
    embedding_lr: float = Field(0.3, gt=0)
    unembedding_lr: float = Field(0.008, gt=0)
    matrix_lr: float = Field(0.02, gt=0)
    scalar_lr: float = Field(0.5, gt=0)
    weight_decay: float = Field(0.28, ge=0, description="Muon's cautious weight decay, decayed on a cosine to zero (recipe record: this is the d12 value, scaled to the model's depth and batch)")
    recipe: Literal["classic", "record"] = Field("classic", description="optimizer recipe: classic = one set of AdamW betas, no AdamW decay, the scalars at scalar_lr, learning rates and weight decay as given; record = nanochat's record run: per-group AdamW betas and decays, resid_lambdas at 1% of scalar_lr, value embeddings at half the embedding lr, NorMuon beta2 0.9, and base pretraining's learning rates x sqrt(total_batch_size / 2**19) and weight decay scaled to the depth (trainer/optim.py)")
    warmup_ratio: float = Field(0.01, ge=0, le=1)
    warmdown_ratio: float = Field(0.65, ge=0, le=1)
    final_lr_frac: float = Field(0.05, ge=0, le=1)
    eval_every: int = Field(100, ge=-1, description="validation bits per byte every N steps (-1: only at the end)")
    eval_tokens: int = Field(65536, ge=1, description="validation tokens per evaluation")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept per stage")
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train may make")
    seed: int = 42
    backend: Literal["torch", "jax"] = Field("torch", description="base pretraining in PyTorch (DDP) or JAX (sharded over a device mesh; the jax section)")
    compile: bool | None = Field(None, description="torch.compile the model the loop trains (unset: on GPUs, where it takes much less memory and runs faster; off on CPUs, where compiling takes longer than a short run saves)")
    shard_optimizer: bool = Field(False, description="ZeRO-1 with several workers: each worker keeps the AdamW/Muon state (about 2 floats per AdamW and 1 per Muon parameter element) only for the whole parameters it owns, about 1/workers of it, and frees the other parameters' gradients after each step; gradients are summed onto their owners instead of all-reduced (no DDP) and the updated parameters broadcast. Checkpoints gather the state into the usual format, so a run resumes with it on or off. No effect with one worker; torch backend only")
    fp8: bool = Field(False, description="base pretraining's Linear matmuls in FP8 (torchao, tensorwise scaling; lm_head stays bf16): needs GPU workers of compute capability 8.9 or newer (H100, H200, L4, B200) and runs faster under torch.compile; weights and checkpoints are unchanged")

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.backend == "jax" and self.recipe != "classic":
            raise ValueError(f"train.recipe={self.recipe!r}: the JAX backend trains with the classic optimizer groups only")
        if self.backend == "jax" and self.shard_optimizer:
            raise ValueError("train.shard_optimizer applies to the torch backend; the JAX backend shards its optimizer state over the jax section's fsdp mesh axis instead")
        if self.fp8 and (self.backend != "torch" or self.gpus_per_worker == 0):
            where = "the JAX backend" if self.backend != "torch" else "CPU workers (train.gpus_per_worker is 0)"
            raise ValueError(f"train.fp8 needs torch GPU workers of compute capability 8.9 or newer; this run trains on {where}")
        if self.device_batch_size == 0:
            if self.backend != "torch":
                raise ValueError("train.device_batch_size=0 (auto) is for the torch backend; the JAX backend needs a number of rows")
            rows_per_step = self.seq_len * self.workers
            if self.total_batch_size % rows_per_step != 0:
                raise ValueError(
                    f"train.device_batch_size=0 (auto) splits train.total_batch_size ({self.total_batch_size}) into whole "
                    f"rows for every worker: it must be a multiple of train.seq_len * train.workers ({rows_per_step})")
            return self
        rows = self.device_batch_size * self.seq_len
        if self.total_batch_size % rows != 0:
            raise ValueError(
                f"train.total_batch_size ({self.total_batch_size}) must be a multiple of "
                f"train.device_batch_size * train.seq_len ({rows})"
            )
        return self


class ChatStageConfig(Section):
    """A chat training stage (midtraining or SFT): conversations rendered with the special tokens, loss on
    assistant tokens only, starting from the previous stage's newest checkpoint."""

    tasks: dict[str, float] = Field(description="task mixture: task name -> weight (epochs of that task per mixture epoch; 0 leaves it out)")
    max_steps: int = Field(-1, ge=-1, description="optimizer steps (-1: one pass over the mixture)")
    device_batch_size: int = Field(4, ge=1, description="rows of train.seq_len tokens, packed with whole conversations, per worker per micro-step (at most: the budget sets how many)")
    tokens_per_step: int = Field(524288, ge=1, description="tokens per optimizer step across workers, padding included (nanochat's midtraining batch); split into rows per worker and micro-steps for any worker count")
    lr_frac: float = Field(1.0, gt=0, description="learning rates as a fraction of the base stage's")
    weight_decay: float = Field(0.0, ge=0, description="Muon's weight decay: 0, as nanochat's chat stages and RL (base pretraining has already decayed it to zero)")
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="the last fraction of the steps, learning rates fall linearly to final_lr_frac")
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    max_examples: int = Field(-1, ge=-1, description="cap on examples drawn from each task (-1: all)")
    eval_every: int = Field(-1, ge=-1, description="validation loss every N steps (-1: only at the end)")
    warm_start_optimizer: bool = Field(True, description="the optimizers start from the state of the checkpoint the stage starts from (Muon's momentum, AdamW's moments), with this stage's learning rates and decays, as nanochat's SFT loads the pretraining optimizer's; false: fresh optimizers")


class MidConfig(ChatStageConfig):
    tasks: dict[str, float] = Field(default_factory=lambda: {"smoltalk": 1.0, "identity": 2.0, "spelling": 1.0, "gsm8k": 1.0, "mmlu": 1.0})


class SFTConfig(ChatStageConfig):
    tasks: dict[str, float] = Field(default_factory=lambda: {"smoltalk": 1.0, "identity": 2.0, "spelling": 1.0, "gsm8k": 1.0, "arc-easy": 1.0, "arc-challenge": 1.0})
    lr_frac: float = Field(0.02, gt=0, description="nanochat's SFT starts at 2% of the base learning rates")
    warmdown_ratio: float = Field(1.0, ge=0, le=1, description="SFT decays linearly to zero over the whole stage")


class RLConfig(Section):
    tasks: dict[str, float] = Field(default_factory=lambda: {"gsm8k": 1.0})
    max_steps: int = Field(-1, ge=-1, description="optimizer steps (-1: one pass over the prompts)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per optimizer step across workers")
    samples_per_prompt: int = Field(8, ge=1, description="k samples per prompt; advantage = reward - mean of the k")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(50, ge=0)
    lr_frac: float = Field(0.05, gt=0)
    max_examples: int = Field(-1, ge=-1)


class ChatEvalConfig(Section):
    tasks: list[str] = Field(default_factory=lambda: ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spelling"])
    max_problems: int = Field(-1, ge=-1, description="problems per task (-1: all)")
    num_samples: int = Field(1, ge=1, description="samples per problem for generative tasks (pass@k)")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(50, ge=0)


class EvalConfig(Section):
    core_bundle: str | None = Field(None, description="folder holding the CORE eval bundle's jsonl files (default: download it into the cache)")
    core_max_per_task: int = Field(-1, ge=-1, description="items per CORE task (-1: all)")
    loss_tokens: int = Field(1_048_576, ge=1, description="tokens per split for `eval loss`")


# the API ingress's default bound on requests at once: none in effect (Ray Serve LLM's ingress default)
UNBOUNDED_INGRESS = 10**9


class ServeConfig(Section):
    model_name: str = Field("nanochat", description="the model id the API answers to (/v1/models)")
    stage: str = Field("sft", description="serve the newest checkpoint of this stage when --model is not given")
    reload_interval_s: float = Field(30, ge=0, description="how often the server looks for a newer checkpoint of serve.stage (its `latest` marker) and swaps it in without a restart (0: never; a --model pinned to a step never reloads)")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    num_blocks: int = Field(512, ge=2, description="KV-cache blocks per engine replica, each every layer's keys and values for block_size tokens (unless kv_cache_memory_fraction is set); with serve.hybrid_kv_cache the same memory holds more blocks for the full-context layers")
    kv_cache_memory_fraction: float | None = Field(None, ge=0, le=1, description="size the KV cache to this fraction of the memory free once the model is loaded (the GPU's free memory; on a CPU the RAM available), as vLLM's gpu_memory_utilization; replicas sharing a device each take their fraction of what is free when they start (0: serve.num_blocks blocks; unset: 0.9 on a GPU, 0 on a CPU). A cache sized this way fills the memory a second one would need, so a checkpoint reload first lets the old engine's requests finish (new ones wait, for up to serve.drain_timeout_s) and frees its cache, then starts the new engine in that memory")
    max_num_seqs: int = Field(16, ge=1, description="sequences decoded together in one step")
    max_num_batched_tokens: int = Field(512, ge=1, description="tokens per engine step (prefill chunks + decodes)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights and KV cache: auto = bfloat16 on a GPU, float32 on a CPU")
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="KV cache, and the attention that reads it: auto = serve.dtype (vLLM's kv_cache_dtype); bfloat16 under float32 weights on a CPU halves the bytes each step gathers and reads and holds twice the tokens in the same memory")
    hybrid_kv_cache: bool = Field(True, description="sliding-window layers keep only their window: their keys and values live in a pool of their own, sized so it never runs short, and the blocks behind a sequence's window go back to it, leaving the full-context layers more blocks in the same memory (vLLM's hybrid KV cache manager; false: every layer keeps every token, as vLLM's --disable-hybrid-kv-cache-manager). Only for models with window layers, and only when the split gives the full-context layers more blocks")
    enforce_eager: bool = Field(False, description="decode eagerly instead of replaying CUDA graphs (GPU only)")
    compile_decode: bool = Field(False, description="compile the decode step (torch.compile, one graph for every batch size) before capturing its CUDA graphs, so each replay runs fused kernels; start-up takes longer. GPU only, not with enforce_eager; a step that fails to compile is logged and captured uncompiled")
    async_scheduling: bool = Field(False, description="schedule and launch each engine step before reading the tokens of the one before (vLLM's async scheduling): on a GPU the host's scheduling, detokenisation and streaming overlap the device's step instead of leaving it idle. A request whose sampling reads its own tokens (a grammar, penalties, min_tokens) has its step read before the next is scheduled")
    scheduling_policy: Literal["fcfs", "priority"] = Field("fcfs", description="the order of the engine's queue (vLLM's scheduling policy): fcfs = first come first served; priority = by each request's `priority` (lower first, then arrival), a running request of the lowest priority preempted first when the KV cache runs short. A request's `priority` is a 400 under fcfs")
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="paged attention: flex = FlexAttention over the KV cache in place (compiled, no per-step "
        "gather), sdpa = gather each sequence's blocks for masked SDPA; auto = flex on a GPU, sdpa on a CPU")
    engine_core: Literal["thread", "process"] = Field("thread", description="where an engine replica's engine steps: thread = a thread of the replica's process; process = a child process of its own (vLLM's EngineCore process), so stepping and the replica's streaming (asyncio, Serve's gRPC, pickling) run on separate cores instead of taking turns on one GIL (the replica then holds the model only in the child: it loads it on the CPU and hands it over)")
    max_queue: int = Field(64, ge=1, description="running + waiting requests per replica before 429")
    max_prompt_tokens: int = Field(2048, ge=1)
    allowed_origins: list[Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+)$")]] = Field(
        default_factory=list, description="origins whose web pages may call the API from a browser (CORS, vLLM's "
        "--allowed-origins), e.g. [https://app.example.com]; ['*']: any; empty: none but the server's own web UI, "
        "which needs none. On Kubernetes an Ingress controller's CORS settings do the same")
    max_tokens_limit: int = Field(1024, ge=1, description="the largest max_tokens a request may ask for")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: int = Field(8, ge=1, description="autoscaling target per engine replica")
    max_ongoing_requests: int = Field(32, ge=1, description="Ray Serve's per-replica cap; near the batch size")
    max_queued_requests: int = Field(64, ge=-1, description="Ray Serve's queue bound per engine replica, past which a request gets a 429 (-1: unbounded)")
    api_max_ongoing_requests: int = Field(0, ge=0, description="requests the API ingress replica handles at once; Serve's proxy holds the rest until it has room (0: no bound, as Ray Serve LLM's ingress: the ingress is asynchronous and answers a request past the engines' bound with a 429 and Retry-After at once, while one waiting in Serve's proxy for room gets no answer; Ray Serve's own default is 5)")
    drain_timeout_s: float = Field(30, ge=0, description="on shutdown (SIGTERM), how long requests in flight may go on finishing while new ones get 503 with Retry-After; those still running then end with an error event (Ray Serve's graceful_shutdown_timeout_s of both deployments)")
    stream_interval_s: float = Field(0.0, ge=0, description="least time between two messages of one stream from an engine replica to the API (the first token and the end go at once); each carries every token made meanwhile, and the API sends them as one SSE chunk per choice: fewer, larger messages through Ray's hops and fewer chunks for the client to parse, for many concurrent streams on few cores, at the cost of a burstier stream (0: one message per engine step)")
    transport: Literal["grpc", "ray"] = Field("grpc", description="how requests and their token streams travel between Serve's HTTP proxy, the API replica and the engine replicas: grpc = Ray Serve's direct gRPC channels between replicas (fewer copies and hops per message); ray = Ray actor calls with object-store streaming generators (Serve's default). `nanochat serve` sets the proxy's side on the embedded cluster; on a cluster it started, the proxy follows RAY_SERVE_PROXY_USE_GRPC in the Ray pods' environment (the chart sets it)")
    ingress: Literal["proxy", "haproxy"] = Field("haproxy", description="how HTTP requests reach the API replicas: haproxy = Ray Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED and RAY_SERVE_ENABLE_HA_PROXY): HAProxy, bundled with ray[serve], listens on the serve port and routes each request straight to an API replica's own HTTP server (direct ingress), and Serve runs replicas' code and routers on their main event loops; proxy = Ray Serve's HTTP proxy actor forwards each one (Serve's own default). `nanochat serve` sets it up on the embedded cluster; on a cluster it started, the Ray pods' environment decides (the chart sets it)")
    routing: Literal["prefix", "power_of_two"] = Field("prefix", description="how the API picks an engine replica: prefix = the one that last ran the longest prefix of the prompt (whole KV blocks), so shared prefixes stay in one replica's cache (the less loaded of two others when it is full or nothing matches); power_of_two = Ray Serve's default, the less loaded of two at random")
    num_cpus: float = Field(1, ge=0, description="CPUs per engine replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per engine replica")

    @property
    def ingress_max_ongoing_requests(self) -> int:
        """api_max_ongoing_requests, or by default no bound (Ray Serve takes a very large number)."""
        return self.api_max_ongoing_requests or UNBOUNDED_INGRESS


class JaxConfig(Section):
    """The JAX backend of base pretraining (train.backend = jax): one process per host, every local device in
    a (data, fsdp) mesh; batches split over both axes, parameters and optimizer state over fsdp."""

    platform: Literal["cpu", "gpu", "tpu"] | None = Field(None, description="the devices JAX trains on (default: what JAX finds first)")
    fsdp: int = Field(1, ge=-1, description="mesh devices that shard parameters and optimizer state (-1: all; must divide the device count)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="matmul compute dtype; parameters and optimizer state stay float32")
    cpu_devices: int = Field(1, ge=1, description="virtual CPU devices per process (XLA's host device count) when platform is cpu")
    tpu_topology: str | None = Field(None, description="TPU slice topology for Ray's scheduler, e.g. 2x4 (with tpu_accelerator)")
    tpu_accelerator: str | None = Field(None, description="TPU generation for Ray's scheduler, in Ray's spelling: TPU-V6E, TPU-V5P, TPU-V4, or TPU-V5LITEPOD for v5e")
    compilation_cache: str = Field("~/.cache/nanochat/jax-cache", description="folder for XLA's persistent compilation cache, so a resumed or repeated run reuses its compiled steps (empty: off)")


class ExperimentConfig(Section):
    """An architecture sweep (`nanochat experiment sweep`): each variant is a set of `--set`-style overrides
    trained at the same FLOPs budget."""

    name: str = Field("sweep", pattern=FOLDER_NAME, description="results go to runs/<run>/experiments/<name>/")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="variant name -> {dotted model.* or train.* key: value}; the corpus and tokenizer are shared")
    flops_budget: float | None = Field(None, gt=0, description="training FLOPs per variant (default: the first variant at train.max_steps, or its depth-dial horizon)")
    eval_points: int = Field(4, ge=1, description="validation evaluations per variant, evenly spaced in steps (so in FLOPs), the last at the end: the plot's points")
    cpus_per_variant: float = Field(1, gt=0, description="CPUs each variant's Ray task reserves")
    gpus_per_variant: float = Field(0, ge=0, description="GPUs each variant's Ray task reserves")


class LogConfig(Section):
    every: int = Field(10, ge=1, description="steps between metric reports to Ray Train, besides those with each checkpoint (each waits for Ray Train's controller to take it); TensorBoard, W&B, Prometheus and the progress bar get every step")
    ray_train: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="level of Ray Train's own messages on the console (at INFO: the worker group starting, every report and checkpoint); its log files in the Ray session folder keep all of them")
    tensorboard: bool = Field(True, description="write TensorBoard event files under runs/<run>/tensorboard/")
    wandb: Literal["disabled", "offline", "online"] = Field("disabled", description="Weights & Biases: offline needs no key; online needs WANDB_API_KEY")
    wandb_project: str = "nanochat"


class Config(Section):
    preset: str = "tiny-cpu"
    run: str = Field("default", pattern=FOLDER_NAME, description="run name: checkpoints go to runs/<run>/")
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mid: MidConfig = MidConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    chat_eval: ChatEvalConfig = ChatEvalConfig()
    serve: ServeConfig = ServeConfig()
    jax: JaxConfig = JaxConfig()
    experiment: ExperimentConfig = ExperimentConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _check_backend_architecture(self) -> Config:
        if self.train.backend == "jax":
            for key in ("smear", "backout"):
                if getattr(self.model, key):
                    raise ValueError(f"model.{key}=true: the JAX backend (train.backend=jax) does not implement it")
        return self


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _section(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    field = model.model_fields.get(key) if model else None
    annotation = field.annotation if field else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _merge(base: dict[str, Any], override: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Later layers win key by key inside sections; a mapping-valued setting (a task mixture) is replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        section = _section(model, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and (section or model is None):
            merged[key] = _merge(merged[key], value, section)
        else:
            merged[key] = value
    return merged


def _parse_set(item: str) -> dict[str, Any]:
    """`a.b=c` -> {"a": {"b": c}} with c parsed as a YAML scalar (so 4 is an int, true a bool)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return _nest(key.strip(), value)


def _nest(key: str, value: Any) -> dict[str, Any]:
    """`a.b`, c -> {"a": {"b": c}}"""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(Config, loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown config key {field!r}{did_you_mean}; allowed here: {', '.join(allowed)}"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    return f"{field}: {error['msg']} (got {got!r})"


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(err) for err in e.errors())) from None


def load_config(
    preset: str | None = None,
    config_files: list[str | Path] = (),
    overrides: list[str] = (),
) -> Config:
    """Layer preset, files and `--set` overrides into one validated Config."""
    layers = [_read_yaml(Path(f)) for f in config_files]
    sets = [_parse_set(s) for s in overrides]
    # the preset may be chosen by a config file or --set as well as by the argument
    merged: dict[str, Any] = {}
    for layer in layers + sets:
        merged = _merge(merged, layer, Config)
    name = preset or merged.get("preset") or "tiny-cpu"
    if name not in available_presets():
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(available_presets())}")
    data = _merge(_read_yaml(PRESETS_DIR / f"{name}.yaml"), merged, Config)
    data["preset"] = name
    return validate(data)


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """cfg with {dotted key: value} settings layered on top, as `--set` layers them (values already parsed)."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        data = _merge(data, _nest(key, value), Config)
    return validate(data)
