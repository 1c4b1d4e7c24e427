#!/usr/bin/env python
"""aiperf on the Mooncake trace: plain vLLM vs FlexKV (tier events on, and off) behind Dynamo's KV router.

    python bench/aiperf_mooncake.py --launch [--quick] --out DIR

Three configurations, each two ``dynamo.vllm`` workers behind ``dynamo.frontend --router-mode kv`` on the
real model (SmolLM2-135M-Instruct, `flexkv_dynamo.models`), started by `flexkv_dynamo.local_cluster`:

* ``vllm``: plain ``python -m dynamo.vllm``, no connector at all (vLLM's own prefix cache): the baseline;
* ``flexkv``: ``--connector flexkv``, a CPU and an SSD tier per worker, our tiers' KV events published to
  the router;
* ``flexkv-blind``: the same tiers with those events off (``DYNAMO_USE_FLEXKV=0``): the router routes on
  GPU blocks alone, as with upstream FlexKV today.

The trace is cut into slices by a rule (``--select conversations``: consecutive windows of the trace,
whole multi-turn conversations inside each, every Nth conversation; see ``bench/aiperf/trace.py``), and
each slice's reuse ceiling (the share of its prompt blocks an earlier request of the slice already had) is
reported beside its results. For every config the deployment is started once; for every slice and repeat
its caches are emptied (Dynamo's ``/engine/flush_cache``: vLLM's prefix cache, our tiers, the router's
view), aiperf replays the slice at its timestamps, and our tiers' counters are read before and after.
Then ``OUT/results.md``, ``OUT/results.csv`` and PNG plots compare each config with ``vllm`` measured in
the same run (medians over repeats).

``--launch-mocker`` runs the same pipeline on Dynamo's mock engine (``flexkv`` = its host tier) in seconds;
``--url`` measures a deployment you started (one config label; run again with the other deployments and
the same ``--out``). ``--report-only`` rebuilds the report from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.aiperf import launch, results  # noqa: E402
from bench.aiperf.run import (  # noqa: E402
    AiperfError,
    AiperfRun,
    aiperf_command,
    hub_tokenizer,
    run_aiperf,
    split_extra_args,
)
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
from bench.aiperf.venv import AiperfVenvError, aiperf_bin, ensure_aiperf_venv  # noqa: E402
from bench.replay.router import SHIPPED_KNOBS  # noqa: E402
from flexkv_dynamo.local_cluster import ClusterError, LocalCluster, WorkerKind, get_json  # noqa: E402
from flexkv_dynamo.models import KV_BYTES_PER_TOKEN, cache_root  # noqa: E402

log = logging.getLogger("aiperf_mooncake")

DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
CONFIGS = tuple(kind.value for kind in WorkerKind)  # vllm, flexkv, flexkv-blind
BLOCK_SIZE = 32  # vLLM's CPU attention backend needs a multiple of 32

#: Slices per preset.
#: ``cpu``: for two CPU cores and the 135M model. Whole conversations (>= 2 turns) of every 16th
#: conversation in consecutive 10-minute windows of the trace; 512-token blocks become 64 tokens, so a
#: follow-up turn is ~1,200 tokens and its prefill costs seconds; outputs 1/16 of the trace's (8-32
#: tokens); prompts over 3,072 tokens dropped; replayed four times as fast as recorded (~150 s a slice).
#: ``quick``: the same rule on 5-minute windows (about 15 requests a slice): checks the pipeline.
#: ``full``: the published method, unscaled (every 6th request), for GPU deployments.
PRESETS: dict[str, SliceOptions] = {
    "full": SliceOptions(),
    "cpu": SliceOptions(select="conversations", window_s=600, sample_every=16, scale_length=1 / 8,
                        scale_output=1 / 16, min_output_tokens=8, max_output_tokens=32, scale_time=0.25,
                        max_input_tokens=3072),
}
PRESETS["quick"] = replace(PRESETS["cpu"], window_s=300)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake jsonl trace (default: %(default)s)")
    p.add_argument("--model", help="model directory (or name with --url) the workers serve; default: the "
                   "converted SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", help="local tokenizer directory for aiperf (default: the model directory)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="benchmark this running deployment (one config label in --configs)")
    target.add_argument("--launch", action="store_true", help="start frontend + workers for each config")
    target.add_argument("--launch-mocker", action="store_true",
                        help="start dynamo.frontend + dynamo.mocker for each run (flexkv: a simulated host tier)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: %(default)s")
    p.add_argument("--repeats", type=int, default=2, help="runs per config and slice (default: %(default)s)")
    p.add_argument("--slices", type=int, default=3, help="consecutive windows of the trace, from --first-window "
                   "(select=conversations; default: %(default)s)")
    p.add_argument("--first-window", type=int, default=0, help="index of the first window (default: 0)")
    p.add_argument("--quick", action="store_true", help="preset quick, 2 slices: a pipeline check in ~30 min")
    p.add_argument("--out", type=Path, default=Path("bench_results/aiperf_mooncake"), help="output directory")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from --out")

    s = p.add_argument_group("trace slice (defaults from --preset; any flag given overrides it)")
    s.add_argument("--preset", choices=sorted(PRESETS), help="cpu with the default model, full with --model")
    s.add_argument("--select", choices=("requests", "conversations"), help="requests: every Nth request "
                   "(published); conversations: whole conversations of consecutive windows")
    s.add_argument("--window-s", type=float, help="conversations: window length in trace seconds")
    s.add_argument("--min-turns", type=int, help="conversations: turns a conversation needs in its window")
    s.add_argument("--sample-every", type=int, help="keep every Nth request (requests) or conversation")
    s.add_argument("--skip", type=int, help="sampled requests (or conversations) to skip")
    s.add_argument("--limit", type=int, help="requests to send at most (0: all)")
    s.add_argument("--scale-length", type=parse_fraction, help="prompt scale, e.g. 1/8: 512-token blocks become 64")
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
    d.add_argument("--gpu-blocks", type=int, help="vLLM KV blocks of 32 tokens per worker (default: the least "
                   "that holds one request of the longest prompt, so the slice overflows it)")
    d.add_argument("--cpu-cache-gb", type=float, default=0.25, help="our CPU tier per worker (default: %(default)s)")
    d.add_argument("--ssd-cache-gb", type=float, default=2.0, help="our SSD tier per worker (default: %(default)s)")
    d.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the deployment")
    d.add_argument("--host-blocks", type=int, default=4096, help="mocker host-tier blocks per worker (flexkv)")
    d.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker speed-up (default: %(default)s)")
    d.add_argument("--worker-arg", action="append", default=[], help="extra dynamo.vllm arguments (repeatable)")

    a = p.add_argument_group("aiperf")
    a.add_argument("--random-seed", type=int, default=100)
    a.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let generation stop at EOS instead of the trace's output length")
    a.add_argument("--request-timeout", type=float, default=900.0, help="per-request timeout, seconds")
    a.add_argument("--aiperf-arg", action="append", default=[], help="extra aiperf arguments (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = args.preset or "quick"
        args.slices = min(args.slices, 2)
    return args


def slice_options(args: argparse.Namespace, preset: str, window: int = 0) -> SliceOptions:
    """The preset's slice, every explicitly given flag applied on top, for window ``window``."""
    opts = PRESETS[preset]
    overrides: dict[str, object] = {"window": window}
    for f in fields(SliceOptions):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "window":
            overrides[f.name] = value
    if overrides.get("limit") == 0:
        overrides["limit"] = None
    return replace(opts, **overrides)


