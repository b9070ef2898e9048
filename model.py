"""The policy: load Qwen2.5-VL (a local folder) or build the tiny offline model; batched sampling of
K completions per question; teacher-forced per-token log-probs that match the sampler.

Used by train.py, eval.py and bench.py:

    model, processor = load("tiny")                      # or load("/models/Qwen2.5-VL-3B-Instruct")
    ro = generate(model, processor, questions, images, num_samples=8, max_new_tokens=2048)
    logp = token_logprobs(model, ro)                     # [B*K, T], same distribution as the sampler
    save(model, processor, "runs/x/final")

Nothing here is fetched from the network and nothing uses trust_remote_code. Works without
torchvision: Qwen2_5_VLProcessor needs a video processor (torchvision), so ImageProcessor below is an
image-only subclass using Qwen2VLImageProcessorPil (docs/deviations.md, "Model and training loop").
"""
import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import (AutoProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data   # the question templates, for the tiny tokenizer's corpus (data imports no model code)

# Qwen2.5's special tokens, in Qwen's id order after the ordinary vocabulary. The tiny tokenizer
# carries the same strings so the same chat template and processor code serve both models.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Sampling one of these breaks the next forward ("Image features and image tokens do not match").
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                 "<|object_ref_start|>", "<|object_ref_end|>"]
END_TOKENS = ["<|im_end|>", "<|endoftext|>"]

# Qwen2.5-VL's chat template, reduced to images + text (no video, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny model's image budget: 28x28-pixel cells after the 2x2 merge, 4..16 image tokens per map, so
# a CPU step stays fast. Real models keep their own processor settings unless --max-pixels is given.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112

# One chunk of the log-prob path holds at most this many bytes of fp32 logits (tokens x vocab).
# 256 MiB is ~440 tokens of Qwen's 151,936-word vocabulary; the chunk's backward peaks at about
# three such tensors (logits, log-softmax, its gradient). The tiny model fits in one chunk.
LOGPROB_CHUNK_BYTES = 256 * 2**20


class ImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video slot (that slot needs torchvision).

    Must be registered with AutoProcessor, or AutoProcessor.from_pretrained silently returns only
    the tokenizer.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        # Build the parts by hand: a real checkpoint names Qwen2VLImageProcessor (torchvision) and
        # Qwen2_5_VLProcessor (video) in its configs; both are replaced here.
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        template = getattr(tokenizer, "chat_template", None)
        for name in ("chat_template.jinja", "chat_template.json"):
            file = os.path.join(path, name)
            if template is None and os.path.exists(file):
                import json
                with open(file, encoding="utf-8") as f:
                    template = f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
        return cls(image_processor, tokenizer, chat_template=template or CHAT_TEMPLATE)


