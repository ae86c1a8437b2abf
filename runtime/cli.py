"""`forgec train` and `forgec generate`: registered by compiler/cli.py.

Nothing here imports torch at module level: `forgec check`/`build` must stay
torch-free and fast. The command functions import the runtime lazily.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add the runtime's subcommands; return {name: function(args) -> exit code}."""
    t = sub.add_parser(
        "train", help="train a spec's model (default data: the Python standard library)",
        description="Train the model of SPEC into the run folder --out. Settings left out "
        "take defaults (or, with --resume, the run's own).")
    t.add_argument("spec", metavar="SPEC")
    t.add_argument("--out", required=True, metavar="DIR", help="run folder")
    t.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    t.add_argument("--seed", type=int, help="seed of the weights and the data order (default 0)")
    t.add_argument("--ckpt-every", type=int, metavar="K",
                   help="checkpoint every K steps (default 0: only at the end)")
    t.add_argument("--keep-last", type=int, metavar="K",
                   help="keep only the newest K checkpoints (default 0: keep all)")
    t.add_argument("--eval-every", type=int, metavar="K",
                   help="vision-language models: caption eval every K steps (default 0: at the "
                   "end only)")
    t.add_argument("--resume", action="store_true",
                   help="continue DIR from its latest checkpoint; with none yet, start it "
                   "afresh")
    t.add_argument("--init-from", metavar="SRC",
                   help="start from these weights (a Hugging Face save_pretrained folder, a "
                   "run folder or one of its checkpoints/step_N), with a fresh optimizer and "
                   "schedule; with --resume, a checkpoint of --out wins")
    t.add_argument("--batch-size", type=int, metavar="B", help="sequences per step (default 8)")
    t.add_argument("--seq-len", type=int, metavar="L",
                   help="tokens per sequence (default min(max_seq_len, 256))")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    t.add_argument("--warmup", type=int, help="linear warmup steps (default min(100, steps/10))")
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    t.add_argument("--grad-accum", type=int, metavar="G",
                   help="split each batch into G micro-batches (default 1)")
    t.add_argument("--clip", type=float, help="max gradient norm; 0 disables (default 1.0)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    t.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each block (fullgraph); the first steps pay the "
                   "compilation")
    t.add_argument("--data", metavar="DATA",
                   help="a flat token file (numpy memmap; the tokenizer's end-of-text token, "
                   "0 for bytes, ends a document), a `forgec tokenize` folder, or a weighted "
                   "mixture of them: A:0.7,B:0.3")
    t.add_argument("--data-dtype", choices=("uint16", "uint32"),
                   help="element type of --data (default uint16)")
    t.add_argument("--tokenizer", metavar="TOK",
                   help="'byte', a folder with tokenizer.json, a spec or a run (default: "
                   "the spec's NAME.tokenizer/ beside it, else byte)")
    t.add_argument("--wandb", metavar="PROJECT",
                   help="log the metrics to this Weights & Biases project too (needs the "
                   "wandb package; single-process runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--plan", metavar="NAME",
                   help="train with the spec's parallel plan NAME under torchrun "
                   "(FSDP2 / pipeline; see README 'Distributed training')")
    t.add_argument("--nproc", type=int, metavar="K",
                   help="processes to launch on this machine for --plan (must equal the "
                   "plan's world size; default: that size)")

    g = sub.add_parser("generate", help="generate text from a training run's latest checkpoint",
                       description="Continue --prompt with a text model's run; caption images "
                       "with a vision-language model's run (--image, or --samples held-out "
                       "synthetic images beside their true captions).")
    g.add_argument("run", metavar="RUN_DIR")
    g.add_argument("--prompt", metavar="TEXT",
                   help="text to continue (required for a text model; a VLM's caption prefix)")
    g.add_argument("--chat", action="store_true",
                   help="text models: --prompt is a user message; render it as a conversation "
                   "with the chat template and print the assistant's reply")
    g.add_argument("--chat-template", metavar="FILE",
                   help="--chat: a jinja2 chat template (default: the run tokenizer's)")
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="default 200 (text), 40 (captions)")
    g.add_argument("--image", metavar="FILE", help="VLM runs: caption this image file")
    g.add_argument("--samples", type=int, metavar="N",
                   help="VLM runs: caption N held-out synthetic images (default 4)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): greedy")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--compile", action="store_true",
                   help="text runs: decode with static shapes and a compiled step (CUDA graphs "
                   "on a GPU); the first token pays the compilation")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p = sub.add_parser(
        "plan", help="a parallel plan at scale: per-rank parameters and memory",
        description="Build SPEC's model on the meta device under a fake process group of "
        "WORLD ranks, apply the plan's pipeline split and FSDP sharding, and report each "
        "rank's parameters and memory (weights, gradients, AdamW, gathered, activations).")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--plan", required=True, metavar="NAME")
    p.add_argument("--world", required=True, type=int, metavar="N",
                   help="ranks; must equal the plan's mesh product")
    p.add_argument("--micro-batch", type=int, default=1, metavar="B",
                   help="sequences per microbatch and rank (a vlm: each with one image; "
                   "default 1)")
    p.add_argument("--seq-len", type=int, metavar="L",
                   help="text tokens per sequence (default: the model's max_seq_len, a "
                   "vlm's max_text)")
    p.add_argument("--json", action="store_true", help="JSON with a per_rank list")

    x = sub.add_parser(
        "export-hf", help="write a training run as a Hugging Face checkpoint",
        description="Write the latest checkpoint of RUN_DIR as a transformers checkpoint: "
        "config.json (llama, mistral, qwen2, qwen3, mixtral or qwen3_moe, derived from the "
        "run's spec; or, with --config, the Hugging Face config of any family import-hf "
        "reads, checked against the run's model), safetensors weights and the tokenizer "
        "files. "
        "AutoModelForCausalLM.from_pretrained(DIR) then gives the run's logits.")
    x.add_argument("run", metavar="RUN_DIR")
    x.add_argument("-o", "--output", required=True, metavar="DIR")
    x.add_argument("--model-type", choices=("llama", "mistral", "qwen2", "qwen3", "mixtral",
                                            "qwen3_moe"),
                   help="the family to write (default: inferred from the spec)")
    x.add_argument("--config", metavar="PATH", dest="config_from",
                   help="write this Hugging Face config.json (or its folder's), e.g. the "
                   "model the spec was imported from, for any family import-hf reads; "
                   "checked to give the run's logits")
    x.add_argument("--max-shard-size", type=int, default=5000, metavar="MB",
                   help="largest safetensors file in MB (10^6 bytes; default 5000)")
    x.add_argument("--force", action="store_true",
                   help="replace the checkpoint files (config, weights, tokenizer) in DIR")

    e = sub.add_parser(
        "eval", help="held-out loss and perplexity of a training run",
        description="Evaluate RUN_DIR's latest checkpoint on held-out --data: the mean "
        "next-token cross-entropy (nats per token) and its perplexity, over consecutive "
        "windows of --seq-len tokens in file order (deterministic).")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--data", metavar="PATH",
                   help="a token file (see --data-dtype), a `forgec tokenize` folder or its "
                   "manifest.json, or a .txt/.jsonl/.parquet file (tokenized with the run's "
                   "tokenizer)")
    e.add_argument("--data-dtype", choices=("uint16", "uint32"), default="uint16",
                   help="element type of a flat token file (default uint16)")
    e.add_argument("--seq-len", type=int, metavar="L",
                   help="tokens per window (default: the run's --seq-len)")
    e.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="windows per forward (default 8; does not change the result)")
    e.add_argument("--max-tokens", type=int, metavar="N",
                   help="evaluate the first N tokens only")
    e.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text column of JSONL/Parquet input (default: text)")
    e.add_argument("--tasks", metavar="NAMES",
                   help="lm-eval-harness tasks (comma-separated) instead of --data")
    e.add_argument("--include-path", metavar="DIR",
                   help="folder of local lm-eval task YAML files (with --tasks)")
    e.add_argument("--limit", type=int, metavar="N", help="with --tasks: N examples per task")
    e.add_argument("--json", action="store_true", help="print the results as JSON")

    k = sub.add_parser(
        "tokenize", help="tokenize text, JSONL and Parquet into sharded token files",
        description="Tokenize INPUT files and folders (.txt/.md: one document per file; "
        ".jsonl: one per line; .parquet: one per row) into OUT/shard_NNNNN.bin token files "
        "and OUT/manifest.json, for `forgec train --data OUT`. The output does not depend on "
        "--workers; an interrupted run started again skips its finished shards.")
    k.add_argument("inputs", nargs="+", metavar="INPUT")
    k.add_argument("-o", "--output", required=True, metavar="OUT", help="dataset folder")
    k.add_argument("--tokenizer", default="byte", metavar="TOK",
                   help="'byte' (default), a folder with tokenizer.json, a spec (its "
                   "NAME.tokenizer/) or a training run (its tokenizer)")
    k.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text of a JSONL object or Parquet row (default: text)")
    k.add_argument("--format", choices=("text", "pairs", "chat"), default="text",
                   help="text (default): documents; pairs: JSONL prompt/response examples; "
                   "chat: JSONL conversations rendered with the chat template. Examples keep "
                   "a loss mask: training learns the responses only")
    k.add_argument("--prompt-field", default="prompt", metavar="NAME",
                   help="--format pairs: the prompt of a record (default: prompt)")
    k.add_argument("--response-field", default="response", metavar="NAME",
                   help="--format pairs: the response of a record (default: response)")
    k.add_argument("--messages-field", default="messages", metavar="NAME",
                   help="--format chat: the [{role, content}, ...] of a record "
                   "(default: messages)")
    k.add_argument("--chat-template", metavar="FILE",
                   help="--format chat: a jinja2 chat template (default: the tokenizer's "
                   "chat_template in tokenizer_config.json)")
    k.add_argument("--docs-per-shard", type=int, default=10_000, metavar="N",
                   help="documents per shard (default 10000)")
    k.add_argument("--workers", type=int, default=1, metavar="K",
                   help="processes tokenizing shards in parallel (default 1)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.add_argument("--force", action="store_true",
                   help="start afresh in a folder that holds other data")
    return {"train": cmd_train, "generate": cmd_generate, "plan": cmd_plan,
            "export-hf": cmd_export_hf, "eval": cmd_eval, "tokenize": cmd_tokenize}


