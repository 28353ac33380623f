"""`export_hf`: a trained model as a Hugging Face directory that transformers and vLLM serve as it is, with its
tokenizer and a Jinja chat template of its template (data.TEMPLATES), condition included.

A tokenizer.json tokenizer is exported as its files are, plus the tokens added for the template. A sentencepiece
tokenizer.model gets our own tokenizer.json, because transformers 5 cannot convert tokenizer.model without protobuf
and its LlamaTokenizer's Metaspace would tokenize leading spaces unlike sentencepiece and our training data. It mirrors
sentencepiece's BPE: a Prepend normalizer (the dummy prefix, per text between special tokens), spaces as "▁", merges
ranked by the score of the piece they make."""

import json
import os
import shutil

import sentencepiece as spm

import data
from chat_readers import EXPERT_CONDITION
from hf_format import write_json
from tokenizing import SentencePieceTokenizer


def chat_template(tokenizer, condition):
    """The tokenizer's template (data.TEMPLATES) in Jinja: its text, whose ids are data.encode_prompt's; `condition`
    per request (vLLM: chat_template_kwargs), else the trained one. A tokenizer with a word-start marker
    (sentencepiece's "▁") gets a space before each content, the marker our pieces start with. The rendered text is
    tokenized whole, our pieces one by one: the known differences are the README's (Export), pinned down in
    tests/test_tokenizer_json.py. A tokenizer without pre-tokenizer could merge across a header's ": " (we checked
    a Gemma-like one, whose words start with "▁", not Gemma's own files)."""
    t = data.TEMPLATES[tokenizer.template]
    literal = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731 (a Jinja string literal)
    before, after = map(literal, t.head("{role}").split("{role}"))
    space = literal(" " if tokenizer.word_start or t.header.endswith(" ") else "")
    end = literal(t.end + t.after)
    system = f"{literal(t.head('System'))} ~ {space} ~ " if t.system_role else ""
    bos = literal(tokenizer.piece(tokenizer.bos_id) if tokenizer.bos_id is not None else "")
    return (
        "{% set condition = condition if condition is defined and condition is not none else "
        f"{literal(condition)} %}}"
        f"{{{{ {bos} }}}}{{% for message in messages %}}{{% if message['role'] == 'system' %}}"
        f"{{{{ {system}message['content'] ~ {end} }}}}{{% else %}}"
        f"{{{{ {before} ~ ((condition ~ ' ' ~ (message['role'] | title)) | trim) ~ {after} ~ {space} ~ "
        f"message['content'] ~ {end} }}}}{{% endif %}}{{% endfor %}}{{% if add_generation_prompt %}}"
        f"{{{{ {before} ~ ((condition ~ ' Assistant') | trim) ~ {after} }}}}{{% endif %}}"
    )


def _protobuf_fields(buf):
    """{field number: last value} of one protobuf message, varints as int, the rest as bytes (no protobuf needed)."""

    def varint(i):
        value, shift = 0, 0
        while buf[i] & 0x80:  # 7 bits a byte, low first; the last byte has the top bit clear
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
        return value | buf[i] << shift, i + 1

    out, i = {}, 0
    while i < len(buf):
        key, i = varint(i)
        wire_type = key & 7
        if wire_type == 0:
            out[key >> 3], i = varint(i)
            continue
        # 8 or 4 bytes (no groups here)
        size, i = varint(i) if wire_type == 2 else ({1: 8, 5: 4}[wire_type], i)
        out[key >> 3], i = buf[i : i + size], i + size
    return out


