#!/usr/bin/env python
"""aiperf on the Mooncake trace: baseline vs FlexKV behind Dynamo's KV router, one table and plots.

    python bench/aiperf_mooncake.py --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
        --model M --tokenizer DIR [--url http://127.0.0.1:PORT | --launch | --launch-mocker] \\
        --configs baseline,flexkv --out DIR

Steps: prepare the trace (keep every 6th request, the published method; optionally scale lengths and
time so a CPU deployment can bear it), set up aiperf in its own virtualenv (cached), then for each
config start the deployment (``--launch``: ``deploy/single_node.sh``; ``--launch-mocker``: Dynamo's
mock engine) or use the running one (``--url``), replay the trace with aiperf on a fixed schedule,
stop what was started, and write ``OUT/results.md``, ``OUT/results.csv`` and PNG plots comparing the
configs found under OUT.

Without ``--model`` it benchmarks the tiny random test model on a scaled-down slice (preset ``cpu``);
with ``--model`` the trace is used as published (preset ``full``). Any slicing flag overrides the
preset. Against a running deployment (``--url``, e.g. on a GPU cluster) pass one config name as the
label of what that deployment runs, then run again with the other deployment and the same ``--out``:
the table compares every config found there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.aiperf import launch, results  # noqa: E402
from bench.aiperf.run import AiperfError, AiperfRun, aiperf_command, run_aiperf, split_extra_args  # noqa: E402
from bench.aiperf.trace import (  # noqa: E402
    PromptMode,
    SliceOptions,
    parse_fraction,
    prepare_trace,
    read_mooncake_trace,
    resolve_prompt_mode,
    word_vocabulary,
    write_aiperf_trace,
)
from bench.aiperf.venv import AiperfVenvError, aiperf_bin, cache_root, ensure_aiperf_venv  # noqa: E402

log = logging.getLogger("aiperf_mooncake")

DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
CONFIGS = ("baseline", "flexkv")

#: Slices per preset. ``cpu``: a slice two CPU cores serve in about a minute per config: the first 40
#: sampled requests with prompts up to 2k tokens (blocks of 32 tokens instead of 512, the vLLM block
#: size of our CPU workers), 8-16 output tokens, four times faster than recorded.
PRESETS: dict[str, SliceOptions] = {
    "full": SliceOptions(),
    "cpu": SliceOptions(limit=40, scale_length=1 / 16, scale_output=1 / 32, min_output_tokens=8,
                        max_output_tokens=16, scale_time=0.25, max_input_tokens=2048),
}

#: A chat template that sends the messages' text as is; the tiny model's tokenizer has none, and
#: Dynamo's frontend refuses to serve a model without one.
PLAIN_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                       "{% if not loop.last %} {% endif %}{% endfor %}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake jsonl trace (default: %(default)s)")
    p.add_argument("--model", help="model name requests carry (and the workers load with --launch); "
                   "default: the tiny random test model, written to the cache on first use")
    p.add_argument("--tokenizer", help="local tokenizer directory for aiperf (default: the model directory)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="benchmark this running deployment (one config label in --configs)")
    target.add_argument("--launch", action="store_true", help="start deploy/single_node.sh for each config")
    target.add_argument("--launch-mocker", action="store_true",
                        help="start dynamo.frontend + dynamo.mocker for each config (flexkv: a simulated host tier)")
    p.add_argument("--configs", default="baseline,flexkv", help="comma-separated: baseline, flexkv (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench_results/aiperf_mooncake"), help="output directory")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots from --out")

    s = p.add_argument_group("trace slice (defaults from --preset; any flag given overrides it)")
    s.add_argument("--preset", choices=sorted(PRESETS), help="cpu without --model, full with it")
    s.add_argument("--sample-every", type=int, help="keep every Nth request (published: 6)")
    s.add_argument("--skip", type=int, help="sampled requests to skip before the window")
    s.add_argument("--limit", type=int, help="requests to send (0: all)")
    s.add_argument("--scale-length", type=parse_fraction, help="prompt scale, e.g. 1/16: 512-token blocks become 32")
    s.add_argument("--scale-output", type=parse_fraction, help="output length scale (default: --scale-length)")
    s.add_argument("--min-output-tokens", type=int, help="floor on scaled output lengths")
    s.add_argument("--max-output-tokens", type=int, help="cap on output lengths")
    s.add_argument("--scale-time", type=parse_fraction, help="arrival-gap scale, e.g. 0.25: four times as fast")
    s.add_argument("--max-input-tokens", type=int, help="drop requests with longer (scaled) prompts")
    s.add_argument("--prompt-mode", type=PromptMode, choices=[m.value for m in PromptMode], default=PromptMode.AUTO,
                   help="hash-ids: aiperf synthesises prompts (published); text: words of a word-level "
                        "tokenizer; auto: text for word-level tokenizers (default)")

    d = p.add_argument_group("deployment (--launch / --launch-mocker)")
    d.add_argument("--workers", type=int, default=2, help="workers behind the KV router (default: %(default)s)")
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel size per worker (--launch; default: 1)")
    d.add_argument("--port", type=int, default=0, help="frontend HTTP port (default: a free one)")
    d.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the deployment")
    d.add_argument("--block-size", type=int, default=32, help="KV block size of the mocker and the tiny model's "
                   "workers (default: %(default)s)")
    d.add_argument("--gpu-blocks", type=int, default=128, help="GPU KV blocks per worker, mocker and tiny model "
                   "(default: %(default)s: small, so the slice overflows it)")
    d.add_argument("--host-blocks", type=int, default=4096, help="mocker host-tier blocks per worker (flexkv)")
    d.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker speed-up (default: %(default)s)")
    d.add_argument("--worker-arg", action="append", default=[],
                   help="extra dynamo.vllm arguments for --launch (repeatable; the tiny model gets CPU defaults)")

    a = p.add_argument_group("aiperf")
    a.add_argument("--random-seed", type=int, default=100)
    a.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let generation stop at EOS instead of the trace's output length")
    a.add_argument("--request-timeout", type=float, default=600.0, help="per-request timeout, seconds")
    a.add_argument("--aiperf-arg", action="append", default=[], help="extra aiperf arguments (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def slice_options(args: argparse.Namespace, preset: str) -> SliceOptions:
    """The preset's slice with every explicitly given flag applied on top."""
    opts = PRESETS[preset]
    overrides = {}
    for f in fields(SliceOptions):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = value
    if overrides.get("limit") == 0:
        overrides["limit"] = None
    return replace(opts, **overrides)


