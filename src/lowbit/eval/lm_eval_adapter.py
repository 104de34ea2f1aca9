"""lm-evaluation-harness on lowbit's models: an lm-eval model named ``lowbit`` and a task runner.

Importing this module registers :class:`LowbitLM` in lm-eval's model registry under ``lowbit``.
lm-eval finds models only through that registry (its ``lm_eval`` command imports its own
``lm_eval.models`` and no plugins), so the module must be imported first: ``python -m
lowbit.lm_eval run --model lowbit --model_args checkpoint=DIR --tasks ...`` does that and then runs
lm-eval's own command line; in Python, ``import lowbit.eval.lm_eval_adapter`` before
``lm_eval.simple_evaluate(model="lowbit", ...)``. :func:`run_tasks` is what ``lowbit eval --tasks``
calls.

Scoring follows lm-eval's Hugging Face model: a request's context and continuation are encoded
together, truncated on the left to the model's context length, the logits of the continuation's
positions are log-softmaxed in float32 and summed; "greedy" is whether every continuation token is
the argmax. Batches are right-padded (a causal model's earlier positions never see the padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

try:
    import lm_eval.models  # noqa: F401  (the built-in models first, so the registry is complete)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise LowbitError(f"lm-evaluation-harness is not installed ({exc}); pip install 'lowbit[tasks]'") from None

__all__ = ["TASKS_DIR", "LowbitLM", "continuation_logprob", "run_tasks"]

TASKS_DIR = Path(__file__).parent / "tasks"  # the example local tasks shipped with lowbit


def continuation_logprob(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """Log-probability of ``continuation`` and whether it is the greedy choice.

    Args:
        logits: (n, V) logits of the n = len(continuation) positions that predict it.
        continuation: the n token ids.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(continuation, dtype=torch.int64, device=logp.device)
    ll = logp.gather(-1, target[:, None]).sum().item()
    return float(ll), bool((logp.argmax(-1) == target).all())


@register_model("lowbit")
class LowbitLM(TemplateLM):
    """A lowbit checkpoint (or any model lowbit loads, or a model in memory) as an lm-eval model.

    ``lm_eval --model lowbit --model_args checkpoint=DIR[,no_verify=True,trust_remote_code=True]``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        no_verify: bool = False,
        progress: bool = True,
        **_: Any,  # lm-eval passes device and max_batch_size; lowbit keeps the model where it was loaded
    ) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise LowbitError("the lowbit lm-eval model needs checkpoint=DIR (a lowbit checkpoint or any model)")
            from lowbit.api import load_any

            model, tokenizer = load_any(str(checkpoint), trust_remote_code=trust_remote_code, verify=not no_verify)
        if tokenizer is None:
            raise LowbitError(f"{checkpoint or 'the model'} has no tokenizer files; lm-eval tasks need one")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch = 1 if str(batch_size).startswith("auto") else int(batch_size)
        config = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 2048)
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise LowbitError("the tokenizer has no end-of-text token, which lm-eval needs as the empty context")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log-probability, greedy), batched by ``batch_size``."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise LowbitError("an lm-eval request has an empty continuation; nothing to score")
            full = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((full[:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bar = tqdm(total=len(rows), desc="lm-eval loglikelihood", disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), self.batch):
            idx = order[start : start + self.batch]
            width = max(len(rows[i][0]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.int64)
            for r, i in enumerate(idx):
                ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self.model(input_ids=ids.to(self._model_device()), use_cache=False).logits
            for r, i in enumerate(idx):
                n_in, cont = len(rows[i][0]), rows[i][1]
                out[i] = continuation_logprob(logits[r, n_in - len(cont) : n_in], cont)
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of the context length (lm-eval's rule)."""
        results = []
        for req in tqdm(requests, desc="lm-eval rolling", disable=disable_tqdm or not self.progress):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [(None, list(c), list(t)) for c, t in map(lm_utils.make_disjoint_window, windows)]
            results.append(sum(ll for ll, _ in self._loglikelihood_tokens(pairs, disable_tqdm=True)))
        return results

    @torch.inference_mode()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's ``until`` strings. Sampling
        options in ``gen_kwargs`` are ignored (always greedy: a deterministic score)."""
        from lowbit.generate import torch_step

        out = []
        for req in tqdm(requests, desc="lm-eval generate", disable=disable_tqdm or not self.progress):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            step = torch_step(self.model)
            logits, past = step(torch.tensor([ids], device=self._model_device()), None)
            new: list[int] = []
            text = ""
            while len(new) < max_new:
                nxt = int(logits[0].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
                logits, past = step(torch.tensor([[nxt]], device=self._model_device()), past)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    task_paths: list[str | Path] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    builtin: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` (names: built-in, lowbit's own under ``TASKS_DIR`` or defined by YAML
    files under ``task_paths``) on a model in memory. Returns ``{task: {metric: value}}`` (lm-eval's
    ``"acc,none"`` keys as ``acc``). ``builtin=False`` never looks among lm-eval's own tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(Path(p).expanduser()) for p in task_paths or [])]
    for p in paths[1:]:
        if not Path(p).exists():
            raise LowbitError(f"task path {p} does not exist; give a directory (or file) of lm-eval task YAMLs")
    # lm-eval's ~15k built-in task files take about a minute to index: only when a name is not local
    manager = TaskManager(include_path=paths, include_defaults=False)
    if builtin and not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        local = sorted(n for n in known if n.startswith("lowbit_"))
        raise LowbitError(
            f"unknown lm-eval task(s) {', '.join(missing)}; lowbit's local tasks are {', '.join(local)}, "
            "others come from lm-eval or from YAML files under --task-path"
        )
    lm = LowbitLM(model=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress)
    res = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    if res is None:  # pragma: no cover - only on non-zero ranks of a distributed lm-eval run
        return {}
    table: dict[str, dict[str, float]] = {}
    for task, metrics in res["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, _flt = key.partition(",")
            if isinstance(value, (int, float)) and name != "alias":
                row[name] = float(value)
        table[task] = row
    return table
