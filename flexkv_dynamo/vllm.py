"""``python -m flexkv_dynamo.vllm [dynamo.vllm arguments...]``: a Dynamo vLLM worker with FlexKV, no hook.

The explicit twin of ``python -m dynamo.vllm ... --connector flexkv`` (which needs the start-up hook,
`flexkv_dynamo.dynamo_hook`): it translates the arguments with `flexkv_dynamo.launch_args.translate`
and runs Dynamo's own ``dynamo.vllm`` in this process, exactly as ``python -m dynamo.vllm`` would.

* Without ``--connector`` and without ``--kv-transfer-config``, it means ``--connector flexkv``: that is
  what this command is for. ``--connector flexkv nixl`` gives the disaggregated form.
* With ``--kv-transfer-config`` (and no ``--connector``), or a ``--connector`` not naming flexkv, the
  arguments go to Dynamo unchanged.
* A KV-events endpoint is added when none is given (see `launch_args`); the translation is logged once
  Dynamo has configured logging.

A command line that cannot be translated exits with status 2 and a message, before anything heavy is
imported.
"""

from __future__ import annotations

import os
import runpy
import sys

from .dynamo_hook import TARGET_MODULE, after_dynamo_import, apply_plan, arm
from .launch_args import LaunchArgsError, translate


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        plan = translate(args, os.environ, default_connectors=["flexkv"])
    except LaunchArgsError as exc:
        sys.stderr.write(f"flexkv_dynamo.vllm: error: {exc}\n")
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *args]  # runpy sets argv[0] to Dynamo's __main__.py, as `-m dynamo.vllm` does
    if plan is not None:
        apply_plan(plan)
        arm(lambda: after_dynamo_import(plan))  # Dynamo's logging exists once dynamo.vllm.main is imported
    runpy.run_module(TARGET_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