# --- model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    name: str  # what requests carry; with --launch, what the workers load
    model_dir: str | None  # a local directory (tokenizer, and the mocker's model path)
    tokenizer: str
    embedded: bool


def tiny_model_dir() -> Path:
    """The tiny test model in the cache (written once), with a plain chat template added."""
    from flexkv_dynamo.tiny_model import make_tiny_model

    directory = Path(make_tiny_model(cache_root() / "tiny-model"))
    ensure_chat_template(directory)
    return directory


def ensure_chat_template(model_dir: Path) -> bool:
    """Give the tokenizer a plain chat template if it has none; True when one was added."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("chat_template") or (model_dir / "chat_template.jinja").is_file():
        return False
    cfg["chat_template"] = PLAIN_CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    log.info("added a plain chat template to %s (Dynamo's frontend needs one)", cfg_path)
    return True


def choose_model(args: argparse.Namespace) -> ModelChoice:
    if args.model is None:
        directory = tiny_model_dir()
        return ModelChoice(str(directory), str(directory), args.tokenizer or str(directory), True)
    model_dir = args.model if Path(args.model).is_dir() else None
    tokenizer = args.tokenizer or model_dir
    if tokenizer is None:
        raise SystemExit(f"--tokenizer DIR is needed: {args.model!r} is not a local directory and aiperf "
                         "runs offline here")
    return ModelChoice(args.model, model_dir, tokenizer, False)


# --- one config ------------------------------------------------------------------------------------

def start_deployment(args: argparse.Namespace, config: str, model: ModelChoice, workdir: Path) -> launch.Deployment:
    port = args.port or launch.free_port()
    if args.launch_mocker:
        if model.model_dir is None:
            raise SystemExit("--launch-mocker needs a local model directory (for its tokenizer)")
        opts = launch.MockerOptions(workers=args.workers, block_size=args.block_size, gpu_blocks=args.gpu_blocks,
                                    host_blocks=args.host_blocks, speedup_ratio=args.speedup_ratio)
        return launch.start_mocker(config, model_dir=model.model_dir, model_name=model.name, port=port,
                                   workdir=workdir, options=opts)
    worker_args = list(split_extra_args(args.worker_arg))
    env: dict[str, str] = {}
    if model.embedded:
        worker_args = tiny_worker_args(args) + worker_args
        env = {k: v for k, v in TINY_WORKER_ENV.items() if k not in os.environ}
    opts = launch.ScriptOptions(workers=args.workers, tp=args.tp, ready_timeout_s=args.ready_timeout,
                                worker_args=tuple(worker_args), env=env)
    return launch.start_script(config, model=model.name, port=port, workdir=workdir, options=opts)


#: Environment for the tiny model's workers, unless already set: small vLLM and FlexKV memory (two
#: workers and the client share a small machine), quick shutdown.
TINY_WORKER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "FLEXKV_CPU_CACHE_GB": "0.25",
    "FLEXKV_SSD_CACHE_GB": "0",
    "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "0.5",
}


def tiny_worker_args(args: argparse.Namespace) -> list[str]:
    """dynamo.vllm flags for the tiny model on CPU: block size the CPU backend takes, a small GPU cache."""
    max_len = max(PRESETS["cpu"].max_input_tokens or 0, args.max_input_tokens or 0) + 512
    return ["--block-size", str(args.block_size), "--max-model-len", str(max_len),
            "--num-gpu-blocks-override", str(args.gpu_blocks), "--enforce-eager", "--dtype", "float32",
            "--distributed-executor-backend", "uni"]


def deployment_description(args: argparse.Namespace, config: str) -> str:
    """What a launched config runs, in the words the report uses."""
    if args.launch_mocker:
        if config == "flexkv":
            return (f"dynamo.mocker with a simulated host tier of {args.host_blocks} blocks per worker "
                    "(a stand-in, not FlexKV)")
        return f"dynamo.mocker, {args.gpu_blocks} GPU blocks per worker"
    if config == "flexkv":
        return "deploy/single_node.sh, workers with --connector flexkv"
    return "deploy/single_node.sh with ENABLE_FLEXKV=0 (connector inert: vLLM's GPU prefix cache only)"


def run_config(args: argparse.Namespace, config: str, model: ModelChoice, trace_file: Path, block_tokens: int | None,
               aiperf: Path) -> None:
    run_dir = args.out / config
    artifact_dir = run_dir / "aiperf"
    # A rerun replaces the config's previous results; if it fails, no stale numbers stay behind.
    shutil.rmtree(artifact_dir, ignore_errors=True)
    for stale in ("run_info.json", "flexkv_status.json"):
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    deployment = None
    try:
        if args.url:
            url = args.url
            launch.wait_for_model(url, model.name, timeout_s=min(args.ready_timeout, 120.0))
            kind = "running deployment"
        else:
            deployment = start_deployment(args, config, model, run_dir / "deploy")
            t0 = time.monotonic()
            deployment.wait_ready(model.name, workers=args.workers, timeout_s=args.ready_timeout)
            log.info("[%s] ready after %.0f s", config, time.monotonic() - t0)
            url = deployment.url
            kind = deployment_description(args, config)
        run = AiperfRun(model=model.name, tokenizer=model.tokenizer, url=url, input_file=trace_file,
                        artifact_dir=artifact_dir, block_tokens=block_tokens, random_seed=args.random_seed,
                        ignore_eos=args.ignore_eos, request_timeout_s=args.request_timeout,
                        extra_args=split_extra_args(args.aiperf_arg))
        info = {"config": config, "deployment": kind, "url": url, "workers": None if args.url else args.workers,
                "model": model.name, "aiperf_command": aiperf_command("aiperf", run),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("[%s] replaying the trace with aiperf (log: %s)", config, run_dir / "aiperf.log")
        if deployment is not None:
            deployment.check_alive()
        run_aiperf(aiperf, run, log_path=run_dir / "aiperf.log")
        if deployment is not None:
            deployment.check_alive()  # a worker that died mid-run makes the numbers meaningless
            if deployment.cache_endpoints:
                status = launch.flexkv_tier_metrics(deployment.cache_endpoints)
                (run_dir / "flexkv_status.json").write_text(json.dumps(status, indent=2) + "\n")
    finally:
        if deployment is not None:
            deployment.stop()


# --- report --------------------------------------------------------------------------------------

def report_preamble(out: Path) -> str:
    lines = ["# aiperf on the Mooncake trace\n"]
    info_path = out / "trace_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        lines.append(f"Trace: `{info['trace']}`, {info['stats_text']}; prompt mode `{info['prompt_mode']}`, "
                     f"{info['block_tokens']} tokens per hash id.\n")
    for run_info in sorted(out.glob("*/run_info.json")):
        r = json.loads(run_info.read_text())
        workers = f", {r['workers']} workers" if r.get("workers") else ""
        tiers = tier_summary(run_info.parent / "flexkv_status.json")
        lines.append(f"- `{r['config']}`: {r['deployment']}{workers}, model `{r['model']}`, run {r['started']}"
                     + (f"; FlexKV tiers over all workers: {tiers}" if tiers else ""))
    lines.append("")
    return "\n".join(lines) + "\n"


def tier_summary(path: Path) -> str:
    """"N blocks stored, M served from the tiers (...per tier)" from the workers' FlexKV counters, or ""."""
    if not path.is_file():
        return ""
    stored: dict[str, float] = {}
    hit: dict[str, float] = {}
    for worker in json.loads(path.read_text()):
        metrics = worker.get("metrics") or {}
        for total, key in ((stored, "stored_blocks"), (hit, "hit_blocks")):
            for tier, n in (metrics.get(key) or {}).items():
                total[tier] = total.get(tier, 0) + n
    per_tier = ", ".join(f"{tier} {stored.get(tier, 0):.0f}/{hit.get(tier, 0):.0f}" for tier in sorted(stored | hit))
    return (f"{sum(stored.values()):.0f} blocks stored, {sum(hit.values()):.0f} served from the tiers "
            f"(stored/served per tier: {per_tier or 'none'})")


