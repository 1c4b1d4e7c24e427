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

Before anything heavy is imported, the FlexKV configuration and the cache's endpoint are checked
(`flexkv_dynamo.preflight`, about a second). A command line that cannot be translated, or a failed
check, exits with status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import runpy
import sys

from .dynamo_hook import TARGET_MODULE, prepare


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0], *args]  # runpy sets argv[0] to Dynamo's __main__.py, as `-m dynamo.vllm` does
    prepare("flexkv_dynamo.vllm", default_connectors=["flexkv"])
    runpy.run_module(TARGET_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
