"""`alignkit` command line: argument parsing and dispatch only.

Every subcommand imports its implementation lazily, so `alignkit --help` stays
fast and `alignkit run` never imports Gradio. Bad input anywhere below raises
`UserError`; it is printed as one line and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from alignkit.errors import TrainingDiverged, UserError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe's stages in dependency order (skipping complete ones)")
    p.add_argument("config", help="recipe YAML, e.g. recipes/configs/tiny_sft_dpo.yaml")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last complete checkpoint")
    p.add_argument("--only", action="append", default=[], metavar="STAGE[,STAGE]",
                   help="run only these stages, repeated or comma-separated (their parents must be complete)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan without training")
    p.add_argument("--launcher", choices=["local", "accelerate"], default="local", help="how each training stage is launched")
    p.add_argument("--accelerate-config", default=None, help="accelerate config file, with --launcher accelerate")
    p.add_argument("--num-processes", type=int, default=None, help="processes per stage, with --launcher accelerate")
    p.set_defaults(handler=_run)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path; stages are addressed by name, "
                        "e.g. --set stages.dpo.train.beta=0.2 (repeatable)")


def _run(args: argparse.Namespace) -> int:
    from recipes.runner import run_recipe_from_cli

    return run_recipe_from_cli(args)


def _add_loop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop", help="rounds of labels from the latest policy: sample, select, label, retrain, compare")
    p.add_argument("config", help="recipe YAML with a loop: section, e.g. recipes/configs/tiny_loop.yaml")
    _add_overrides(p)
    p.add_argument("--wait", action="store_true",
                   help="poll the label store until a round has its votes, instead of saying where it stands and exiting")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="with --wait, seconds between looks at the store")
    p.add_argument("--status", action="store_true", help="print every round's state and change nothing")
    p.set_defaults(handler=_loop)


def _loop(args: argparse.Namespace) -> int:
    from recipes.loop import loop_from_cli

    return loop_from_cli(args)


def _add_stage(sub: argparse._SubParsersAction) -> None:
    # Internal: the runner launches one stage per process through this (used with accelerate).
    p = sub.add_parser("_stage")  # no help=: argparse lists a subcommand with help, even SUPPRESS, in --help
    p.add_argument("plan", help="path to the stage plan JSON the runner wrote")
    p.set_defaults(handler=_stage)


def _stage(args: argparse.Namespace) -> int:
    from recipes.runner import run_stage_from_plan

    return run_stage_from_plan(args.plan)


def _add_label(sub: argparse._SubParsersAction) -> None:
    # The label subcommands are parsed by labeling_ui.cli so the app's options live beside the app.
    p = sub.add_parser("label", help="label store and labeling app: import, serve, add-user, export, stats, simulate",
                       add_help=False)
    p.add_argument("label_argv", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_label)


def _label(args: argparse.Namespace) -> int:
    from labeling_ui.cli import main as label_main

    return label_main(args.label_argv)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="blind A/B comparison of models with a judge; win rates, ratings, plots")
    p.add_argument("--model", dest="models", action="append", default=[], metavar="[NAME=]SPEC", help="model spec (repeat, at least 2)")
    p.add_argument("--prompts", help="JSONL of prompts (a `prompt` or `messages` field)")
    p.add_argument("--judge", help="reward:STAGE_DIR | oracle:NAME | llm:MODEL_SPEC | human:DB")
    p.add_argument("--out", required=True, help="output directory (compare.json, compare.md, PNG plots)")
    p.add_argument("--collect", action="store_true", help="with a human judge: gather the votes stored so far and write results")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--tie-margin", type=float, default=0.0, help="reward judge: score differences within this margin are ties")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for CIs (>= 100)")
    p.add_argument("--battles", type=int, default=None, metavar="N",
                   help="with a human judge: send N battles (each a pair on a prompt it has not met on), not every pair on every prompt")
    p.add_argument("--select", default=None, metavar="uncertainty|uniform",
                   help="how --battles are allocated: to the pairs whose rating difference is least certain (default), or evenly")
    p.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from alignkit.compare import compare_from_cli

    return compare_from_cli(args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="task metrics (evaluate): each model answers a file's prompts, scored against references")
    p.add_argument("models", nargs="+", metavar="[NAME=]SPEC", help="model spec(s): stage dir, adapter dir, model dir, hub id")
    p.add_argument("--data", required=True, help="JSONL of prompt + reference (or answer) rows, or messages ending in the reference")
    p.add_argument("--metric", dest="metrics", action="append", default=[], metavar="NAME",
                   help="an evaluate metric by name (exact_match, rouge, bleu, chrf, accuracy) or a local metric "
                        "script directory (repeatable)")
    p.add_argument("--out", required=True, help="output directory (eval.json, eval.md, predictions.jsonl, eval.png)")
    p.add_argument("--extract", choices=["none", "gsm8k", "last_number", "regex"], default="none",
                   help="answer extraction before scoring: gsm8k takes the text after '####'")
    p.add_argument("--answer-pattern", default=None, help="with --extract regex: the answer is its first group")
    p.add_argument("--normalize", action="append", default=None, choices=["lowercase", "punctuation", "whitespace", "articles"],
                   help="normalisation after extraction, in order (repeatable; default: whitespace)")
    p.add_argument("--reward", default=None, metavar="STAGE_DIR", help="a reward stage: also report its mean score of the answers")
    p.add_argument("--no-perplexity", dest="perplexity", action="store_false", help="skip the references' perplexity")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from alignkit.evaluation import eval_from_cli

    return eval_from_cli(args)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a stage's adapter into a full model for vLLM / TGI / transformers")
    p.add_argument("spec", help="stage directory or adapter directory")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--base-weights", default="original", choices=["original", "dequantized"],
                   help="merge onto the full-precision base (original) or onto the NF4 weights a QLoRA adapter "
                        "was trained on (dequantized: reproduces the trained 4-bit model)")
    p.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    from alignkit.merge import merge_from_cli

    return merge_from_cli(args)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="a quick look at what a model says")
    p.add_argument("spec", help="model spec: hub id, model dir, adapter dir, or stage dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the chat template (for chat-trained stages); "
                        "default: raw text to continue")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from alignkit.generation import SamplingParams, generate_from_spec

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompts = [[{"role": "user", "content": p}] for p in args.prompt] if args.chat else args.prompt
    for prompt, text in zip(args.prompt, generate_from_spec(args.spec, prompts, params)):
        print(f"### {prompt}\n{text}\n")
    return 0


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="memory needed to train a model, from its config alone")
    p.add_argument("model", help="a model spec: hub id, model dir, adapter or stage dir, alignkit-tiny, or a config.json "
                                 "(only the base's config.json is read)")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default=None,
                   help="default: what a stage directory records, else qlora")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=None, help="default: an adapter's own rank, else 16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lm-head", choices=["fused", "full", "score"], default=None,
                   help="fused: TRL's chunked log-prob head (SFT, DPO, GRPO stages); full: the model's own logits "
                        "and loss (PPO); score: a reward model's score head. Default: by a stage's kind, else fused")
    p.set_defaults(handler=_estimate)


def _estimate(args: argparse.Namespace) -> int:
    from alignkit.estimate import estimate_from_cli

    return estimate_from_cli(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the offline end-to-end demo on a synthetic task with a known oracle")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run, not the claims)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the data, labels, sampling and training (0: the numbers in benchmarks/results_demo.md)")
    p.add_argument("--loop", action="store_true",
                   help="the loop's proof instead: rounds of labels from the latest policy against one-shot labeling")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from demo.main import demo_from_cli

    return demo_from_cli(args)


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="write the offline tiny Llama model + tokenizer to a directory")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_tiny)


def _tiny(args: argparse.Namespace) -> int:
    from alignkit.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Preference alignment: label response pairs in a "
                                     "browser, train SFT / reward / DPO / KTO / PPO stages over QLoRA adapters, compare models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_loop, _add_stage, _add_label, _add_compare, _add_eval, _add_merge, _add_generate, _add_estimate, _add_demo, _add_tiny):
        add(sub)
    return parser


def _quiet_dependency_noise() -> None:
    import logging
    import warnings

    # On CPUs with AVX512-BF16, importing bitsandbytes asks for a hub kernel package: not the user's to act on,
    # and alignkit switches that inference kernel off for training anyway (modeling.keep_4bit_differentiable).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    # TRL's configs still use transformers' old `gradient_checkpointing` names; the rename warning is not the user's to fix.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch.jit.script_method.* is deprecated", category=DeprecationWarning)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill`) and SIGHUP (a closed terminal) are handled like Ctrl-C: the stage
    stops incomplete, and accelerate's workers, in their own process group, with it."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["label"]:
        # All of it to labeling_ui.cli: argparse's REMAINDER would not take a leading `--help` along.
        args = argparse.Namespace(handler=_label, label_argv=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    _quiet_dependency_noise()
    try:
        _interrupt_on_sigterm()
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"alignkit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        print(f"alignkit: training diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