def write_report(out: Path) -> results.Report:
    runs = results.discover_runs(out)
    report = results.write_report(runs, out, preamble=report_preamble(out))
    sys.stdout.write("\n" + report.markdown.read_text() + "\n")
    return report


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(args.out)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise SystemExit(f"--configs: unknown config(s) {unknown or configs}; expected some of {', '.join(CONFIGS)}")
    if not (args.url or args.launch or args.launch_mocker):
        raise SystemExit("say where to send requests: --url URL, --launch or --launch-mocker")
    if args.url and len(configs) != 1:
        raise SystemExit("--url benchmarks one running deployment: pass its config as --configs baseline (or "
                         "flexkv), then run again against the other deployment with the same --out")

    model = choose_model(args)
    preset = args.preset or ("cpu" if model.embedded else "full")
    opts = slice_options(args, preset)
    requests = read_mooncake_trace(args.trace)
    prepared = prepare_trace(requests, opts)
    mode = resolve_prompt_mode(args.prompt_mode, model.tokenizer if Path(model.tokenizer).is_dir() else None)
    vocab = word_vocabulary(model.tokenizer) if mode is PromptMode.TEXT else None
    trace_file = write_aiperf_trace(args.out / "trace.jsonl", prepared, mode, vocab=vocab, seed=args.random_seed)
    # aiperf only needs the block size for hash-ids prompts; text prompts are complete already.
    block_tokens = prepared.block_tokens if mode is PromptMode.HASH_IDS else None
    (args.out / "trace_info.json").write_text(json.dumps({
        "trace": str(args.trace), "preset": preset, "options": asdict(opts), "prompt_mode": mode.value,
        "block_tokens": prepared.block_tokens, "stats": asdict(prepared.stats),
        "stats_text": prepared.stats.describe()}, indent=2) + "\n")
    log.info("trace slice (%s preset, %s prompts): %s", preset, mode.value, prepared.stats.describe())

    try:
        aiperf = aiperf_bin(ensure_aiperf_venv())
    except AiperfVenvError as exc:
        log.error("%s", exc)
        return 1

    failed = []
    for config in configs:
        try:
            run_config(args, config, model, trace_file, block_tokens, aiperf)
        except (launch.DeploymentError, AiperfError) as exc:
            log.error("[%s] failed: %s", config, exc)
            failed.append(config)
    try:
        write_report(args.out)
    except results.ResultsError as exc:
        log.error("%s", exc)
        return 1
    if failed:
        log.error("configs that failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the finally blocks stop the deployments.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