AutoProcessor.register(Qwen2_5_VLConfig, ImageProcessor, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# The tiny model: random weights, tokenizer trained offline on a fixed corpus.

def _tiny_corpus():
    """A fixed, deterministic corpus for the tiny BPE tokenizer.

    The question templates (data.py's, so the prompts tokenize compactly) and the answer formats of
    every question type are in it many times, so BPE learns "\\boxed{yes}", "Route Name: " and the
    like as single tokens. A random tiny policy then emits a well-formed answer now and then, which
    is what gives GRPO any signal at all (a strict multi-token reward gives a random model nothing).
    Real Qwen has its own tokenizer; this choice only shapes the CPU quick start.
    """
    answers = ["yes", "no", "A", "B", "C", "D"] + [str(i) for i in range(21)]
    boxed = [f"\\boxed{{{a}}}" for a in answers]
    route = ["Route Name: Line {i}\nDeparture Stop: Stop {j}\nArrival Stop: Stop {k}\n"
             "Number of Via Stops: {n}\n--\n".format(i=i, j=j, k=k, n=(i + j) % 7)
             for i in range(1, 10) for j in range(1, 6) for k in range(1, 4)]
    # the question wording itself, from data.py's templates (App. A.2; planning: ours)
    questions = [t.format(city="City", s1="Stop 1", s2="Stop 2", line="Line 1", o0=1, o1=2, o2=3, o3=4)
                 for t in (*data.PLUS_TEMPLATES.values(), *data.PLANNING_TEMPLATES.values())]
    return questions * 4 + boxed * 40 + route * 2


def build_tokenizer(vocab_size=640):
    """Byte-level BPE trained on _tiny_corpus(): deterministic, offline, covers any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    # No regex split, so merges may cross spaces and braces ("\boxed{yes}" becomes one token).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    # padding_side is saved only when given to the constructor (transformers 5).
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_tiny(seed=0):
    """The embedded default policy: a ~1.4 M-parameter Qwen2.5-VL with random weights."""
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64
    heads, hidden = 4, 128
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=8192,
            # M-RoPE sections (t, h, w) must sum to head_dim / 2 = 16.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden,
            fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[t] for t in END_TOKENS], pad_token_id=ids["<|endoftext|>"])
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = ImageProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


# ---------------------------------------------------------------------------------------------
# Processes and devices.

def init_distributed(threads=None):
    """(rank, world_size, device) for this process; torchrun sets the environment, plain python
    runs one process. GPU: cuda:LOCAL_RANK and nccl. CPU: gloo, and the ranks on one host share
    its cores; `threads`, else OMP_NUM_THREADS, overrides the per-rank thread count."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        device = "cpu"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        kwargs = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one TCPStore across `--max-restarts` attempts and env:// adds no
            # per-attempt prefix, so a restarted rank can read a dead peer's address (gloo:
            # "connectFullMesh failed ... Connection refused", 3 restarts in 4 here; NCCL:
            # pytorch/pytorch#167288). Each attempt gets keys of its own.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            kwargs = dict(store=dist.PrefixStore(f"attempt_{attempt}/", store), rank=rank, world_size=world)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", **kwargs)
    return rank, world, device


def close_distributed():
    """Tear the process group down, after a barrier. Without it an exit could deadlock (seen here
    on torch 2.13 CPU, gloo, about one run in three): gloo's worker thread frees the last
    collective's Python tensors, which needs the GIL, while the DDP reducer's and process group's
    destructors hold the GIL and join that thread. The barrier runs after the earlier collective
    in the worker's queue, so that tensor is gone once it returns. Drop DDP wrappers first."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Loading and saving.

def load(name_or_path, *, device="cpu", dtype=None, max_pixels=None, attn_implementation=None):
    """("tiny" | local Qwen2.5-VL folder) -> (model, processor). No network, no remote code.

    dtype None keeps what from_pretrained gives; train.py passes float32 (master weights)."""
    if name_or_path == "tiny":
        model, processor = build_tiny()
    else:
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"--model {name_or_path!r}: not 'tiny' and not a local folder "
                                    "(nothing is downloaded; point at a Qwen2.5-VL checkpoint)")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path, local_files_only=True, **kwargs)
        processor = ImageProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"
    set_max_pixels(processor, max_pixels)
    if dtype is not None:
        model.to(dtype)
    return model.to(device), processor


def set_max_pixels(processor, max_pixels):
    """The processor's image budget (None: keep its own)."""
    if max_pixels:
        size = processor.image_processor.size
        size["longest_edge"] = int(max_pixels)
        size["shortest_edge"] = min(size["shortest_edge"], int(max_pixels))


def prepare_for_training(model, *, freeze_vision=False, grad_checkpointing=False):
    """Training mode, optionally with the vision tower frozen and activation checkpointing.
    Checkpointing is the non-reentrant kind (the reentrant one needs inputs that require grad);
    the config's KV cache is switched off for training forwards, while generate() asks for it."""
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()


def autocast(device, bf16):
    """bf16 compute over fp32 master weights (at lr 1e-6 bf16 weights would not move), or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def vision_touch(model):
    """0 · Σ vision parameters, to add to the loss of a micro-batch without images: keeps DDP in
    step (the unused vision tower would miss the all-reduce, and ranks diverge
    or hang). 0.0 when the tower is frozen."""
    params = [p for p in _unwrap(model).model.visual.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0 if params else 0.0


def save(model, processor, out_dir):
    """save_pretrained of model (safetensors) and processor; reload with load(out_dir)."""
    model = getattr(model, "module", model)          # unwrap DDP
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Sampling and log-probs.

@dataclass
class Rollout:
    """K completions for each of B questions, question-major (row q*K + k)."""
    texts: list                     # decoded completions, without the end-of-turn token
    truncated: list                 # True when max_new_tokens ran out before end-of-turn
    lengths: list                   # completion tokens, end-of-turn included
    num_samples: int
    input_ids: torch.Tensor         # [B*K, P+T] left-padded prompt + right-padded completion
    attention_mask: torch.Tensor    # [B*K, P+T]
    mm_token_type_ids: torch.Tensor  # [B*K, P+T] 1 on image tokens (M-RoPE needs it)
    completion_mask: torch.Tensor   # [B*K, T] float, 1 up to and including end-of-turn
    prompt_len: int                 # P
    pixel_values: torch.Tensor = None   # one entry per question that has an image (not per sample)
    image_grid_thw: torch.Tensor = None
    has_image: list = field(default_factory=list)   # per question
    suppress_ids: list = field(default_factory=list)
    sample_logprobs: torch.Tensor = None   # only with generate(..., with_logprobs=True)

    @property
    def completion_ids(self):
        return self.input_ids[:, self.prompt_len:]


def build_prompts(processor, questions):
    """One user turn per question: the image, then the question text (§5.1 uses the plain question)."""
    out = []
    for q, has_image in questions:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": q}]
        out.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                 tokenize=False, add_generation_prompt=True))
    return out


def encode(processor, questions, images):
    """Tokenise prompts + preprocess images (None = no image for that question), left-padded."""
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    has_image = [im is not None for im in images]
    prompts = build_prompts(processor, list(zip(questions, has_image)))
    ims = [im.convert("RGB") if im.mode != "RGB" else im for im in images if im is not None]
    processor.tokenizer.padding_side = "left"
    enc = processor(text=prompts, images=ims or None, return_tensors="pt", padding=True)
    if "mm_token_type_ids" not in enc:
        enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return enc, has_image


def _special_ids(processor, names):
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def _unwrap(model):
    # DDP keeps the model in .module; FSDP2 (fully_shard) modifies it in place.
    return getattr(model, "module", model)


def shared_prefill(net, enc, k):
    """Prefill each of the B prompts once (minus its last token) and repeat its KV cache and M-RoPE
    offsets K times: (cache, the B*K input rows) from which HF samples one sequence per row.
    The first half of _shared_prefill_generate; bench.py --plan traces it on its own."""
    net.model.rope_deltas = None
    # keep the last prompt token uncached: generate needs one input token to continue from
    head = {key: (v[:, :-1] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
            for key, v in enc.items()}
    cache = net(**head, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(k)
    net.model.rope_deltas = net.model.rope_deltas.repeat_interleave(k, dim=0)
    rows = {key: enc[key].repeat_interleave(k, dim=0)
            for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in enc}
    return cache, rows


def _shared_prefill_generate(net, enc, gen):
    """HF generate with num_return_sequences=K, but the prompt is prefilled once per question.

    HF expands the inputs K times before the prefill, so the language model reads every prompt
    (hundreds of image tokens) K times. Here the B prompts minus their last token are prefilled
    once, the KV cache and M-RoPE offsets are repeated K times, and HF samples one sequence per row
    from there. Same distribution (token_logprobs matches the sampler to <= 1e-5, tested); only the
    random stream differs. Sampling phase 0.52 -> 0.32 s on the CPU quick start (bench.py,
    docs/bench.md). Text-only batches take HF's own path: a prefill without an image would use 1-D
    positions that ignore the left padding.
    """
    cache, rows = shared_prefill(net, enc, gen.num_return_sequences)
    one = GenerationConfig.from_dict({**gen.to_dict(), "num_return_sequences": 1})
    return net.generate(**rows, cache=cache, generation_config=one)


def sampling_config(processor, *, num_samples, max_new_tokens, greedy=False, temperature=1.0,
                    with_logprobs=False):
    """generate()'s GenerationConfig (see there)."""
    suppress = _special_ids(processor, VISION_TOKENS)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
        num_return_sequences=1 if greedy else num_samples,
        temperature=None if greedy else temperature, top_k=None if greedy else 0,
        top_p=None if greedy else 1.0, min_p=None,
        repetition_penalty=1.0, suppress_tokens=suppress,
        eos_token_id=_special_ids(processor, END_TOKENS), pad_token_id=processor.tokenizer.pad_token_id,
        use_cache=True, output_scores=with_logprobs,
        return_dict_in_generate=with_logprobs)


