"""
The `nanochat` command line: argument parsing and wiring only; the work lives in trainer/ and serving/.

Notable:
- global options (--config, --set, --storage, --ray-address, --run, --preset) go before, between or after
  the words of a command; --config and --set given in several places all count, in the order given
- exit status: 0 success, 2 bad usage or configuration (the message names the field), 1 any other failure
- every stage prints one JSON line last on stdout, for scripts
- heavy imports (torch, ray) happen inside the handlers so `nanochat --help` is instant
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from nanochat.config import Config, ConfigError, available_presets, load_config
from trainer.stages.table import STAGES, StageFailed

log = logging.getLogger("nanochat")


# ---------------------------------------------------------------------------
# argument parsing


LEVELS = 3  # where options may stand: before the command, after a group (`train`), after its action (`base`)


def _global_options(parser: argparse.ArgumentParser, level: int) -> None:
    """The same options on the main parser, every command group and every command, so they may come before,
    between or after the words of a command.

    argparse copies a subcommand's values over its parent's, so below the top the defaults are SUPPRESS (a
    value given before is not reset) and each level keeps --config and --set in lists of its own, joined in
    the order given by config_files() and overrides()."""
    default = argparse.SUPPRESS if level else None
    g = parser.add_argument_group("global options")
    g.add_argument("--config", action="append", default=[], dest=f"config_{level}", metavar="FILE", help="YAML config file (repeatable, later wins)")
    g.add_argument("--set", action="append", default=[], dest=f"overrides_{level}", metavar="KEY=VALUE", help="override one config key, e.g. train.max_steps=50 (repeatable)")
    g.add_argument("--preset", default=default, help=f"preset from configs/ ({', '.join(available_presets())})")
    g.add_argument("--storage", default=default, metavar="URI", help="local folder or s3://bucket/prefix (default: $NANOCHAT_STORAGE or ~/.cache/nanochat)")
    g.add_argument("--ray-address", default=default, metavar="ADDR", help="existing Ray cluster (omit: start an embedded local Ray)")
    g.add_argument("--run", default=default, metavar="NAME", help="run name: checkpoints go to runs/<NAME>/")
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


def config_files(args: argparse.Namespace) -> list[str]:
    """Every --config, in the order given on the command line."""
    return [path for level in range(LEVELS) for path in getattr(args, f"config_{level}", [])]


def overrides(args: argparse.Namespace) -> list[str]:
    """Every --set, in the order given on the command line."""
    return [item for level in range(LEVELS) for item in getattr(args, f"overrides_{level}", [])]


def _group(commands: Any, name: str, help: str) -> Any:
    """A command group (`train`, `eval`, ...): its subparsers, one per action."""
    group = commands.add_parser(name, help=help)
    _global_options(group, level=1)
    return group.add_subparsers(dest="action", required=True)


def _metrics_port_option(parser: argparse.ArgumentParser) -> None:
    """Where the embedded Ray cluster a command starts serves its Prometheus metrics (services/ray_cluster.py)."""
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="the embedded Ray cluster's Prometheus metrics at http://127.0.0.1:PORT/metrics (default: "
                             "$NANOCHAT_METRICS_PORT, else 8080, or a free port while another process holds 8080; "
                             "0: a port of Ray's choosing)")


def _add(subparsers: Any, name: str, help: str, handler: Callable[[argparse.Namespace, Config], int],
         level: int = 2) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=help)
    _global_options(p, level)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat",
        description="Train a small ChatGPT-like model from scratch and serve it.",
        epilog="Run `nanochat COMMAND --help` for a command's options.",
    )
    _global_options(parser, level=0)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = _group(commands, "data", "corpus preparation")
    _add(data, "prepare", "write the configured corpus as parquet shards into storage", _data_prepare)

    tok = _group(commands, "tok", "tokenizer training and evaluation")
    _add(tok, "train", "train the BPE tokenizer on the corpus", _tok_train)
    p = _add(tok, "eval", "print the tokenizer's compression table (bytes per token)", _tok_eval)
    p.add_argument("--vocab-sizes", default="", help="also train and compare these vocab sizes, e.g. 1024,2048")

    train = _group(commands, "train", "training stages (Ray Train jobs)")
    for spec in STAGES.values():
        stage = spec.name
        p = _add(train, stage, spec.description, _train)
        p.add_argument("--workers", type=int, help="Ray Train workers (overrides train.workers)")
        p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (overrides train.gpus_per_worker)")
        _metrics_port_option(p)
        if len(spec.workers) > 1:
            p.add_argument("--backend", choices=["torch", "jax"], help="PyTorch DDP or JAX on a device mesh (overrides train.backend)")

    evals = _group(commands, "eval", "evaluations")
    for kind, text in [("loss", "bits per byte on the train and validation splits"), ("core", "the CORE metric (DCLM task bundle)")]:
        p = _add(evals, kind, text, _eval)
        _metrics_port_option(p)
        p.add_argument("--stage", default="base", help="which stage's newest checkpoint to evaluate (default: base)")
        if kind == "core":
            p.add_argument("--tasks", default="", help="comma-separated CORE task labels (default: all)")
    p = _add(evals, "chat", "chat tasks (ARC, MMLU, GSM8K, HumanEval, spelling) and ChatCORE", _eval_chat)
    p.add_argument("--stage", default="sft", help="which stage's newest checkpoint to evaluate (default: sft)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: chat_eval.tasks)")
    _metrics_port_option(p)

    p = _add(commands, "speedrun", "all stages in order, skipping those already complete", _speedrun, level=1)
    p.add_argument("--rl", action="store_true", help="include the RL stage")
    _metrics_port_option(p)

    experiment = _group(commands, "experiment", "research experiments")
    p = _add(experiment, "sweep", "train each variant of experiment.variants at an equal FLOPs budget, in parallel "
             "as Ray tasks; results table and plot into storage", _experiment_sweep)
    _metrics_port_option(p)

    p = _add(commands, "serve", "the OpenAI-compatible server and web UI", _serve, level=1)
    p.add_argument("--model", metavar="URI", help="checkpoint to serve (default: the newest SFT checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    _metrics_port_option(p)

    p = _add(commands, "chat", "chat in the terminal", _chat, level=1)
    p.add_argument("-p", "--prompt", help="one-shot prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server to talk to; when none answers, the newest SFT checkpoint runs here")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), metavar="KEY",
                   help="the server's API key (default: $NANOCHAT_API_KEY)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--logprobs", action="store_true",
                   help="print each reply's tokens with their log-probabilities (from a server)")

    _add(commands, "report", "write report.md from what storage holds", _report, level=1)
    return parser


# ---------------------------------------------------------------------------
# shared wiring


def config_from_args(args: argparse.Namespace) -> Config:
    settings = overrides(args)
    if args.run:
        settings.append(f"run={args.run}")
    for flag, key in [("workers", "train.workers"), ("gpus_per_worker", "train.gpus_per_worker"), ("backend", "train.backend")]:
        value = getattr(args, flag, None)
        if value is not None:
            settings.append(f"{key}={value}")
    return load_config(preset=args.preset, config_files=config_files(args), overrides=settings)


def storage_from_args(args: argparse.Namespace):
    from services.storage import StorageURIError, open_storage

    try:
        return open_storage(args.storage)
    except StorageURIError as e:  # a usage error: exit 2, naming where the URI came from
        raise ConfigError(f"{'--storage' if args.storage else '$NANOCHAT_STORAGE'}: {e}") from None


def emit_result(stage: str, cfg: Config, started: float, **fields: Any) -> None:
    """The stage's last line on stdout: one JSON object for scripts."""
    result = {"stage": stage, "run": cfg.run, "steps": 0, "tokens": 0, "seconds": round(time.time() - started, 3),
              "tokens_per_second": 0.0, "metrics": {}}
    result.update(fields)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# handlers


