"""README.md's worked example, run as written: its `make_tiny.py` block and
then each line of its command block (`forgec ...` through the CLI's main(),
`python make_tiny.py` and `python -c` in this process), in a fresh folder.
Nothing is downloaded. At the end, transformers' model of the exported folder
computes the run's logits within 1e-5."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import torch
from conftest import ROOT, THREADS

from forgec.compiler.cli import main as forgec
from forgec.runtime.generate import load_run_model
from forgec.runtime.train import read_metrics

MARK = "<!-- worked-example: {} -->\n```{}\n(.*?)```"


def readme_block(name: str, lang: str) -> str:
    found = re.search(MARK.format(re.escape(name), lang), (ROOT / "README.md").read_text(),
                      re.S)
    assert found, f"README.md has no worked-example block '{name}'"
    return found.group(1)


def commands(block: str) -> list[list[str]]:
    """The block's command lines (continuations joined, comments dropped)."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


def test_the_readme_worked_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(THREADS)
    make_tiny = readme_block("make_tiny.py", "python")
    (tmp_path / "make_tiny.py").write_text(make_tiny)
    outputs = {}
    for argv in commands(readme_block("commands", "sh")):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if argv == ["python", "make_tiny.py"]:
                exec(compile(make_tiny, "make_tiny.py", "exec"), {"__name__": "__main__"})
            elif argv[:2] == ["python", "-c"]:
                exec(compile(argv[2], "<README>", "exec"), {"__name__": "__main__"})
            else:
                assert argv[0] == "forgec", argv
                code = forgec(argv[1:])
                assert code == 0, f"{shlex.join(argv)}: exit {code}\n{err.getvalue()}"
        outputs[argv[1]] = (out.getvalue(), err.getvalue())
    # the spec got the model's tokenizer, and the run trained with it
    tok = (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert (tmp_path / "tiny.tokenizer" / "tokenizer.json").read_bytes() == tok
    assert (tmp_path / "runs" / "tiny" / "tokenizer" / "tokenizer.json").read_bytes() == tok
    assert "initialised from the Hugging Face checkpoint" in outputs["train"][1]
    assert len(read_metrics(str(tmp_path / "runs" / "tiny" / "metrics.jsonl"))) == 10
    assert outputs["generate"][0].startswith("def dumps(")
    assert "perplexity" in outputs["eval"][0] + outputs["eval"][1]
    assert "LlamaForCausalLM" in outputs["-c"][0]
    # transformers computes the fine-tuned run's logits
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", attn_implementation="eager").eval()
    model, _ = load_run_model(str(tmp_path / "runs" / "tiny"))
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), rtol=0, atol=1e-5)