def cmd_train(args) -> int:
    if args.plan is not None or args.nproc is not None:
        if args.wandb is not None:
            from forgec.compiler.errors import UsageError

            raise UsageError("--wandb logs single-process runs; with --plan, use the "
                             "TensorBoard event files in the run folder")
        from .distributed import launch

        return launch(args)
    from .loop import Stopped
    from .train import train

    try:
        train(args.spec, args.out, resume=args.resume, progress=not args.no_progress,
              wandb=args.wandb,
              steps=args.steps, seed=args.seed, ckpt_every=args.ckpt_every,
              keep_last=args.keep_last, eval_every=args.eval_every,
              batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
              min_lr=args.min_lr, grad_accum=args.grad_accum, clip=args.clip,
              weight_decay=args.weight_decay, bf16=args.bf16, compile=args.compile, data=args.data,
              data_dtype=args.data_dtype, tokenizer=args.tokenizer, init_from=args.init_from)
    except Stopped as e:  # SIGTERM/SIGUSR1: checkpointed, a clean exit
        print(f"forgec: {e}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from forgec.compiler.errors import UsageError

    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise UsageError("--max-new-tokens must not be negative")
    if args.temperature < 0:
        raise UsageError("--temperature must not be negative")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if args.prompt is not None and not args.prompt:
        raise UsageError("--prompt must not be empty")
    if args.samples is not None and args.samples < 1:
        raise UsageError("--samples must be at least 1")
    if args.image is not None and args.samples is not None:
        raise UsageError("give --image or --samples, not both")
    from .generate import generate_text, load_run_model
    from .tokenizer import run_tokenizer

    model, info = load_run_model(args.run)
    if hasattr(model, "encode_images"):  # a vision-language model: captions
        from .vlm_generate import caption_lines

        lines = caption_lines(model, image=args.image, samples=args.samples or 4,
                              prompt=args.prompt or "", max_new_tokens=args.max_new_tokens or 40,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    if args.image is not None or args.samples is not None:
        raise UsageError(f"--image and --samples need a vision-language model; {args.run} "
                         "trained a text model")
    if args.prompt is None:
        raise UsageError("--prompt is required for a text model")
    if args.max_new_tokens is None:
        args.max_new_tokens = 200
    tok, prompt = run_tokenizer(args.run), args.prompt
    if args.chat:
        from .chat import render_user_message

        prompt = render_user_message(tok, prompt, args.chat_template)
    elif args.chat_template is not None:
        raise UsageError("--chat-template needs --chat")
    text = generate_text(model, prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         note_stream=sys.stderr, token_file=info["settings"].get("data"),
                         tokenizer=tok, reply_only=args.chat, compile=args.compile)
    sys.stdout.write(text + "\n")
    return 0


def cmd_plan(args) -> int:
    from .planner import cmd_plan as run

    return run(args)


def cmd_export_hf(args) -> int:
    from forgec.compiler.errors import UsageError

    if args.max_shard_size < 1:
        raise UsageError("--max-shard-size must be at least 1 (MB)")
    from .export import export_hf

    config = export_hf(args.run, args.output, model_type=args.model_type,
                       config_from=args.config_from,
                       max_shard_size=args.max_shard_size * 10**6, force=args.force)
    layers = config.get("num_hidden_layers", config.get("n_layer", "?"))
    print(f"wrote {args.output}: {config.get('model_type')} ({layers} layers, "
          f"vocabulary {config.get('vocab_size')}) with its tokenizer", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import cmd_eval as run

    return run(args)


def cmd_tokenize(args) -> int:
    from .tokenize import cmd_tokenize as run

    return run(args)
