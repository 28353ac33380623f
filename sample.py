"""Chat with a trained model in the terminal, or answer prompts given on the command line.

    python sample.py                                  # out/default/export, the default run of train.py
    python sample.py --model out/toy/export --temperature 0
    python sample.py --model path/to/openchat_3.5 --prompt "What is 7 * 6?" --prompt "Name a prime."

The prompt, the template the model was trained with (data.encode_prompt) and a C-RLFT class condition (by default
the expert's), goes through the model in one pass, then one token a step with the KV cache; replies stream and stop at
the template's end of turn (<|end_of_turn|>, <|eot_id|>, ...) or the tokenizer's end of text, or after BLANK_RUN tokens
of whitespace in a row (a reply without text is said in one line). Options take train.py's spelling, --max_new_tokens
(--max-new-tokens works too). In the chat: /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."""

import argparse
import dataclasses
import itertools
import json
import os
import sys
from typing import Iterator

import torch

import data
from chat_readers import EXPERT_CONDITION
from model import Transformer
from tokenizing import checkpoint_tokenizer

DEFAULT_MODEL = os.path.join("out", "default", "export")
# tokens of whitespace in a row that end a reply: an undertrained model's blank lines go on and on
BLANK_RUN = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is drawn: temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None  # seeded draws (--seed): the same on any device


GREEDY = Sampling(temperature=0.0)


def load(
    model_path: str,
    tokenizer_path: str | None = None,
    template: str | None = None,
    device=None,
    dtype=None,
    max_seq_len: int | None = None,
):
    """(model, tokenizer) from a Hugging Face directory and its tokenizer (or `tokenizer_path`), with the template it
    was trained with: `template`, else the one its export names, else the one its special tokens choose."""
    if not os.path.isdir(model_path):
        hint = (
            " (run `python train.py` first to train and export the default model)"
            if os.path.normpath(model_path) == DEFAULT_MODEL
            else ""
        )
        raise FileNotFoundError(f"{model_path}: no such model directory{hint}")
    model = Transformer.from_pretrained(
        model_path, device=device, dtype=dtype, max_seq_len=max_seq_len
    )
    trained = trained_with(model_path)
    tokenizer = data.use_template(
        checkpoint_tokenizer(model_path, model.args.vocab_size, tokenizer_path),
        template or trained.get("template"),
    )
    # Our export's eos_token is the end of turn (what a plain client stops at); its generation_config.json names the
    # tokenizer's own end of text beside it, also a stop id.
    other_stops = [i for i in trained.get("stops", []) if i != tokenizer.eot_id]
    if tokenizer.eos_id == tokenizer.eot_id and other_stops:
        tokenizer.eos_id = other_stops[0]
    # a token added for the template, never trained
    if tokenizer.vocab_size > model.args.vocab_size:
        i = tokenizer.vocab_size - 1
        raise ValueError(
            f"{model_path}: the model has no row for {tokenizer.piece(i)!r} (id {i}) of template "
            f"{tokenizer.template}: fine-tune it with that template first (train.py adds the row), or "
            "choose another with --template"
        )
    return model.eval(), tokenizer


def sample_token(logits, how: Sampling = Sampling()) -> int:
    """One token id from logits (V,), drawn as `how` says."""
    if how.temperature <= 0:
        return int(logits.argmax())
    logits, ids = logits.float() / how.temperature, None
    if how.generator is not None:
        # a seeded CPU generator: the same draws on any device
        logits = logits.to(how.generator.device)
    if how.top_k > 0:
        logits, ids = torch.topk(logits, min(how.top_k, logits.numel()))  # (k,), sorted
    elif how.top_p < 1.0:
        logits, ids = torch.sort(logits, descending=True)
    probs = torch.softmax(logits, dim=-1)
    # keep the smallest prefix of the sorted tokens whose probability reaches top_p (>= 1 token)
    if how.top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= how.top_p, 0.0)
    choice = int(torch.multinomial(probs, 1, generator=how.generator))
    return choice if ids is None else int(ids[choice])


