"""Data prepared once per job: rank 0 tokenizes every source with all cores into out_dir/data (the format of
`python data_cli.py tokenize`) while the other ranks wait, then every rank memory-maps it: memory per rank does not grow
with the world size. The same inputs reuse it, a change tokenizes again; on node-local disks each node makes its own."""

import collections
import dataclasses
import hashlib
import json
import math
import os
import time

import numpy as np
import torch.distributed as dist

import chat_readers
import chat_sources
import data
import loss_weighting
import tokenized_data


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inputs_key(cfg, tokenizer, max_seq_len):
    """A hash of everything that decides the tokenized data (a prepared dataset's name for its inputs)."""
    # a directory of `python data_cli.py tokenize`: its own meta names its inputs
    if os.path.isdir(cfg.data):
        return file_digest(os.path.join(cfg.data, "meta.json"))
    if cfg.data == "toy":
        sources = [cfg.toy_train, cfg.toy_expert_fraction, cfg.toy_error_rate, cfg.seed]
    else:
        sources = [
            [name, path, file_digest(chat_readers.source_file(path))]
            for name, path in chat_sources.parse_sources(cfg.data)
        ]
    inputs = {
        "sources": sources,
        "tokenizer": [file_digest(f) for f in tokenizer.files] + [tokenizer.added],
        "template": [tokenizer.template, data.TEMPLATE_VERSION],
        "class_weights": class_weights(cfg),
        "max_seq_len": max_seq_len,
        "class_rule": class_rule(cfg),
        "refusals": refusals(cfg),
        **{
            k: getattr(cfg, k)
            for k in (
                "sharegpt_condition",
                "use_condition",
                "only_classes",
                "skip_bad",
                "per_sequence_weights",
            )
        },
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def class_weights(cfg) -> dict[str, float] | None:
    """--class_weights as a dict; None ("") trains every class at weight 1 (a message's own weight still wins)."""
    return chat_sources.parse_class_weights(cfg.class_weights) if cfg.class_weights else None


def class_rule(cfg) -> tuple[str, list] | None:
    """(field, [(pattern, class)]) of --class_from_field and --class_map (--sharegpt_condition=from_model: the field
    "model" with the default map), or None: ShareGPT's records take --sharegpt_condition."""
    field = cfg.class_from_field or ("model" if cfg.sharegpt_condition == "from_model" else "")
    return (
        (field, chat_readers.parse_class_map(cfg.class_map or chat_readers.DEFAULT_CLASS_MAP))
        if field
        else None
    )


def refusals(cfg) -> tuple[str, ...] | None:
    """--zero_refusals' phrases (--refusal_phrases' file, else loss_weighting.REFUSAL_PHRASES), None when off."""
    return loss_weighting.refusal_phrases(cfg.zero_refusals, cfg.refusal_phrases)


def tokenize_sources(cfg, tokenizer, max_seq_len, key, directory):
    t0, stats = time.time(), collections.Counter()
    conversations = data.load_conversations(
        cfg.data,
        cfg.sharegpt_condition,
        cfg.skip_bad,
        stats,
        (cfg.toy_train, cfg.toy_expert_fraction, cfg.seed, cfg.toy_error_rate),
        class_rule(cfg),
        refusals(cfg),
    )
    if cfg.only_classes:
        keep = {c.strip() for c in cfg.only_classes.split(",")}
        conversations = [c for c in conversations if c.class_name in keep]
        if not conversations:
            raise ValueError(f"--only_classes={cfg.only_classes!r} leaves no conversation")
    if not cfg.use_condition:  # ablation: same data, same weights, no class in the prompt
        conversations = [dataclasses.replace(c, condition="") for c in conversations]
    check_own_weights(conversations, class_weights(cfg))
    chat_sources.check_class_weights(conversations, class_weights(cfg))
    dataset = data.tokenize_dataset(
        conversations,
        tokenizer,
        max_seq_len,
        class_weights(cfg),
        progress=True,
        per_sequence=cfg.per_sequence_weights,
    )
    # per class, for the expert condition (train_job.expert_condition)
    conditions = collections.defaultdict(set)
    for c in conversations:
        conditions[c.class_name].add(c.condition)
    dataset.meta.update(
        inputs_key=key,
        read=dict(stats),
        conditions={k: sorted(v) for k, v in conditions.items()},
        trained_weights=trained_weights(dataset),
    )
    dataset.save(directory)
    print(
        f"data: rank {dist.get_rank()} tokenized {len(conversations)} conversations into {directory} in "
        f"{time.time() - t0:.0f} s",
        flush=True,
    )


def check_own_weights(conversations, weights):
    """A message's own weight wins over its class's (OpenChat's JSONL carries one on every message): a class named
    in --class_weights whose assistant messages carry another weight would ignore the flag. Refused, naming both
    (an own weight 0 only leaves that message out of training: no conflict)."""
    for c in (c for c in conversations if weights and c.class_name in weights):
        w = weights[c.class_name]
        for x in (
            m["weight"] for m in c.messages if m["role"] == "assistant" and m.get("weight", 0) > 0
        ):
            if not math.isclose(x, w, rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(
                    f"--class_weights: {c.class_name}={w:g}, but {c.source or 'a conversation'} gives "
                    f"its assistant messages of class {c.class_name!r} their own weight {x:g}, which "
                    f"wins: drop {c.class_name!r} from --class_weights to train the file's weights, or "
                    "take the weights out of the file"
                )


def trained_weights(dataset) -> dict[str, list[list]]:
    """Per class, each weight its supervised tokens carry and how many tokens carry it, [[weight, tokens], ...] from
    the largest weight: what will be trained, the messages' own weights included. From the arrays, a slice of
    conversations at a time (a memory-mapped corpus is not read into memory at once)."""
    counts, step = collections.Counter(), 1 << 16
    for i in range(0, len(dataset), step):
        j = min(i + step, len(dataset))
        w = np.asarray(dataset.weights[dataset.offsets[i] : dataset.offsets[j]])
        cls = np.repeat(
            np.asarray(dataset.class_ids[i:j], np.uint64), np.diff(dataset.offsets[i : j + 1])
        )
        keys, n = np.unique(
            cls[w > 0] << np.uint64(32) | w[w > 0].view(np.uint32), return_counts=True
        )
        # key: class id, then the float32 weight's bits
        counts.update(dict(zip(keys.tolist(), n.tolist())))
    out = {name: [] for name in dataset.class_names}
    for key, n in counts.items():
        w = np.array([key & 0xFFFFFFFF], np.uint32).view(np.float32)[0]
        # str: 0.1, not 0.10000000149
        out[dataset.class_names[key >> 32]].append([float(str(w)), n])
    return {name: sorted(pairs, reverse=True) for name, pairs in out.items()}


def check_prepared_weights(cfg, dataset):
    """A prepared directory keeps the weights it was tokenized with: --class_weights and --per_sequence_weights can
    only agree with them."""
    per_sequence = dataset.meta.get("per_sequence_weights", False)
    if cfg.per_sequence_weights != per_sequence:
        raise ValueError(
            f"--per_sequence_weights={str(cfg.per_sequence_weights).lower()}, but --data={cfg.data} was "
            f"tokenized with it {'on' if per_sequence else 'off'}: drop the flag, or tokenize again "
            "(python data_cli.py tokenize --per_sequence_weights)"
        )
    for name, w in (class_weights(cfg) or {}).items():
        found = [x for x, _ in dataset.meta["trained_weights"].get(name, [])]
        # its tokens carry weight / reply length: the class weights it was made with say more
        if per_sequence:
            found = [(dataset.meta.get("class_weights") or {}).get(name, 1.0)]
        if any(not math.isclose(x, w, rel_tol=1e-6, abs_tol=1e-12) for x in found):
            raise ValueError(
                f"--class_weights: {name}={w:g}, but --data={cfg.data} was tokenized with weight "
                f"{', '.join(f'{x:g}' for x in found)} for class {name!r}, and prepared data keeps its "
                f"weights: drop {name!r} from --class_weights, or tokenize again with --class-weights"
            )


def class_rewards(dataset) -> dict[str, float]:
    """Each class's mean weight per supervised reply with --per_sequence_weights (a reply's tokens sum to its
    weight), else per supervised token: the weight a class was trained with, for choosing the expert."""
    per = "supervised_replies" if dataset.meta.get("per_sequence_weights") else "supervised_tokens"
    return {
        name: c["weight_sum"] / max(c.get(per, 0), 1)
        for name, c in dataset.meta["summary"]["classes"].items()
    }


def check_context(cfg, context):
    """Before tokenizing: a conversation as long as the context must fit one bin of --batch_tokens."""
    if context > cfg.batch_tokens:
        raise ValueError(
            f"--max_seq_len={context} (the context; 0 = the model's) is more than --batch_tokens="
            f"{cfg.batch_tokens}: a conversation must fit one bin, so --batch_tokens must be >= "
            "--max_seq_len: raise --batch_tokens or lower --max_seq_len"
        )


def load_prepared(directory, key):
    """The dataset in `directory` if it was prepared from the inputs that `key` names, else None."""
    try:
        dataset = tokenized_data.TokenizedDataset.load(directory)
    except chat_readers.DataError:
        return None
    return dataset if dataset.meta.get("inputs_key") == key else None


def on_rank0(fn, group):
    """fn() on rank 0 only, its result (or its error) on every rank: the others wait meanwhile, in `group`
    (a CPU group with a long timeout: tokenizing a large corpus outlasts the default one)."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        # told to every rank, or the others would wait for the group's timeout (6 hours)
        except Exception as e:
            box[1] = data.one_line(
                e if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            )
    dist.broadcast_object_list(box, src=0, group=group)
    if box[1] is not None:
        raise ValueError(box[1])
    return box[0]


def prepare_data(cfg, tokenizer, max_seq_len, key, group):
    """(dataset, whether this rank wrote out_dir/data). --data may be a tokenized directory itself. The dataset's
    meta["trained_weights"] says what will be trained (the start-up summary prints it)."""
    if os.path.isdir(cfg.data):
        dataset = tokenized_data.TokenizedDataset.load(cfg.data)
        made_with = [dataset.meta.get(k) for k in ("eot_id", "vocab_size", "template")]
        if made_with != [tokenizer.eot_id, tokenizer.vocab_size, tokenizer.template]:
            raise ValueError(
                f"--data={cfg.data}: tokenized with {dataset.meta.get('tokenizer')} and template "
                f"{dataset.meta.get('template')!r}, not with this run's {tokenizer.path} and "
                f"{tokenizer.template!r}"
            )
        if dataset.lengths.max() > min(max_seq_len, cfg.batch_tokens):
            raise ValueError(
                f"--data={cfg.data}: conversations of up to {dataset.lengths.max()} tokens, more than the "
                f"context ({max_seq_len}) or --batch_tokens={cfg.batch_tokens}: tokenize it again with "
                f"--max_seq_len, or raise --batch_tokens"
            )
        # `python data_cli.py tokenize` does not count them: once, rank 0
        if "trained_weights" not in dataset.meta:
            dataset.meta["trained_weights"] = on_rank0(lambda: trained_weights(dataset), group)
        check_prepared_weights(cfg, dataset)
        return dataset, False
    directory = os.path.join(cfg.out_dir, "data")

    def prepare():
        if load_prepared(directory, key) is None:
            tokenize_sources(cfg, tokenizer, max_seq_len, key, directory)
            return True
        return False

    tokenized = on_rank0(prepare, group)
    if not tokenized and dist.get_rank() == 0:
        print(f"data: reusing {directory} (prepared earlier from the same inputs)", flush=True)
    if dist.get_rank() != 0:
        # node-local disks: a copy per node
        tokenized = int(os.environ.get("LOCAL_RANK", 0)) == 0 and prepare()
    dist.barrier(group=group)
    return load_prepared(directory, key), tokenized