# --- model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    name: str  # what requests carry; with --launch, what the workers load
    model_dir: str | None  # a local directory (tokenizer, and the mocker's model path)
    tokenizer: str  # what aiperf gets as --tokenizer
    aiperf_env: dict[str, str]  # environment aiperf needs to find the tokenizer offline
    embedded: bool  # the default model: CPU worker flags apply


def choose_model(args: argparse.Namespace) -> ModelChoice:
    if args.model is None:
        from flexkv_dynamo.models import ensure_model

        directory = str(ensure_model())
        embedded = True
    else:
        directory = args.model if Path(args.model).is_dir() else None
        embedded = False
    tok_dir = args.tokenizer or directory
    if tok_dir is None:
        raise SystemExit(f"--tokenizer DIR is needed: {args.model!r} is not a local directory and aiperf "
                         "runs offline here")
    name = directory if args.model is None else args.model
    if resolve_prompt_mode(args.prompt_mode, tok_dir) is PromptMode.HASH_IDS and Path(tok_dir).is_dir():
        tokenizer, env = hub_tokenizer(tok_dir, cache_root() / "tokenizer-hub")
    else:
        tokenizer, env = tok_dir, {}
    return ModelChoice(str(name), directory, tokenizer, env, embedded)


# --- deployments -----------------------------------------------------------------------------------