def sentencepiece_settings(model_path):
    """The model type and normalizer settings of a sentencepiece model file (sentencepiece_model.proto numbers)."""
    with open(model_path, "rb") as f:
        model = _protobuf_fields(f.read())
    trainer, normalizer = _protobuf_fields(model.get(2, b"")), _protobuf_fields(model.get(3, b""))
    return {
        "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(
            trainer.get(3, 1), "unknown"
        ),
        "byte_fallback": bool(trainer.get(35, 0)),
        "normalizer": normalizer.get(1, b"nmt_nfkc").decode(),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def bpe_merges(sp):
    """Merges, best first, for tokenizers' BPE to split as sentencepiece's BPE does (it merges the adjacent pair that
    makes the highest-scoring piece): every split of a normal piece into two normal pieces, ranked by that score. On
    ties sentencepiece merges the leftmost pair, tokenizers by rank: Mistral's runs of spaces, see _space_run_merges."""
    normal = {
        sp.id_to_piece(i): i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    score = {p: sp.get_score(i) for p, i in normal.items()}
    runs = sorted(len(p) for p in normal if set(p) == {"▁"})
    tied_runs = len(runs) > 2 and len({score["▁" * k] for k in runs if k > 1}) == 1
    # (-score of the merged piece, rank among equal scores, left, right)
    merges = [
        (-score[p], 0, p[:k], p[k:])
        for p in normal
        if not (tied_runs and set(p) == {"▁"})
        for k in range(1, len(p))
        if p[:k] in normal and p[k:] in normal
    ]
    if tied_runs:
        merges += [
            (-score["▁" * (a + b)], rank, "▁" * a, "▁" * b)
            for rank, (a, b) in enumerate(_space_run_merges(set(runs)))
        ]
    merges.sort(key=lambda m: (m[0], m[1], normal[m[2]], normal[m[3]]))
    return [[left, right] for _, _, left, right in merges]


def _space_run_merges(lengths):
    """Ranked (left, right) lengths for runs of "▁" whose pieces tie (Mistral's "▁" * k, k = 2..14 and 16, all -1e9:
    merged last, when a run stands alone). sentencepiece grows a run from the left: n spaces become 16s, then the rest
    in one piece (15: 14 + 1). tokenizers' BPE does the same with these ranks: first equal halves 1+1 .. 8+8 (pairing
    from the left: 16s, then the rest's binary digits, largest first), then the digits joined from the left (8+4, +2,
    +1). tests/test_hf.py checks every run length against sentencepiece."""
    merges, half = [], 1
    while 2 * half in lengths:
        merges.append((half, half))
        half *= 2
    digit = half // 2
    while digit >= 1:
        merges += [
            (left, digit)
            for left in range(2 * digit, half, 2 * digit)
            if left in lengths and left + digit in lengths
        ]
        digit //= 2
    return merges


def _special(text):
    return dict(
        content=text, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )


def tokenizer_json(model_path, added):
    """A tokenizers-library tokenizer.json equivalent to the sentencepiece model plus the special tokens `added`
    ({text: id}, the ids right after the pieces: openchat_3.5's <|end_of_turn|> = 32000)."""
    # its own short error for a file that is not a model
    sp = spm.SentencePieceProcessor(model_file=model_path)
    settings = sentencepiece_settings(model_path)
    # bytes (~240 KB for nmt_nfkc): only its size in messages
    charsmap = len(settings.pop("precompiled_charsmap"))
    settings["normalizer"] += (
        f" with a {charsmap / 1e3:.0f} KB precompiled_charsmap" if charsmap else ""
    )
    wanted = dict(
        model_type="bpe",
        normalizer="identity",
        remove_extra_whitespaces=False,
        escape_whitespaces=True,
    )
    bad = [f"{k} {settings[k]} (need {v})" for k, v in wanted.items() if settings[k] != v]
    if bad:
        raise ValueError(
            f"{model_path}: tokenizer.json cannot reproduce this sentencepiece model: {'; '.join(bad)}"
        )
    n_pieces = sp.get_piece_size()
    for k, (text, i) in enumerate(sorted(added.items(), key=lambda a: a[1])):
        if i != n_pieces + k:
            raise ValueError(
                f"{model_path}: {text} id {i} (need {n_pieces + k}, the id right after the pieces)"
            )
    if min(sp.bos_id(), sp.eos_id()) < 0:
        raise ValueError(
            f"{model_path}: bos_id {sp.bos_id()}, eos_id {sp.eos_id()} (need both pieces)"
        )
    pieces = [sp.id_to_piece(i) for i in range(n_pieces)]
    specials = [(i, pieces[i]) for i in range(n_pieces) if sp.is_control(i) or sp.is_unknown(i)]
    specials += sorted((i, text) for text, i in added.items())
    prefix = [{"type": "Prepend", "prepend": "▁"}] if settings["add_dummy_prefix"] else []
    normalizers = prefix + [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else []),
    ]
    bos_piece = pieces[sp.bos_id()]
    bos, text = (
        {"SpecialToken": {"id": bos_piece, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, **_special(t)} for i, t in specials],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        # tokenizer(text) starts with BOS, like sentencepiece-based LLaMA tokenizers
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, text],
            "pair": [bos, text, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                bos_piece: {"id": bos_piece, "ids": [sp.bos_id()], "tokens": [bos_piece]}
            },
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[sp.unk_id()],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": settings["byte_fallback"],
            "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": bpe_merges(sp),
        },
    }


