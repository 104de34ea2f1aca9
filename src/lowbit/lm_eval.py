"""lm-eval's own command line with lowbit's model registered: ``python -m lowbit.lm_eval run
--model lowbit --model_args checkpoint=DIR --tasks lowbit_mc --include_path DIR``.

lm-eval finds models only in its registry and loads no plugins, so plain ``lm_eval --model
lowbit`` cannot see lowbit; this entry point imports :mod:`lowbit.eval.lm_eval_adapter` (which
registers ``lowbit``) and then hands the arguments to lm-eval unchanged. lowbit's example tasks
(``lowbit_mc``, ``lowbit_lastword``) are added to ``--include_path``.
"""

from __future__ import annotations

import sys


def with_lowbit_tasks(args: list[str], tasks_dir: str) -> list[str]:
    """lm-eval arguments with ``tasks_dir`` added to ``--include_path`` (lm-eval joins paths with
    ``:``) when the command runs tasks (``run``, or the older form that starts with options)."""
    args = list(args)
    if not args or not (args[0] == "run" or args[0].startswith("--")):
        return args
    if "--include_path" in args and args.index("--include_path") + 1 < len(args):
        i = args.index("--include_path") + 1
        args[i] = f"{tasks_dir}:{args[i]}"
    else:
        args = [a for a in args if a != "--include_path"] + ["--include_path", tasks_dir]
    return args


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from lowbit.eval.lm_eval_adapter import TASKS_DIR  # registers the "lowbit" model

    sys.argv = ["lm_eval", *with_lowbit_tasks(sys.argv[1:] if argv is None else argv, str(TASKS_DIR))]
    cli_evaluate()


if __name__ == "__main__":
    main()