@torch.no_grad()
def generate(model, processor, questions, images, *, num_samples=1, max_new_tokens=256,
             greedy=False, temperature=1.0, with_logprobs=False):
    """Sample num_samples completions per question. Returns a Rollout (question-major).

    with_logprobs=True also keeps the sampler's own log-probs (rollout.sample_logprobs, [B*K, T]),
    what token_logprobs must reproduce (the agreement test).

    Deviation: plain temperature sampling (top_k=0, top_p=1) or plain greedy, the checkpoint's
    generation_config ignored, vision special tokens suppressed (docs/deviations.md).
    """
    net = _unwrap(model)
    device = next(net.parameters()).device
    enc, has_image = encode(processor, questions, images)
    enc = {k: v.to(device) for k, v in enc.items()}
    end_ids = _special_ids(processor, END_TOKENS)
    pad_id = processor.tokenizer.pad_token_id
    gen = sampling_config(processor, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          greedy=greedy, temperature=temperature, with_logprobs=with_logprobs)
    # Each image is preprocessed and encoded once (transformers 5 runs the vision tower before the
    # prefill); _shared_prefill also runs each prompt through the language model once, not K times.
    # token_logprobs likewise encodes each image once and shares the features among its K samples.
    was_training = net.training
    net.eval()
    try:
        if gen.num_return_sequences > 1 and enc.get("image_grid_thw") is not None:
            out = _shared_prefill_generate(net, enc, gen)
        else:
            out = net.generate(**enc, generation_config=gen)
    finally:
        net.train(was_training)
    sequences = out if torch.is_tensor(out) else out.sequences
    k = num_samples
    if greedy and k > 1:
        sequences = sequences.repeat_interleave(k, dim=0)
    P = enc["input_ids"].shape[1]
    completion = sequences[:, P:]
    is_end = torch.isin(completion, torch.tensor(end_ids, device=completion.device))
    T = completion.shape[1]
    ended = is_end.any(dim=1)
    first_end = torch.where(ended, is_end.float().argmax(dim=1), torch.full_like(ended, T, dtype=torch.long))
    lengths = torch.where(ended, first_end + 1, torch.full_like(first_end, T))
    completion_mask = (torch.arange(T, device=completion.device)[None, :] < lengths[:, None]).float()
    completion = torch.where(completion_mask.bool(), completion, torch.full_like(completion, pad_id))
    texts = processor.tokenizer.batch_decode(
        [row[: int(n)].tolist() for row, n in zip(completion, torch.where(ended, first_end, lengths))],
        skip_special_tokens=True)
    rep = lambda t: t.repeat_interleave(k, dim=0)
    input_ids = torch.cat([rep(enc["input_ids"]), completion], dim=1)
    attention_mask = torch.cat([rep(enc["attention_mask"]), completion_mask.long()], dim=1)
    mm = torch.cat([rep(enc["mm_token_type_ids"]), torch.zeros_like(completion)], dim=1)
    sample_logprobs = None
    if with_logprobs:
        scores = torch.stack(out.scores, dim=1).float()             # [B*K, T, V] after processors
        step = k if greedy else 1                                    # greedy rows were repeated
        sample_logprobs = torch.gather(F.log_softmax(scores, dim=-1), 2,
                                       completion[::step].unsqueeze(-1)).squeeze(-1)
        sample_logprobs = sample_logprobs.repeat_interleave(step, dim=0) * completion_mask
    return Rollout(texts=texts, sample_logprobs=sample_logprobs, truncated=(~ended).tolist(), lengths=lengths.tolist(),
                   num_samples=k, input_ids=input_ids, attention_mask=attention_mask,
                   mm_token_type_ids=mm, completion_mask=completion_mask, prompt_len=P,
                   pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
                   has_image=has_image, suppress_ids=list(gen.suppress_tokens))


