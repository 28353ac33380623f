"""Export a trained model as a directory that Hugging Face transformers and vLLM serve as they are.

The directory holds the weights (model.py's save_pretrained: config.json + model.safetensors), the sentencepiece
tokenizer.model, a tokenizer.json for the fast (Rust) tokenizer, tokenizer_config.json with OpenChat's chat template,
special_tokens_map.json and generation_config.json (stop on <|end_of_turn|> and </s>, temperature 0.7, top-p 1.0).

Why write tokenizer.json ourselves: without protobuf, transformers 5 cannot convert tokenizer.model at all, and
its LlamaTokenizer rebuilds the pipeline with a Metaspace pre-tokenizer that adds the word-start marker only when
a piece does not already start with a space, so content with leading spaces would tokenize differently from
sentencepiece (and from our training data). The tokenizer.json below mirrors sentencepiece's BPE exactly: every
piece of text between special tokens gets the word-start marker (sentencepiece's dummy prefix, which is why the
template's "User: " + content gives the same ids as encoding "User:" and the content separately), spaces become
"▁", and merges are ranked by the score of the piece they make. `tokenizer_class` is PreTrainedTokenizerFast so
that transformers loads this file as it is instead of rebuilding it.

One known disagreement: content that contains the literal text <|end_of_turn|> (or <s>, </s>). Our training
encodes it as ordinary text, so a user cannot end a turn by typing it; a Hugging Face tokenizer (and so vLLM)
splits added tokens out of any text before tokenizing, so through `apply_chat_template` that literal becomes the
special id. A chat template cannot escape it (it renders a string, which is then tokenized), so the export
cannot agree in that adversarial case; tests/test_export.py asserts the difference explicitly.
"""
import json
import os
import shutil

import sentencepiece as spm

from data import EOT_TEXT as EOT  # "<|end_of_turn|>"


def chat_template(condition):
    """OpenChat 3.5's Jinja chat template: BOS, then per message "{condition} {Role}: {content}<|end_of_turn|>"
    (system: "{content}<|end_of_turn|>"), and "{condition} Assistant:" to generate; "" gives "User:"/"Assistant:".
    The template variable `condition` picks the class per request (transformers: apply_chat_template(...,
    condition="GPT3"); vLLM: chat_template_kwargs={"condition": ...}); this argument is its default."""
    default = condition.replace("\\", "\\\\").replace("'", "\\'")  # inside a Jinja string literal
    return (
        "{% set condition = condition if condition is defined and condition is not none else '" + default + "' %}"
        "{% set prefix = condition + ' ' if condition else '' %}"
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '" + EOT + "' }}"
        "{% else %}{{ prefix + message['role'] | title + ': ' + message['content'] + '" + EOT + "' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ prefix + 'Assistant:' }}{% endif %}"
    )


# --- reading the few sentencepiece settings the Python API does not expose (protobuf wire format) ---