def worker_args(args: argparse.Namespace, model: ModelChoice, max_input_tokens: int | None) -> list[str]:
    extra = list(split_extra_args(args.worker_arg))
    if not model.embedded:
        return extra
    max_len = (max_input_tokens or 3072) + 128  # room for the chat template and the output
    blocks = args.gpu_blocks or -(-max_len // BLOCK_SIZE) + 2  # vLLM insists on one max-length request
    return ["--block-size", str(BLOCK_SIZE), "--max-model-len", str(max_len), "--num-gpu-blocks-override",
            str(blocks), "--enforce-eager", "--dtype", "float32", "--distributed-executor-backend", "uni", *extra]


class Target:
    """Where a config's requests go: started once per config, reset before every run."""

    url: str
    description: str

    def reset(self) -> None: ...

    def tier_counters(self) -> dict[str, dict[str, float]]:
        return {}

    def stop(self) -> None: ...


class ClusterTarget(Target):
    def __init__(self, args: argparse.Namespace, config: str, model: ModelChoice, workdir: Path,
                 max_input_tokens: int | None) -> None:
        kind = WorkerKind(config)
        # The router as our launchers run it (deploy/lib.sh), for every configuration alike.
        self.cluster = LocalCluster(workdir, frontend_args=SHIPPED_KNOBS.frontend_args())
        self.ready_timeout_s = args.ready_timeout
        self.cluster.start_frontend()
        wargs = worker_args(args, model, max_input_tokens)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "FLEXKV_CPU_CACHE_GB": f"{args.cpu_cache_gb:g}"}
        for _ in range(args.workers):
            self.cluster.start_worker(model.name, kind, count=args.workers, args=wargs, env=env,
                                      ssd_gb=args.ssd_cache_gb if kind.has_cache else 0.0)
        t0 = time.monotonic()
        self.cluster.wait_ready(args.ready_timeout, progress=lambda s: log.info("[%s] %s", config, s))
        log.info("[%s] ready after %.0f s", config, time.monotonic() - t0)
        self.url = self.cluster.url
        tiers = (f"; our tiers per worker: CPU {args.cpu_cache_gb:g} GiB, SSD {args.ssd_cache_gb:g} GiB"
                 if kind.has_cache else "")
        self.description = {WorkerKind.VLLM: "plain dynamo.vllm, no connector",
                            WorkerKind.FLEXKV: "dynamo.vllm --connector flexkv, tier events on",
                            WorkerKind.FLEXKV_BLIND: "dynamo.vllm --connector flexkv, DYNAMO_USE_FLEXKV=0 "
                                                     "(the router sees GPU blocks only)"}[kind]
        self.description += f", {args.workers} workers, worker args `{' '.join(wargs)}`{tiers}"
        self._warm_up(model.name)

    def _warm_up(self, model: str) -> None:
        """One short request per worker (concurrent: the router spreads them), so that no run pays for
        first-use costs."""
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
        with ThreadPoolExecutor(len(self.cluster.workers)) as pool:
            list(pool.map(lambda _: get_json(f"{self.url}/v1/chat/completions", body, timeout=600),
                          self.cluster.workers))

    def reset(self) -> None:
        # Every worker still registered, the model still listed: a worker that lost its registration (its
        # lease lapsed on a starved machine) would turn the run into 404s, or into a one-worker run.
        self.cluster.wait_ready(self.ready_timeout_s)
        for worker in self.cluster.workers:
            answer = get_json(f"http://127.0.0.1:{worker.system_port}/engine/flush_cache", {}, timeout=300)
            if answer.get("status") != "ok":
                raise ClusterError(f"flush_cache on worker {worker.index} answered {answer}")

    def tier_counters(self) -> dict[str, dict[str, float]]:
        endpoints = [w.cache_endpoint for w in self.cluster.workers if w.cache_endpoint]
        total: dict[str, dict[str, float]] = {"hit": {}, "stored": {}}
        for status in launch.flexkv_tier_metrics(endpoints):
            metrics = status.get("metrics") or {}
            for key, name in (("hit_blocks", "hit"), ("stored_blocks", "stored")):
                for tier, n in (metrics.get(key) or {}).items():
                    total[name][tier] = total[name].get(tier, 0.0) + float(n)
        return total

    def check_alive(self) -> None:
        self.cluster.check_alive()

    def stop(self) -> None:
        self.cluster.stop()