def select(rollout, rows):
    """The sub-rollout of the given sample rows, for micro-batching the update. Rows are
    question-major and must cover each of their questions equally (whole questions, or the same
    number of samples of each): the result has that many samples per question, and each question's
    image comes along once, so token_logprobs runs it through the vision tower once per micro-batch
    and shares its features among that question's samples there."""
    k, rows = rollout.num_samples, [int(r) for r in rows]
    qs = list(dict.fromkeys(r // k for r in rows))
    groups = [[r for r in rows if r // k == q] for q in qs]
    per_q = len(groups[0])
    if rows != sum(groups, []) or any(g != list(range(g[0], g[0] + per_q)) for g in groups):
        raise ValueError(f"select: rows {rows} do not cover their questions equally (K={k})")
    pix = grid = None
    if rollout.image_grid_thw is not None and any(rollout.has_image[q] for q in qs):
        # image i of the batch belongs to the i-th question that has an image
        img_index = [sum(rollout.has_image[:q]) for q in range(len(rollout.has_image))]
        patches = rollout.image_grid_thw.prod(dim=1)
        starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        keep = [img_index[q] for q in qs if rollout.has_image[q]]
        pix = torch.cat([rollout.pixel_values[starts[i]:starts[i + 1]] for i in keep])
        grid = rollout.image_grid_thw[keep]
    idx = torch.tensor(rows, dtype=torch.long)
    # drop columns that are padding in every kept row so micro-batches stay short
    am = rollout.attention_mask[idx]
    first = int(am[:, :rollout.prompt_len].any(dim=0).float().argmax())
    T = int(rollout.completion_mask[idx].sum(dim=1).max())
    end = rollout.prompt_len + max(T, 1)
    return Rollout(
        texts=[rollout.texts[i] for i in rows], truncated=[rollout.truncated[i] for i in rows],
        lengths=[rollout.lengths[i] for i in rows], num_samples=per_q,
        input_ids=rollout.input_ids[idx, first:end], attention_mask=am[:, first:end],
        mm_token_type_ids=rollout.mm_token_type_ids[idx, first:end],
        completion_mask=rollout.completion_mask[idx, :max(T, 1)],
        prompt_len=rollout.prompt_len - first, pixel_values=pix, image_grid_thw=grid,
        has_image=[rollout.has_image[q] for q in qs], suppress_ids=rollout.suppress_ids)


def token_logprobs(model, rollout, *, temperature=1.0, chunk_bytes=None):
    """Teacher-forced log p(completion token) under the sampling distribution: [B*K, T] float32.

    Same processing as generate(): logits / temperature, vision tokens masked out, M-RoPE positions
    from mm_token_type_ids (without it the model silently falls back to 1-D positions).
    Each question's image goes through the vision tower once and its features are shared by its K
    samples (mm_encoder_outputs), so gradients reach the vision tower once per image, not K times.
    Positions past end-of-turn are 0 (mask them with rollout.completion_mask). Under FSDP2 the
    vision tower is its own unit (train.fsdp_units), so calling it here gathers its weights.

    Memory: the model runs without its output head and the head is applied here, to the completion
    tokens only, a chunk at a time, each chunk recomputed in backward (_head_logprobs). The full
    [B*K, T, V] logits (8 x 2,048 x 151,936 in fp32 = 10 GB, three such tensors with log-softmax and
    its backward: the largest item of a GRPO step, docs/memory.md) never exist; chunk_bytes bounds one
    chunk's fp32 logits (default LOGPROB_CHUNK_BYTES).
    """
    net = _unwrap(model)
    k = rollout.num_samples
    kwargs = dict(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                  mm_token_type_ids=rollout.mm_token_type_ids, use_cache=False,
                  logits_to_keep=rollout.completion_mask.shape[1] + 1)
    device = next(net.parameters()).device
    kwargs = {key: v.to(device) if torch.is_tensor(v) else v for key, v in kwargs.items()}
    if rollout.pixel_values is not None:
        grid = rollout.image_grid_thw.to(device)
        feats = net.model.get_image_features(rollout.pixel_values.to(device, net.dtype), grid,
                                             return_dict=True)
        per_image = list(feats.pooler_output)
        shared = [f for f in per_image for _ in range(k)]
        feats.pooler_output = shared
        kwargs["mm_encoder_outputs"] = {"image": feats}
        kwargs["image_grid_thw"] = grid.repeat_interleave(k, dim=0)
    # Call through `model` (not `net`) so DDP sees the forward and syncs gradients. With the head
    # swapped out, .logits are the final (normed) hidden states of the last T+1 positions.
    head = net.lm_head
    net.lm_head = torch.nn.Identity()
    try:
        hidden = model(**kwargs).logits[:, :-1]
    finally:
        net.lm_head = head
    # Read the weight after the forward: FSDP2 puts the gathered parameter on the module there.
    mask = rollout.completion_mask.to(device) > 0
    targets = rollout.completion_ids.to(device)[mask]
    suppress = torch.tensor(rollout.suppress_ids, dtype=torch.long, device=device)
    per_chunk = max(1, (chunk_bytes or LOGPROB_CHUNK_BYTES) // (4 * head.weight.shape[0]))
    flat = hidden[mask]                                  # [N, H]: completion tokens only
    parts = []   # at least one (maybe empty) chunk, so the graph reaches every parameter (DDP)
    for i in range(0, max(flat.shape[0], 1), per_chunk):
        args = (flat[i:i + per_chunk], head.weight, targets[i:i + per_chunk], temperature, suppress)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logprobs, *args, use_reentrant=False,
                                    preserve_rng_state=False))
        else:
            parts.append(_head_logprobs(*args))
    return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(
        mask, torch.cat(parts))


def _head_logprobs(hidden, weight, targets, temperature, suppress):
    """log softmax(hidden @ weight.T / temperature)[target] for [n, H] hidden states, fp32, with
    the suppressed ids at -inf as in the sampler. Checkpointed by the caller: its [n, V] tensors
    live only inside this call, in forward and again in backward."""
    logits = F.linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    if suppress.numel():
        logits = logits.index_fill(-1, suppress, float("-inf"))
    return torch.gather(F.log_softmax(logits, dim=-1), 1, targets.unsqueeze(-1)).squeeze(-1)
