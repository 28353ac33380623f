"""The command line of data.py: tokenize sources once into a directory train.py reads (--data=DIR), or show a
conversation token by token with the weight of each token.

    python data_cli.py tokenize --data="GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json" --out=prepared
    python data_cli.py show --data=toy --index=3
"""

import argparse
import collections
import itertools
import json
import sys

import numpy as np

import chat_readers
import chat_sources
import data
import loss_weighting
import toy_task
from chat_readers import EXPERT_CONDITION, Conversation, DataError
from tokenizing import Tokenizer


def _show(c: Conversation, tokenizer: Tokenizer, class_weights, per_sequence: bool = False) -> None:
    pieces = data.template(
        tokenizer, c.messages, c.condition, c.system, data.class_weight(c, class_weights)
    )
    tokens, weights, turns = data.encode_pieces(tokenizer, [pieces], per_sequence)[0]
    refusal = np.zeros(len(tokens), bool)  # the tokens of replies --zero_refusals set to 0
    for end, n in (turns[k] for k in c.refusals):
        refusal[end - n : end] = True
    print(
        f"{c.source}  class {c.class_name!r}  condition {c.condition!r}  {len(tokens)} tokens, "
        f"{(weights > 0).sum()} supervised"
        + (f", {len(c.refusals)} refusal(s) at weight 0" if c.refusals else "")
    )
    grey, green, red, reset = (
        ("\033[90m", "\033[32m", "\033[31m", "\033[0m") if sys.stdout.isatty() else ("",) * 4
    )
    for (w, r), run in itertools.groupby(
        zip(tokens.tolist(), weights.tolist(), refusal),
        # grey: not trained on; green: is
        key=lambda t: (t[1], t[2]),
    ):
        mark = (
            f"{red}refusal, weight 0 (--zero_refusals) "
            if r
            else f"{green if w else grey}weight {w:<5g} "
        )
        print(mark + "".join(f"[{tokenizer.piece(t)}]" for t, _, _ in run) + reset)


def _flag(p, name: str, **kwargs) -> None:
    """train.py's spelling (--max_seq_len), the dash spelling accepted too (--max-seq-len); a switch is on alone
    or as train.py writes it (--skip_bad=true)."""
    dashed = name.replace("_", "-")
    if kwargs.pop("switch", False):
        kwargs.update(nargs="?", const=True, default=False, type=_true, metavar="true|false")
    p.add_argument(f"--{name}", *([f"--{dashed}"] if dashed != name else []), dest=name, **kwargs)


def _true(value: str) -> bool:
    if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
    return value.lower() in ("1", "true", "yes")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("tokenize", "show"):
        p = commands.add_parser(name)
        p.add_argument(
            "--data",
            "--input",
            dest="data",
            required=True,
            help="comma-separated sources, each "
            "[CLASS=]path: .jsonl (ours, OpenChat's), .json (ShareGPT), 'sharegpt' (the package's file); or "
            "'toy'",
        )
        p.add_argument(
            "--tokenizer",
            help="tokenizer.json, sentencepiece tokenizer.model or a model directory "
            "(default: Mistral v1's; toy's for toy)",
        )
        p.add_argument(
            "--template",
            choices=list(data.TEMPLATES),
            help="default: chosen by the tokenizer's special tokens",
        )
        _flag(
            p,
            "class_weights",
            type=chat_sources.parse_class_weights,
            help='e.g. "GPT4 Correct=1,GPT3=0.1"',
        )
        p.add_argument(
            "--condition",
            "--sharegpt_condition",
            default=EXPERT_CONDITION,
            help="class and condition of ShareGPT sources without one",
        )
        _flag(
            p,
            "class_from_field",
            default="",
            help="class each ShareGPT record by this field, e.g. model",
        )
        _flag(
            p,
            "class_map",
            default="",
            help=f"with --class_from_field: VALUE=CLASS,... or a .json file; "
            f"default {chat_readers.DEFAULT_CLASS_MAP}",
        )
        _flag(p, "condition_from_model", switch=True, help="the same as --class_from_field=model")
        _flag(p, "zero_refusals", switch=True, help="weight 0 on replies with refusal boilerplate")
        _flag(
            p,
            "refusal_phrases",
            default="",
            help="with --zero_refusals: a file of phrases, one a line",
        )
        _flag(
            p, "per_sequence_weights", switch=True, help="divide each reply's weight by its tokens"
        )
        _flag(p, "skip_bad", switch=True, help="skip and count bad records instead of failing")
        _flag(p, "toy_n", type=int, default=20_000)
        p.add_argument("--seed", type=int, default=0)
        if name == "tokenize":
            p.add_argument("--out", required=True)
            _flag(p, "max_seq_len", type=int, default=8192)
        else:
            p.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    stats = collections.Counter()
    try:
        toy = args.data == "toy"
        field = args.class_from_field or ("model" if args.condition_from_model else "")
        classes = (
            (field, chat_readers.parse_class_map(args.class_map or chat_readers.DEFAULT_CLASS_MAP))
            if field
            else None
        )
        refusals = loss_weighting.refusal_phrases(args.zero_refusals, args.refusal_phrases)
        tokenizer = data.load_tokenizer(
            args.tokenizer or (toy_task.TOKENIZER_PATH if toy else None), args.template
        )
        conversations = data.load_conversations(
            args.data,
            args.condition,
            args.skip_bad,
            stats,
            (args.toy_n, 0.02, args.seed, 1.0),
            classes,
            refusals,
        )
        class_weights = args.class_weights or (toy_task.CLASS_WEIGHTS if toy else None)
        if args.command == "show":
            if not 0 <= args.index < len(conversations):
                raise DataError(
                    args.data, f"--index {args.index}: there are {len(conversations)} conversations"
                )
            return _show(
                conversations[args.index], tokenizer, class_weights, args.per_sequence_weights
            )
        chat_sources.check_class_weights(conversations, class_weights)
        dataset = data.tokenize_dataset(
            conversations,
            tokenizer,
            args.max_seq_len,
            class_weights,
            progress=True,
            per_sequence=args.per_sequence_weights,
        )
        dataset.meta["summary"]["read"] = dict(stats)
        dataset.save(args.out)
    # bad input (or sharegpt's package missing): one line
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {data.one_line(e)}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(dataset.meta["summary"], indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