def export_hf(model, tokenizer, out_dir, condition=EXPERT_CONDITION):
    """Write `model` (a model.Transformer: its save_pretrained and args) and `tokenizer` (with its template:
    data.use_template) as a Hugging Face model directory. `condition`: the template's default class (the expert's; ""
    for plain SFT). generation_config.json stops at the template's end of turn and the tokenizer's end of text."""
    # more rows are fine (openchat_3.5: 32002 rows, 32001 ids)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model.args.vocab_size} (need >= the tokenizer's {tokenizer.vocab_size})"
        )
    sentencepiece = isinstance(tokenizer, SentencePieceTokenizer)
    # checks the tokenizer
    files = (_sentencepiece_files if sentencepiece else _json_files)(tokenizer)
    files["tokenizer_config.json"].update(
        eos_token=data.TEMPLATES[tokenizer.template].end,
        model_max_length=model.args.max_seq_len,
        chat_template=chat_template(tokenizer, condition),
        # read by sample.py as its defaults
        crlft_template=tokenizer.template,
        crlft_condition=condition,
    )
    stops = [tokenizer.eot_id] + [tokenizer.eos_id] * (
        tokenizer.eos_id not in (None, tokenizer.eot_id)
    )
    files["generation_config.json"] = {  # OpenChat's serving defaults
        **({"bos_token_id": tokenizer.bos_id} if tokenizer.bos_id is not None else {}),
        "eos_token_id": stops,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 1.0,
    }
    model.save_pretrained(out_dir)  # makes out_dir
    for name, content in files.items():
        write_json(os.path.join(out_dir, name), content)
    if sentencepiece:
        shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
    return out_dir


def _json_files(tokenizer):
    """The tokenizer's tokenizer.json and tokenizer_config.json, with the tokens added for the template."""
    with open(tokenizer.path, encoding="utf-8") as f:
        tok_json = json.load(f)
    tok_json["added_tokens"] += [{"id": i, **_special(text)} for text, i in tokenizer.added.items()]
    # no class: tokenizer.json as it is
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.config}
    config["added_tokens_decoder"] = {
        **config.get("added_tokens_decoder", {}),
        **{str(i): _special(text) for text, i in tokenizer.added.items()},
    }
    return {"tokenizer.json": tok_json, "tokenizer_config.json": config}


def _sentencepiece_files(tokenizer):
    """Our tokenizer.json (see the module docstring), its special_tokens_map.json and tokenizer_config.json."""
    sp = tokenizer.sp
    added = {t: tokenizer.special_id(t) for t in data.TEMPLATES[tokenizer.template].specials()}
    added = {t: i for t, i in added.items() if i >= sp.get_piece_size()}
    bos, eos, unk = (
        sp.id_to_piece(sp.bos_id()),
        sp.id_to_piece(sp.eos_id()),
        sp.id_to_piece(sp.unk_id()),
    )
    special = {
        "bos_token": bos,
        "eos_token": data.TEMPLATES[tokenizer.template].end,
        "unk_token": unk,
    }
    return {
        "tokenizer.json": tokenizer_json(tokenizer.path, added),
        "special_tokens_map.json": special,
        "tokenizer_config.json": {
            # load tokenizer.json as it is (the module docstring)
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): _special(text)
                for i, text in [
                    (sp.unk_id(), unk),
                    (sp.bos_id(), bos),
                    (sp.eos_id(), eos),
                    *((i, t) for t, i in added.items()),
                ]
            },
        },
    }
