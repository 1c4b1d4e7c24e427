"""Run ``aiperf profile`` on a prepared Mooncake trace, the way the published benchmark does.

The command is the published one (``--endpoint-type chat --endpoint /v1/chat/completions --streaming
--random-seed 100 -H 'Authorization: Bearer NOT USED'``) plus what makes the replay explicit:
``--custom-dataset-type mooncake_trace`` and ``--fixed-schedule`` (requests are sent at their trace
timestamps, whatever the server's speed), and ``--isl-block-size`` when the trace's blocks were
scaled. ``ignore_eos`` makes every request generate exactly its trace's output length, so two configs
are compared on the same work.

The tokenizer: aiperf 0.13's dataset workers look it up with ``snapshot_download(name,
local_files_only=True)``, which refuses an absolute directory (``HFValidationError``: not a repo id) in
Mooncake hash-ids mode. `hub_tokenizer` therefore lays a local tokenizer directory out as a Hugging Face
cache (``models--local--NAME/snapshots/REV``) and names it like a repo (``local/NAME``); aiperf runs with
``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class AiperfError(RuntimeError):
    """aiperf failed or wrote no results."""


#: The summary aiperf writes into the artifact directory (results.py reads it).
SUMMARY_JSON = "profile_export_aiperf.json"


@dataclass(frozen=True)
class AiperfRun:
    model: str
    tokenizer: str
    url: str
    input_file: Path
    artifact_dir: Path
    block_tokens: int | None = None  # None: aiperf's default for mooncake_trace (512)
    random_seed: int = 100
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    env: Mapping[str, str] = field(default_factory=dict)  # added to aiperf's environment (hub_tokenizer's)


#: The files of a model directory that make its tokenizer (never the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def hub_tokenizer(directory: str | os.PathLike[str], hub_root: Path) -> tuple[str, dict[str, str]]:
    """``directory``'s tokenizer as a repo-style name in a local Hugging Face cache under ``hub_root``, and
    the environment that makes aiperf find it there. The snapshot is keyed by the files' contents."""
    src = Path(directory)
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f.name == "tokenizer.json" or f.name == "tokenizer.model" for f in files):
        raise AiperfError(f"{src} has no tokenizer.json or tokenizer.model")
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in src.name) or "model"
    repo = hub_root / f"models--local--{name}"
    snapshot = repo / "snapshots" / digest
    if not snapshot.is_dir():
        snapshot.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, snapshot / f.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(digest)
    return f"local/{name}", {"HF_HUB_CACHE": str(hub_root), "HF_HUB_OFFLINE": "1"}


def aiperf_command(aiperf_bin: str | os.PathLike[str], run: AiperfRun) -> list[str]:
    cmd = [
        os.fspath(aiperf_bin), "profile",
        "--model", run.model,
        "--tokenizer", run.tokenizer,
        "--endpoint-type", "chat",
        "--endpoint", "/v1/chat/completions",
        "--streaming",
        "--url", run.url,
        "--input-file", os.fspath(run.input_file),
        "--custom-dataset-type", "mooncake_trace",
        "--fixed-schedule",
        "--random-seed", str(run.random_seed),
        "-H", "Authorization: Bearer NOT USED",
        "--request-timeout-seconds", f"{run.request_timeout_s:g}",
        "--artifact-dir", os.fspath(run.artifact_dir),
        "--ui", "simple",  # tqdm progress bars, readable in a log file too
    ]
    if run.block_tokens is not None:
        cmd += ["--isl-block-size", str(run.block_tokens)]
    if run.ignore_eos:
        cmd += ["--extra-inputs", "ignore_eos:true"]
    cmd += list(run.extra_args)
    return cmd


def aiperf_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment for aiperf, less ``HF_HUB_OFFLINE`` (with it, aiperf takes a directory for a repo id;
    `hub_tokenizer`'s environment sets it again for a repo-style name)."""
    env = dict(os.environ if base is None else base)
    env.pop("HF_HUB_OFFLINE", None)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_aiperf(aiperf_bin: str | os.PathLike[str], run: AiperfRun, *, log_path: Path,
               echo: bool = True) -> Path:
    """Run aiperf to completion, its output to ``log_path`` (and our stdout); return the summary path.

    aiperf runs in its own process group and is killed with it if we are interrupted, so no aiperf
    worker process outlives the driver.
    """
    cmd = aiperf_command(aiperf_bin, run)
    run.artifact_dir.mkdir(parents=True, exist_ok=True)
    # aiperf memory-maps the dataset under $TMPDIR/aiperf_mmap_<id> and leaves it there: keep it in
    # a scratch directory of ours, removed after the run.
    scratch = run.artifact_dir.parent / "aiperf_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    env = aiperf_env()
    env.update(run.env)
    env["AIPERF_DATASET_MMAP_BASE_PATH"] = str(scratch)
    log.info("$ %s", " ".join(_quote(a) for a in cmd))
    try:
        code = _stream(cmd, env, log_path, echo)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = run.artifact_dir / SUMMARY_JSON
    if code != 0 or not summary.is_file():
        raise AiperfError(f"aiperf exited with status {code}" + ("" if summary.is_file() else
                          f" and wrote no {SUMMARY_JSON}") + f"; see {log_path}:\n{_tail(log_path)}")
    return summary


def _stream(cmd: list[str], env: dict[str, str], log_path: Path, echo: bool) -> int:
    """Run ``cmd`` in its own process group, copying its output to ``log_path`` (and stdout)."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            stdout = proc.stdout
            assert stdout is not None  # stdout=PIPE
            while chunk := stdout.read1(65536):
                out.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
    return code


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=,@+" for c in arg) else repr(arg)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def split_extra_args(values: Sequence[str]) -> tuple[str, ...]:
    """``--aiperf-arg`` values, each possibly holding several shell-quoted words."""
    import shlex

    return tuple(word for value in values for word in shlex.split(value))