def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf):
    """{field number: last value} of one protobuf message (varints as int, everything else as bytes)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        out[number] = value
    return out


def sentencepiece_settings(model_path):
    """The model type and normalizer settings of a sentencepiece model file (sentencepiece_model.proto numbers)."""
    with open(model_path, "rb") as f:
        model = _fields(f.read())
    trainer, normalizer = _fields(model.get(2, b"")), _fields(model.get(3, b""))
    return {
        "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer.get(3, 1), "unknown"),
        "byte_fallback": bool(trainer.get(35, 0)),
        "normalizer": normalizer.get(1, b"nmt_nfkc").decode(),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def bpe_merges(sp):
    """The merge list, best first, for tokenizers' BPE to split text exactly as sentencepiece's BPE does.

    sentencepiece repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece, so the
    merges are every split (left, right) of a normal piece into two normal pieces, ranked by that score. Where
    scores tie, sentencepiece merges the leftmost pair first but tokenizers merges by rank, so the ranks must
    be chosen. The only ties we know of are Mistral's runs of spaces ("▁" * k, k = 2..14 and 16, all scored
    -1e9: merged after everything else, when a run stands alone); see _space_run_merges.
    """
    normal = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    score = {p: sp.get_score(i) for p, i in normal.items()}
    runs = sorted(len(p) for p in normal if set(p) == {"▁"})
    tied_runs = len(runs) > 2 and len({score["▁" * k] for k in runs if k > 1}) == 1
    merges = []  # (-score of the merged piece, rank among equal scores, left, right)
    for p in normal:
        if tied_runs and set(p) == {"▁"}:
            continue
        merges += [(-score[p], 0, p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    if tied_runs:
        merges += [(-score["▁" * (a + b)], rank, "▁" * a, "▁" * b)
                   for rank, (a, b) in enumerate(_space_run_merges(set(runs)))]
    merges.sort(key=lambda m: (m[0], m[1], normal[m[2]], normal[m[3]]))
    return [[left, right] for _, _, left, right in merges]


def _space_run_merges(lengths):
    """Ranked (left, right) run lengths for runs of "▁" whose pieces all have one score.

    sentencepiece then merges the leftmost pair first, so a run grows from the left: Mistral's run of n spaces
    becomes pieces of 16 and then the rest in one piece (15: 14 + 1). With these ranks tokenizers' BPE gives the
    same: first equal halves, 1+1, 2+2, 4+4, 8+8 (each pairing from the left, so the run becomes 16s and then
    the rest's binary digits, largest first), then the digits joined from the left (8+4, then +2, then +1).
    tests/test_export.py checks every run length against sentencepiece.
    """
    merges, half = [], 1
    while 2 * half in lengths:
        merges.append((half, half))
        half *= 2
    digit = half // 2
    while digit >= 1:
        merges += [(left, digit) for left in range(2 * digit, half, 2 * digit)
                   if left in lengths and left + digit in lengths]
        digit //= 2
    return merges


def tokenizer_json(model_path, eot_id):
    """A tokenizers-library tokenizer.json equivalent to the sentencepiece model plus <|end_of_turn|> = eot_id."""
    sp = spm.SentencePieceProcessor(model_file=model_path)  # its own short error for a file that is not a model
    settings = sentencepiece_settings(model_path)
    charsmap = len(settings.pop("precompiled_charsmap"))  # bytes (~240 KB for nmt_nfkc): only its size in messages
    settings["normalizer"] += f" with a {charsmap / 1e3:.0f} KB precompiled_charsmap" if charsmap else ""
    wanted = {"model_type": "bpe", "normalizer": "identity", "remove_extra_whitespaces": False,
              "escape_whitespaces": True}  # Mistral's and LLaMA's
    bad = [f"{k} {settings[k]} (need {v})" for k, v in wanted.items() if settings[k] != v]
    if bad:
        raise ValueError(f"{model_path}: tokenizer.json cannot reproduce this sentencepiece model: {'; '.join(bad)}")
    n_pieces = sp.get_piece_size()
    if eot_id != n_pieces:
        raise ValueError(f"{model_path}: {EOT} id {eot_id} (need {n_pieces}, the id right after the pieces)")
    if min(sp.bos_id(), sp.eos_id()) < 0:
        raise ValueError(f"{model_path}: bos_id {sp.bos_id()}, eos_id {sp.eos_id()} (need both pieces)")
    pieces = [sp.id_to_piece(i) for i in range(n_pieces)]
    specials = [i for i in range(n_pieces) if sp.is_control(i) or sp.is_unknown(i)]
    model = {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": settings["byte_fallback"],
             "ignore_merges": False, "vocab": {p: i for i, p in enumerate(pieces)}, "merges": bpe_merges(sp)}
    # Prepend (unlike Metaspace) adds the marker to every non-empty text piece, even one starting with a space.
    normalizers = [{"type": "Prepend", "prepend": "▁"}] if settings["add_dummy_prefix"] else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if settings["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = {"SpecialToken": {"id": pieces[sp.bos_id()], "type_id": 0}}
    added = [(i, pieces[i]) for i in specials] + [(eot_id, EOT)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, text in added],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {  # tokenizer(text) starts with BOS, like sentencepiece-based LLaMA tokenizers
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {pieces[sp.bos_id()]: {"id": pieces[sp.bos_id()], "ids": [sp.bos_id()],
                                                     "tokens": [pieces[sp.bos_id()]]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def export_hf(model, tokenizer, out_dir, condition="GPT4 Correct"):
    """Write `model` (model.Transformer) and `tokenizer` (data.Tokenizer) as a Hugging Face model directory.
    `condition`: the chat template's default class (the expert class; "" for plain SFT)."""
    if model.args.vocab_size < tokenizer.vocab_size:  # more rows are fine (openchat_3.5: 32002 rows, 32001 ids)
        raise ValueError(f"model vocab_size {model.args.vocab_size} (need >= the tokenizer's {tokenizer.vocab_size})")
    tok_json = tokenizer_json(tokenizer.model_path, tokenizer.eot_id)  # checks the tokenizer before writing anything
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    shutil.copyfile(tokenizer.model_path, os.path.join(out_dir, "tokenizer.model"))
    _write_json(os.path.join(out_dir, "tokenizer.json"), tok_json)

    sp = spm.SentencePieceProcessor(model_file=tokenizer.model_path)
    bos, eos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
    special = {"bos_token": bos, "eos_token": EOT, "unk_token": unk}
    added_tokens_decoder = {
        str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, text in [(sp.unk_id(), unk), (sp.bos_id(), bos), (sp.eos_id(), eos), (tokenizer.eot_id, EOT)]
    }
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as it is (see the module docstring)
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.args.max_seq_len,
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": chat_template(condition),
        "crlft_condition": condition,  # read by sample.py as its default condition
    })
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": sp.bos_id(),
        "eos_token_id": [tokenizer.eot_id, sp.eos_id()],  # stop at the end of the turn, and at </s>
        "do_sample": True, "temperature": 0.7, "top_p": 1.0,  # OpenChat's serving defaults
    })
    return out_dir