def _data_prepare(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.data.corpus import prepare_corpus

    started = time.time()
    summary = prepare_corpus(cfg.data, storage_from_args(args))
    emit_result("data_prepare", cfg, started, metrics=summary)
    return 0


def _tok_train(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.data.tokenizer import train_tokenizer

    started = time.time()
    summary = train_tokenizer(cfg, storage_from_args(args))
    emit_result("tok_train", cfg, started, metrics=summary.get("metrics", summary))
    return 0


def _tok_eval(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.data.tokenizer import evaluate_tokenizer

    started = time.time()
    try:
        sizes = [int(s) for s in args.vocab_sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--vocab-sizes expects comma-separated integers, got {args.vocab_sizes!r}") from None
    table, results = evaluate_tokenizer(cfg, storage_from_args(args), sizes or None)
    print(table)
    emit_result("tok_eval", cfg, started, metrics=results)
    return 0


def _train(args: argparse.Namespace, cfg: Config) -> int:
    from services.checkpoints import CheckpointManager
    from services.layout import run_prefix
    from trainer.data.tokenizer import load_tokenizer
    from trainer.pipeline.jobs import run_stage, stage_function

    train_fn = stage_function(args.action, cfg)  # configuration first: before storage is opened or Ray starts
    storage = storage_from_args(args)
    # read what every worker needs before Ray starts (seconds) or a cluster schedules workers: an
    # unreachable endpoint, a missing bucket or a missing tokenizer fails here in seconds, naming its cause
    load_tokenizer(storage)
    sources = STAGES[args.action].starts_from
    if sources and all(CheckpointManager(storage, cfg.run, s).latest_step() is None for s in sources):
        raise StageFailed(f"no {' or '.join(sources)} checkpoint in {run_prefix(cfg.run)}: run `nanochat train {sources[0]}` first")
    summary = run_stage(args.action, train_fn, cfg, storage, ray_address=args.ray_address)
    print(json.dumps(summary), flush=True)
    return 0


def _eval(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.evals.core import CORE_TASKS, core_bundle_dir
    from trainer.pipeline.jobs import run_eval

    tasks = _task_list(getattr(args, "tasks", ""))
    if args.action == "core":
        _check_known("CORE task", tasks or [], [spec.label for spec in CORE_TASKS])
    started, storage = time.time(), storage_from_args(args)
    if args.action == "core":
        core_bundle_dir(cfg, storage)  # fail here, before Ray starts, if the bundle cannot be had
    result = run_eval(args.action, cfg, storage, stage=args.stage, tasks=tasks, ray_address=args.ray_address)
    metrics = {k: v for k, v in result.items() if k not in ("stage", "kind")}
    emit_result(f"eval_{args.action}", cfg, started, metrics=metrics)
    return 0


def _eval_chat(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.tasks import TASKS

    _check_known("chat task", _task_list(args.tasks) or cfg.chat_eval.tasks, list(TASKS))
    return _eval(args, cfg)


def _task_list(tasks: str) -> list[str] | None:
    """--tasks a,b as names (None: not given)."""
    return [t.strip() for t in tasks.split(",") if t.strip()] or None


def _check_known(kind: str, names: list[str], known: list[str]) -> None:
    """A typo in --tasks is a usage error, found before Ray starts."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--tasks: unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _check_model_exists(source) -> None:
    """A --model pinned to a step must exist: fail in seconds, before Ray starts. Without a step the server
    starts anyway, answers 503 until the stage's first checkpoint lands, and then serves it."""
    from services.checkpoints import CheckpointManager
    from services.layout import TOKENIZER_KEY
    from services.storage import open_storage

    if source.step is None:
        return
    storage = open_storage(source.storage)
    if not storage.exists(TOKENIZER_KEY):
        raise StageFailed(f"no tokenizer in {storage.uri}: run `nanochat tok train` first")
    if source.step not in CheckpointManager(storage, source.run, source.stage).list_steps():
        raise StageFailed(f"no checkpoint at {source.describe()}: run `nanochat train {source.stage}` first")


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    from services.ray_cluster import check_port_free
    from serving.model_source import ModelSource
    from serving.server import run_server

    if args.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {args.replicas}")
    check_port_free(args.port, "--port", ray_may_choose=False)  # Serve would fail to start on it, and say less
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"min_replicas": args.replicas,
                                                                       "max_replicas": args.replicas})})
    if args.model:
        try:
            source = ModelSource.parse(args.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        source = ModelSource(storage_from_args(args).uri, cfg.run, cfg.serve.stage)
    _check_model_exists(source)
    run_server(cfg, source, host=args.host, port=args.port, ray_address=args.ray_address)
    return 0


def _chat(args: argparse.Namespace, cfg: Config) -> int:
    from serving.chat_cli import run_chat

    return run_chat(args.prompt, url=args.url, api_key=args.api_key, temperature=args.temperature,
                    max_tokens=args.max_tokens, logprobs=args.logprobs, storage=args.storage, run=cfg.run, stage=cfg.serve.stage)


def _speedrun(args: argparse.Namespace, cfg: Config) -> int:
    from services.checkpoints import CheckpointManager
    from trainer.pipeline.speedrun import speedrun

    started, storage = time.time(), storage_from_args(args)
    print(f"speedrun: preset {cfg.preset}, run {cfg.run}, storage {storage.uri}", flush=True)
    stages = speedrun(cfg, storage, ray_address=args.ray_address, with_rl=args.rl)
    summary = CheckpointManager(storage, cfg.run, "base").done_summary() or {}
    emit_result("speedrun", cfg, started, steps=summary.get("steps", 0), tokens=summary.get("tokens", 0),
                tokens_per_second=summary.get("tokens_per_second", 0.0), metrics={"stages": stages})
    return 0


def _experiment_sweep(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.pipeline.sweeps import plan_sweep, results_table, run_sweep, summary

    started = time.time()
    plan_sweep(cfg)  # a bad variant is a usage error, found before storage or Ray is touched
    storage = storage_from_args(args)
    sweep = run_sweep(cfg, storage, ray_address=args.ray_address)
    print(results_table(sweep["variants"]), flush=True)
    emit_result("experiment", cfg, started, **summary(sweep, storage))
    return 0


def _report(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.pipeline.report import write_report

    started = time.time()
    path = write_report(cfg, storage_from_args(args))
    print(f"report: {path}", flush=True)
    emit_result("report", cfg, started, metrics={"path": str(path)})
    return 0


# ---------------------------------------------------------------------------


def _use_metrics_port(port: int | None) -> None:
    """--metrics-port, for the embedded Ray cluster the command may start (services/ray_cluster.py reads it)."""
    from services.ray_cluster import METRICS_PORT_ENV, check_port_free

    if port is None:
        return
    if port:
        check_port_free(port, "--metrics-port")
    os.environ[METRICS_PORT_ENV] = str(port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _use_metrics_port(getattr(args, "metrics_port", None))
        # the configuration is validated before any stage starts, so a typo costs nothing
        return args.handler(args, config_from_args(args))
    except ConfigError as e:
        print(f"nanochat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanochat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the top level names the stage and cause, then exits 1
        log.debug("failure", exc_info=True)
        name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        print(f"nanochat: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
