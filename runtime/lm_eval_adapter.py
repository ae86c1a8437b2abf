"""lm-eval-harness on a run's generated model, without an export step.

`ForgeLM` is an `lm_eval.api.model.LM` over the generated `Transformer` and the
run's tokenizer (runtime/tokenizer.py). Requests are scored as lm-eval's own
Hugging Face adapter (HFLM) scores them, so the numbers are comparable:

* loglikelihood(context, continuation): whole = encode(context + continuation),
  context tokens = encode(context) (trailing spaces of the context move to the
  continuation); an empty context is preceded by the end-of-text token. The
  result is the summed log-probability of the continuation's tokens and whether
  each was the greedy choice. Inputs longer than max_seq_len keep their last
  max_seq_len + 1 tokens.
* loglikelihood_rolling(text): the log-probability of every token of the text
  (the first predicted from end-of-text), in disjoint windows of max_seq_len.
* generate_until(context, {until, max_gen_toks}): greedy decoding with the KV
  cache, cut at the first stop string.

`run_tasks` runs named tasks (local YAML task files via `include_path`; there
is no network) and returns {task: {metric: value}}.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from forgec.compiler.errors import RunError, UsageError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError:  # pragma: no cover - an optional dependency
        raise RunError("--tasks needs lm-eval-harness (pip install 'lm-eval==0.4.9')") from None
    return lm_eval, LM


def make_forge_lm(model: torch.nn.Module, tokenizer, batch_size: int = 8):
    """A ForgeLM instance (its class derives from lm-eval's LM, imported lazily)."""
    _, LM = _lm_eval()

    class ForgeLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
            self.max_len = model.config.max_seq_len
            self.prefix = tokenizer.eos_id

        # -- scoring ------------------------------------------------------------------
        def _encode_pair(self, context: str, continuation: str) -> tuple[list, list]:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                return [self.prefix], self.tok.encode(continuation)
            whole = self.tok.encode(context + continuation)
            n = len(self.tok.encode(context))
            return whole[:n], whole[n:]

        @torch.no_grad()
        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            if not continuation:
                return 0.0, True
            ids = (context + continuation)[-(self.max_len + 1):]
            inputs = torch.tensor(ids[:-1])[None]
            logprobs = F.log_softmax(self.model(inputs)[0].float(), dim=-1)
            tail = logprobs[-len(continuation):]
            target = torch.tensor(continuation)
            picked = tail.gather(1, target[:, None])[:, 0]
            greedy = bool((tail.argmax(dim=-1) == target).all())
            return float(picked.sum()), greedy

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return [self._score(*self._encode_pair(*r.args)) for r in requests]

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for r in requests:
                ids = [self.prefix] + self.tok.encode(r.args[0])
                total = 0.0
                for start in range(0, len(ids) - 1, self.max_len):
                    total += self._score([ids[start]], ids[start + 1 : start + 1 + self.max_len])[0]
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests) -> list[str]:
            from .generate import generate

            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self.tok.encode(context) or [self.prefix]
                ids = ids[-self.max_len:]
                room = max(0, self.max_len - len(ids) + 1)
                new = generate(self.model, [ids], min(max_new, room),
                               eos_id=self.tok.stop_id)[0]
                if new and new[-1] == self.tok.stop_id:
                    new = new[:-1]
                text = self.tok.decode(new)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text)
            return out

    return ForgeLM()


def run_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], *,
              include_path: str | None = None, limit: int | None = None,
              batch_size: int = 8, log_samples: bool = False) -> dict:
    """Run lm-eval tasks on the model; {task: {metric: value}} (and "samples" with
    `log_samples`)."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UsageError("--tasks names no task")
    if include_path is not None and not os.path.isdir(include_path):
        raise UsageError(f"--include-path {include_path}: no such folder")
    # indexing lm-eval's thousands of built-in tasks takes a while: local tasks first
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)} (local tasks: "
                         "--include-path DIR with their YAML files)")
    lm = make_forge_lm(model, tokenizer, batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=log_samples, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    except (OSError, ValueError, FileNotFoundError, ConnectionError) as e:
        raise RunError(f"lm-eval could not run {', '.join(tasks)}: {type(e).__name__}: {e}") \
            from None
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
               for task, metrics in out["results"].items()}
    if log_samples:
        results["samples"] = out["samples"]
    return results
