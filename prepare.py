"""Data prepared once per job: rank 0 tokenizes every source with all cores into out_dir/data (the format of
`python data.py tokenize`) while the other ranks wait, then every rank memory-maps it: memory per rank does not grow
with the world size. The same inputs reuse it, a change tokenizes again; on node-local disks each node makes its own."""
import collections
import dataclasses
import hashlib
import json
import os
import time

import torch.distributed as dist

import data
import chat_readers


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inputs_key(cfg, tokenizer, max_seq_len):
    """A hash of everything that decides the tokenized data (a prepared dataset's name for its inputs)."""
    if os.path.isdir(cfg.data):  # a directory of `python data.py tokenize`: its own meta names its inputs
        return file_digest(os.path.join(cfg.data, "meta.json"))
    if cfg.data == "toy":
        sources = [cfg.toy_train, cfg.toy_expert_fraction, cfg.toy_error_rate, cfg.seed]
    else:
        sources = [[name, path, file_digest(chat_readers.source_file(path))]
                   for name, path in chat_readers.parse_sources(cfg.data)]
    inputs = {"sources": sources, "tokenizer": [file_digest(tokenizer.model_path), tokenizer.eot_id],
              "template": data.TEMPLATE_VERSION, "class_weights": class_weights(cfg),
              "max_seq_len": max_seq_len,
              **{k: getattr(cfg, k) for k in ("sharegpt_condition", "use_condition", "only_classes", "skip_bad")}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def class_weights(cfg) -> dict[str, float] | None:
    """--class_weights as a dict; None ("") trains every class at weight 1 (a message's own weight still wins)."""
    return data.parse_class_weights(cfg.class_weights) if cfg.class_weights else None


def tokenize_sources(cfg, tokenizer, max_seq_len, key, directory):
    t0, stats = time.time(), collections.Counter()
    conversations = data.load_conversations(cfg.data, cfg.sharegpt_condition, cfg.skip_bad, stats,
                                            toy=(cfg.toy_train, cfg.toy_expert_fraction, cfg.seed, cfg.toy_error_rate))
    if cfg.only_classes:
        keep = {c.strip() for c in cfg.only_classes.split(",")}
        conversations = [c for c in conversations if c.class_name in keep]
        if not conversations:
            raise ValueError(f"--only_classes={cfg.only_classes!r} leaves no conversation")
    if not cfg.use_condition:  # ablation: same data, same weights, no class in the prompt
        conversations = [dataclasses.replace(c, condition="") for c in conversations]
    dataset = data.tokenize_dataset(conversations, tokenizer, max_seq_len, class_weights(cfg), progress=True)
    conditions = collections.defaultdict(set)  # per class, for the expert condition (train.expert_condition)
    for c in conversations:
        conditions[c.class_name].add(c.condition)
    dataset.meta.update(inputs_key=key, read=dict(stats), conditions={k: sorted(v) for k, v in conditions.items()})
    dataset.save(directory)
    print(f"data: rank {dist.get_rank()} tokenized {len(conversations)} conversations into {directory} in "
          f"{time.time() - t0:.0f} s", flush=True)


def load_prepared(directory, key):
    """The dataset in `directory` if it was prepared from the inputs that `key` names, else None."""
    try:
        dataset = data.TokenizedDataset.load(directory)
    except data.DataError:
        return None
    return dataset if dataset.meta.get("inputs_key") == key else None


def on_rank0(fn, group):
    """fn() on rank 0 only, its result (or its error) on every rank: the others wait meanwhile, in `group`
    (a CPU group with a long timeout: tokenizing a large corpus outlasts the default one)."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # told to every rank, or the others would wait for the group's timeout (6 hours)
            box[1] = data.one_line(e if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=group)
    if box[1] is not None:
        raise ValueError(box[1])
    return box[0]


def prepare_data(cfg, tokenizer, max_seq_len, key, group):
    """(dataset, whether this run tokenized it). --data may be a tokenized directory itself."""
    if os.path.isdir(cfg.data):
        dataset = data.TokenizedDataset.load(cfg.data)
        if (dataset.meta.get("eot_id"), dataset.meta.get("vocab_size")) != (tokenizer.eot_id, tokenizer.vocab_size):
            raise ValueError(f"--data={cfg.data}: tokenized with {dataset.meta.get('tokenizer')}, not with this "
                             f"run's {tokenizer.model_path}")
        if dataset.lengths.max() > max_seq_len:
            raise ValueError(f"--data={cfg.data}: conversations of up to {dataset.lengths.max()} tokens, more than "
                             f"max_seq_len={max_seq_len}: tokenize it again with --max-seq-len")
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
    if dist.get_rank() != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        prepare()  # node-local disks: a copy for this node
    dist.barrier(group=group)
    return load_prepared(directory, key), tokenized