def generate(
    model: Transformer,
    prompt_ids,
    max_new_tokens: int,
    how: Sampling = Sampling(),
    stop_ids=(),
    n_ids: int | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new ids after prompt_ids (fewer at the model's context), a sampled stop id last.
    n_ids: the tokenizer's; rows past it (a padded vocabulary) were never a target and are never sampled."""
    prompt_ids = list(prompt_ids)
    n_positions = min(len(prompt_ids) + max_new_tokens, model.args.max_seq_len)
    if not 0 < len(prompt_ids) <= n_positions:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens: must be non-empty and fit the model's context "
            f"of {model.args.max_seq_len} tokens"
        )
    device, stop_ids, tokens, pos = model.output.weight.device, set(stop_ids), prompt_ids, 0
    model.setup_kv_cache(1, n_positions)
    try:
        for _ in range(max_new_tokens):  # the prompt in one forward pass, then each new token alone
            # per step, not around the yields: it must not leak into the caller's code
            with torch.inference_mode():
                logits = model.decode(torch.tensor([tokens], device=device), pos, last_only=True)[
                    0, -1, :n_ids
                ]
                token = sample_token(logits, how)
            yield token
            pos, tokens = pos + len(tokens), [token]
            if token in stop_ids or pos == n_positions:
                return
    finally:
        model.clear_kv_cache()


def stream_text(tokenizer, ids: Iterator[int], stop_ids=()) -> Iterator[str]:
    """Text pieces of the ids before the first stop id: "".join(pieces) == tokenizer.decode(those ids), spaces too."""
    reply, shown = [], ""
    for token in itertools.takewhile(lambda t: t not in stop_ids, ids):
        reply.append(token)
        # else maybe half a character: wait for the rest
        if not (text := tokenizer.decode(reply)).endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    if len(text := tokenizer.decode(reply)) > len(shown):
        yield text[len(shown) :]


def respond(
    model,
    tokenizer,
    messages,
    out,
    condition: str = EXPERT_CONDITION,
    system: str | None = None,
    max_new_tokens: int = 512,
    how: Sampling = Sampling(),
):
    """Stream the assistant's reply to the conversation `messages` (ending with a user message) to `out`.
    Returns the history after the reply (oldest exchanges dropped when it outgrew the context)."""
    max_seq_len, kept = model.args.max_seq_len, messages
    room = min(max_new_tokens, max_seq_len // 2)  # tokens kept free for the reply
    while (
        len(prompt := data.encode_prompt(tokenizer, kept, condition, system)) + room > max_seq_len
        and len(kept) > 1
    ):
        # the oldest user message and the reply to it; the latest user message always stays
        kept = kept[2:]
    if len(kept) < len(messages):
        out.write(
            f"(the conversation outgrew the {max_seq_len}-token context: dropped the oldest "
            f"{(len(messages) - len(kept)) // 2} exchange(s))\n"
        )
    if len(prompt) >= max_seq_len:
        out.write(
            f"(this message makes a {len(prompt)}-token prompt and the context holds {max_seq_len}: "
            "send something shorter)\n"
        )
        return kept[:-1]
    out.write("Assistant: ")
    stop_ids = {tokenizer.eot_id, tokenizer.eos_id} - {None}  # the end of turn, and of text
    # Whitespace is held back until text follows it: a model early in training may answer with nothing but blank
    # lines; after BLANK_RUN of them in a row it is stopped, and a reply without text is said to be one.
    reply, held, blank, seen, interrupted = "", "", 0, [], False
    ids = generate(model, prompt, max_new_tokens, how, stop_ids, n_ids=tokenizer.vocab_size)
    try:
        for text in stream_text(tokenizer, recorded(ids, seen), stop_ids):
            if text.strip():
                print(held + text, end="", file=out, flush=True)
                reply, held, blank = reply + held + text, "", 0
            else:
                held, blank = held + text, blank + 1
                if blank == BLANK_RUN:
                    break
    # Ctrl-C: stop this reply, keep the session and what was shown of the reply
    except KeyboardInterrupt:
        out.write(" (stopped)")
        interrupted = True
    finally:
        ids.close()  # a reply stopped early: its KV cache is freed now
    # whitespace that ends a reply, as the model wrote it
    if reply and blank < BLANK_RUN and not interrupted:
        out.write(held)
        reply += held
    out.write("\n")
    ended = bool(seen) and seen[-1] in stop_ids
    # nothing to keep (and the template has no empty messages): forget the question too
    if not reply:
        out.write(no_text(len(seen) - ended, ended, blank == BLANK_RUN, interrupted) + "\n")
        return kept[:-1]
    if blank == BLANK_RUN:
        out.write(f"(stopped: {BLANK_RUN} tokens of whitespace in a row)\n")
    return kept + [{"role": "assistant", "content": reply}]


def no_text(n_tokens: int, ended: bool, blank_run: bool, interrupted: bool) -> str:
    """The one line that says a reply had no text, and how it ended."""
    if interrupted:
        how = "stopped by Ctrl-C"
    elif ended and n_tokens == 0:
        how = "it ended its turn at once"
    elif ended:
        how = "only whitespace, then the end of its turn"
    elif blank_run:
        how = f"only whitespace, stopped after {BLANK_RUN} tokens of it"
    else:
        how = "only whitespace, up to --max_new_tokens or the context"
    return f"(the model produced no text in {n_tokens} token(s): {how}; this exchange is not kept in the history)"


def recorded(ids: Iterator[int], seen: list) -> Iterator[int]:
    """The ids, each also appended to `seen` (respond counts them and sees how generation ended)."""
    for token in ids:
        seen.append(token)
        yield token


def chat(model, tokenizer, read_line=None, out=None, **settings):
    """A multi-turn chat. read_line() returns the user's next line, or None at the end of input (default: the
    terminal); replies stream to out (default: stdout); settings are respond's. Returns the final history."""
    # piped input: show it, so the transcript reads like a chat
    echo = read_line is None and not sys.stdin.isatty()
    read_line, out, messages = read_line or input, out or sys.stdout, []
    while True:
        print("User: ", end="", file=out, flush=True)
        try:
            line = read_line()
        except EOFError:  # Ctrl-D, or the end of piped input
            line = None
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits)\n")
            continue
        if echo and line is not None:
            print(line)
        if line is None or line.strip() == "/exit":
            out.write("\n" if line is None else "")
            return messages
        if line.strip() == "/reset":
            messages = []
            out.write("(history cleared)\n")
        elif line.strip():
            messages = respond(
                model, tokenizer, messages + [{"role": "user", "content": line}], out, **settings
            )


def trained_with(model_path: str) -> dict:
    """{"condition": the expert condition, "template": its name, "stops": the stop ids}, as train.py's export wrote
    them into tokenizer_config.json and generation_config.json; {} for a directory that has none."""
    found = {}
    for name, keys in (
        ("tokenizer_config.json", ("crlft_condition", "crlft_template")),
        ("generation_config.json", ("eos_token_id",)),
    ):
        try:
            with open(os.path.join(model_path, name), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        found.update({key.removeprefix("crlft_"): config[key] for key in keys if key in config})
    if "eos_token_id" in found:
        stops = found.pop("eos_token_id")
        found["stops"] = stops if isinstance(stops, list) else [stops]
    return found


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # train.py's spelling (--max_new_tokens); the dashed one (--max-new-tokens) is accepted too
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face LLaMA/Mistral directory (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or tokenizer.model (default: the model's own)",
    )
    p.add_argument(
        "--template",
        choices=list(data.TEMPLATES),
        help="chat template (default: the export's, else the "
        "one the tokenizer's special tokens choose)",
    )
    p.add_argument(
        "--condition",
        help=f"C-RLFT condition ('' for none; default: the export's or {EXPERT_CONDITION!r})",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--prompt", action="append", default=[], help="answer this prompt and exit (repeatable)"
    )
    p.add_argument(
        "--prompt_file",
        "--prompt-file",
        default=None,
        help="answer each line of this file and exit",
    )
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_p", "--top-p", type=float, default=1.0)
    p.add_argument("--top_k", "--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on GPU, else float32",
    )
    p.add_argument(
        "--max_seq_len",
        "--max-seq-len",
        type=int,
        help="context to use (default: the config's max_position_embeddings)",
    )
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1:
        p.error("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0, --max_new_tokens >= 1")
    device = torch.device(args.device)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = list(args.prompt)
    try:
        if args.prompt_file is not None:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        model, tokenizer = load(
            args.model,
            args.tokenizer,
            args.template,
            device=device,
            dtype=dtype,
            max_seq_len=args.max_seq_len,
        )
    except (OSError, ValueError) as e:
        sys.exit(f"error: {data.one_line(e)}")
    exported = trained_with(args.model).get("condition")
    if args.condition is not None:
        condition, source = args.condition, "--condition"
    elif exported is not None:
        condition, source = exported, "the export's default; --condition to change"
    else:
        condition, source = (
            EXPERT_CONDITION,
            "OpenChat's: the model names none; --condition to change",
        )
    # On stderr, in both modes: stdout holds the conversation alone
    print(
        f"{args.model}: {model.size_text()} on {device} ({dtype}), context {model.args.max_seq_len}, template "
        f"{tokenizer.template}, condition {condition!r} ({source})"
        + ("" if prompts else ". /reset clears, /exit quits."),
        file=sys.stderr,
        flush=True,
    )
    how = Sampling(
        args.temperature,
        args.top_p,
        args.top_k,
        None if args.seed is None else torch.Generator().manual_seed(args.seed),
    )
    settings = dict(
        condition=condition, system=args.system, max_new_tokens=args.max_new_tokens, how=how
    )
    for text in prompts:  # each prompt on its own, a single-turn conversation
        print(f"User: {text}")
        respond(model, tokenizer, [{"role": "user", "content": text}], sys.stdout, **settings)
    if not prompts:
        chat(model, tokenizer, **settings)


if __name__ == "__main__":
    main()