class FixedTarget(Target):
    """A deployment someone else started and stops (``--url``, or one mocker run)."""

    def __init__(self, url: str, description: str, *, warn_on_reset: bool = False) -> None:
        self.url, self.description, self._warn = url, description, warn_on_reset

    def reset(self) -> None:
        if self._warn:
            log.warning("--url: the deployment's caches are not emptied between runs")


def mocker_run(args: argparse.Namespace, config: str, model: ModelChoice, workdir: Path) -> launch.Deployment:
    if model.model_dir is None:
        raise SystemExit("--launch-mocker needs a local model directory (for its tokenizer)")
    opts = launch.MockerOptions(workers=args.workers, block_size=BLOCK_SIZE, gpu_blocks=args.gpu_blocks or 128,
                                host_blocks=args.host_blocks, speedup_ratio=args.speedup_ratio)
    dep = launch.start_mocker(config, model_dir=model.model_dir, model_name=model.name, port=launch.free_port(),
                              workdir=workdir, options=opts)
    dep.wait_ready(model.name, workers=args.workers, timeout_s=args.ready_timeout)
    return dep


# --- one run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlicePlan:
    name: str
    trace_file: Path
    block_tokens: int | None  # for aiperf's --isl-block-size (hash-ids prompts)


def run_once(args: argparse.Namespace, config: str, rep: int, sl: SlicePlan, model: ModelChoice, target: Target,
             aiperf: Path, description: str) -> None:
    rep_dir = args.out / sl.name / config / f"rep_{rep}"
    shutil.rmtree(rep_dir, ignore_errors=True)  # a rerun replaces; a failed one leaves no stale numbers
    rep_dir.mkdir(parents=True)
    target.reset()
    before = target.tier_counters()
    run = AiperfRun(model=model.name, tokenizer=model.tokenizer, url=target.url, input_file=sl.trace_file,
                    artifact_dir=rep_dir / "aiperf", block_tokens=sl.block_tokens, random_seed=args.random_seed,
                    ignore_eos=args.ignore_eos, request_timeout_s=args.request_timeout,
                    extra_args=split_extra_args(args.aiperf_arg), env=model.aiperf_env)
    (rep_dir / "run_info.json").write_text(json.dumps({
        "config": config, "slice": sl.name, "repeat": rep, "deployment": description, "url": target.url,
        "model": model.name, "aiperf_command": aiperf_command("aiperf", run),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    log.info("[%s] %s, repeat %d: replaying with aiperf (log: %s)", config, sl.name, rep, rep_dir / "aiperf.log")
    run_aiperf(aiperf, run, log_path=rep_dir / "aiperf.log", echo=args.verbose)
    if isinstance(target, ClusterTarget):
        target.check_alive()  # a worker that died mid-run makes the numbers meaningless
    after = target.tier_counters()
    delta = {kind: {tier: n - (before.get(kind) or {}).get(tier, 0.0) for tier, n in counts.items()}
             for kind, counts in after.items()}
    (rep_dir / results.TIERS_JSON).write_text(json.dumps(delta, indent=2) + "\n")


def run_config(args: argparse.Namespace, config: str, model: ModelChoice, slices: Sequence[SlicePlan],
               aiperf: Path, max_input_tokens: int | None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"aip_{config}_", dir="/tmp"))  # short: ipc paths are limited
    try:
        if args.launch_mocker:  # cheap to start: a fresh deployment per run instead of a flush
            for sl in slices:
                for rep in range(args.repeats):
                    dep = mocker_run(args, config, model, workdir / f"{sl.name}_{rep}")
                    try:
                        target = FixedTarget(dep.url, f"dynamo.mocker ({config}), {args.workers} workers")
                        run_once(args, config, rep, sl, model, target, aiperf, target.description)
                    finally:
                        dep.stop()
            return
        if args.url:
            launch.wait_for_model(args.url, model.name, timeout_s=min(args.ready_timeout, 120.0))
            target: Target = FixedTarget(args.url, f"running deployment at {args.url}", warn_on_reset=True)
        else:
            target = ClusterTarget(args, config, model, workdir, max_input_tokens)
        try:
            for sl in slices:
                for rep in range(args.repeats):
                    run_once(args, config, rep, sl, model, target, aiperf, target.description)
        finally:
            target.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- slices and report ------------------------------------------------------------------------------

def prepare_slices(args: argparse.Namespace, model: ModelChoice, preset: str) -> tuple[list[SlicePlan], int | None]:
    requests = read_mooncake_trace(args.trace)
    tok_dir = args.tokenizer or model.model_dir
    mode = resolve_prompt_mode(args.prompt_mode, tok_dir if tok_dir and Path(tok_dir).is_dir() else None)
    vocab = word_vocabulary(tok_dir) if mode is PromptMode.TEXT and tok_dir else None
    base = slice_options(args, preset)
    windows = range(args.first_window, args.first_window + args.slices) if base.select == "conversations" else [0]
    plans = []
    for window in windows:
        opts = slice_options(args, preset, window)
        name = f"slice_{window}" if opts.select == "conversations" else "slice"
        prepared = prepare_trace(requests, opts)
        slice_dir = args.out / name
        slice_dir.mkdir(parents=True, exist_ok=True)
        trace_file = write_aiperf_trace(slice_dir / "trace.jsonl", prepared, mode, vocab=vocab, seed=args.random_seed)
        kv_gib = sum(r.input_length for r in prepared.requests) * KV_BYTES_PER_TOKEN / 2**30
        (slice_dir / "trace_info.json").write_text(json.dumps({
            "trace": str(args.trace), "preset": preset, "options": asdict(opts), "prompt_mode": mode.value,
            "block_tokens": prepared.block_tokens, "stats": asdict(prepared.stats),
            "stats_text": prepared.stats.describe() + f"; {kv_gib:.1f} GiB of KV in all its prompts"}, indent=2) + "\n")
        log.info("%s (%s preset): %s", name, preset, prepared.stats.describe())
        plans.append(SlicePlan(name, trace_file, prepared.block_tokens if mode is PromptMode.HASH_IDS else None))
    return plans, base.max_input_tokens


def report_preamble(out: Path) -> str:
    lines = ["# aiperf on the Mooncake trace\n"]
    seen = set()
    for info_path in sorted(out.glob("*/*/rep_*/run_info.json")):
        r = json.loads(info_path.read_text())
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        lines.append(f"- `{r['config']}`: {r['deployment']}; model `{r['model']}`")
    lines.append("")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> results.Report:
    slices = results.discover(out)
    report = results.write_report(slices, out, preamble=report_preamble(out))
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
    allowed = launch.MOCKER_CONFIGS if args.launch_mocker else CONFIGS
    unknown = [c for c in configs if c not in allowed]
    if unknown or not configs:
        raise SystemExit(f"--configs: unknown config(s) {unknown or configs}; expected some of {', '.join(allowed)}")
    if not (args.url or args.launch or args.launch_mocker):
        raise SystemExit("say where to send requests: --url URL, --launch or --launch-mocker")
    if args.url and len(configs) != 1:
        raise SystemExit("--url benchmarks one running deployment: pass its config as --configs vllm (or flexkv, "
                         "flexkv-blind), then run again against the other deployments with the same --out")
    if args.repeats < 1 or args.slices < 1:
        raise SystemExit("--repeats and --slices must be >= 1")

    model = choose_model(args)
    preset = args.preset or ("cpu" if model.embedded else "full")
    slices, max_input = prepare_slices(args, model, preset)
    try:
        aiperf = aiperf_bin(ensure_aiperf_venv())
    except AiperfVenvError as exc:
        log.error("%s", exc)
        return 1

    failed = []
    for config in configs:
        try:
            run_config(args, config, model, slices, aiperf, max_input)
        except (launch.DeploymentError, ClusterError, AiperfError) as exc:
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
