"""The sections of a run's configuration, as typed dataclasses with their defaults: run, data, model (patch rule,
DPAR structure, text), optim, train, checkpoint, parallel, sample, eval, wandb; and the names of the allowed
choices. What a field means is said beside it; how files and overrides become a `Config` is in `loading`."""
from __future__ import annotations

from dataclasses import dataclass, field

from dpar_scale.errors import DparError


class ConfigError(DparError, ValueError):
    """A config file or override that cannot be applied; the message names the dotted key."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    name: str = ""  # wandb run name; defaults to the output folder's name


@dataclass
class DataConfig:
    codes_dir: str = ""  # folder written by tools/extract_codes.py (manifest.json + shards)
    entropy_dir: str = ""  # folder written by tools/compute_entropy.py; "" = <codes_dir>/entropy
    val_fraction: float = 0.02  # held-out images for the validation loss, spread over the listing (every class)
    batch_size: int = 32  # images per optimizer step, summed over data-parallel ranks (global batch)
    # DPAR: fill each micro-batch up to this many global positions Σ (M_i + 1) instead of a fixed image count
    # (data.batch_size is then unused: a step is grad_accum x data-parallel micro-batches); 0 = off
    global_tokens_per_microbatch: int = 0
    # DPAR packing: at most this many images per micro-batch (encoder/decoder activations and the [B, N, V] logits
    # grow with images, not global positions); 0 = only the position budget limits them
    max_images_per_microbatch: int = 0
    # background threads building the next steps' batches (gather, patch rule, packing, layouts; pinned on CUDA)
    # while the current step runs; 0 = built in the training loop. Same batches either way.
    num_workers: int = 0
    prefetch_steps: int = 2  # with num_workers > 0: steps built ahead of the one training
    log_sample_ids: bool = False
    # checked when the data is opened (values always, chunked over the memory maps): full = sizes + sha256 of every
    # shard against its manifest; size = sizes only. Verified files are cached per user (~/.cache/dpar_scale)
    verify: str = "full"
    # model.conditioning=text: caption shards written by tools/extract_codes.py --captions; "" = <codes_dir>/captions
    captions_dir: str = ""


@dataclass
class PatchConfig:
    mode: str = "global"  # global | monotonic | global+monotonic | static
    alignment: str = "reference"  # reference (e[k-1] > θ starts code k) | blt (e[k] > θ)
    threshold: float = 7.8  # θ in nats (mode=monotonic: the rise e_k - e_(k-1) that starts a patch); ignored by static
    max_patch_length: int = 4  # P_max; >= H·W never splits a run (no maximum length)
    # patch length for mode=static; fractional (e.g. 1.81) = that mean length, see dpar_scale/patching/rule.py
    static_length: float = 2
    row_reset: bool = True  # every row starts a patch (false: the paper's "no row reset" ablation)
    relative_threshold: float = 0.0  # θ_rel of mode=global+monotonic (e_k - e_(k-1) > θ_rel); 0 = unset


@dataclass
class DPARConfig:
    """Which DPAR structure to build. The defaults are the authors' model code; the other values are today's
    ablations (a checkpoint's config.yaml records which one it holds, and resumes only into the same one)."""

    # every: before each decoder layer every code adds its patch's global state through that layer's own
    # RMSNorm + Linear (the authors' one-key cross-attention); first: once, before the first decoder layer
    decoder_injection: str = "every"
    cross_attn_ffn: bool = False  # a SwiGLU FFN after the encoder's patch cross-attention (not in the authors' code)


@dataclass
class TextConfig:
    """Text conditioning (model.conditioning=text): the caption's sentencepiece tokens prefix each image."""

    tokenizer: str = ""  # a sentencepiece .model: tools/train_text_tokenizer.py, or e.g. T5's spiece.model
    # rows of the text embedding: >= the tokenizer's vocabulary (extra rows, e.g. padding to a multiple of the
    # tensor-parallel degree, are never produced by it)
    vocab_size: int = 0
    max_length: int = 64  # tokens per caption, eos included; longer captions are truncated (and counted)
    dropout: float = 0.1  # probability of training on the empty caption instead (classifier-free guidance)


LEGACY_DPAR = {"decoder_injection": "first", "cross_attn_ffn": True}


@dataclass
class ModelConfig:
    kind: str = ""  # gpt | entropy | dpar; "" = the preset's kind
    preset: str = ""  # e.g. gpt-b, dpar-xl, dpar-tiny; explicit fields below override the preset
    dim: int = 0
    n_heads: int = 0
    n_layers: int = 0  # gpt/entropy depth
    n_encoder_layers: int = 0  # dpar local encoder
    n_global_layers: int = 0  # dpar global transformer
    n_decoder_layers: int = 0  # dpar local decoder
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: float = 0.0  # 0 = LLaMA's 8/3 rule
    vocab_size: int = 16384
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    dropout: float = 0.1
    class_dropout: float = 0.1  # probability of replacing the label by the null class (CFG)
    rope_base: float = 10000.0
    global_rope: str = "dynamic"  # dynamic | 1d
    # gpt/entropy: rotation of the condition position. identity: cos 1, sin 0 (its q/k keep their content);
    # zero: cos = sin = 0, which zeroes the class token's q and k, as LlamaGen's table does (imported LlamaGen
    # checkpoints need it to give LlamaGen's logits)
    class_rope: str = "identity"
    norm_eps: float = 1e-5
    # auto (varlen on CUDA in bf16/fp16, else sdpa) | sdpa (documents grouped by length) | flex | varlen (CUDA)
    attention_backend: str = "auto"
    # class: the label conditions the image (class_dropout for CFG); text: the caption does (model.text)
    conditioning: str = "class"
    patch: PatchConfig = field(default_factory=PatchConfig)
    dpar: DPARConfig = field(default_factory=DPARConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    steps: int = 1000
    # > 0: the run is this many epochs and train.steps is derived from the data at start (see `resolve_epochs`;
    # one epoch = every training source image once, whatever the number of augmented views per image)
    epochs: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # 0 = only at the end
    val_batches: int = 8
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    ema: float = 0.0  # 0 = off; else the EMA decay, e.g. 0.9999
    progress_bar: bool = True
    # device dense peak for MFU, of the precision the matmuls use (bf16, or TF32 / fp32 for train.precision=fp32);
    # 0 = look the GPU up in dpar_scale.flops.analytic's table
    peak_tflops: float = 0.0
    # CUDA: fp32 matmuls (train.precision=fp32) run on TF32 tensor cores; false = full fp32 (slower, exact fp32)
    tf32: bool = True
    # deterministic kernels where torch has them (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace);
    # torch warns, naming the op, where it has none (see the README's "Checkpoints and resume")
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only the final one
    resume: str = ""  # "" | auto | path to a checkpoint folder
    keep_last: int = 3
    # resume on codes / entropies other than the ones the checkpoint was trained on (a warning instead of an error)
    allow_data_change: bool = False
    # sha256 of every checkpoint file in complete.json, hashed and verified with the work spread over the ranks
    # (catches a corrupt shard, not only a truncated one); false records sizes only
    checksums: bool = True
    # write the shards in a background thread (FSDP2 engine): the step waits only for the copy to CPU memory; the
    # checkpoint becomes visible (complete.json, rename) at the first step boundary after every rank's writes
    # finished (at the latest at the next save or at the end of the run)
    async_save: bool = False
    # DeepSpeed checkpoint resumed on another process count: worker processes of its universal conversion (rank 0
    # converts while the other ranks wait); 0 = one per CPU core of rank 0's node, at most 8
    universal_workers: int = 0
    # how long the other ranks wait for that conversion; 0 = derived from the checkpoint's size (see
    # dpar_scale.train.deepspeed_engine.universal_timeout)
    universal_timeout_min: float = 0.0


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 = the rest of the world
    tp: int = 1
    activation_checkpoint: str = "none"  # none | full | selective
    compile: bool = False
    # with compile, the packed global length is padded to a multiple of this, so a run sees a handful of shapes
    compile_bucket: int = 128


@dataclass
class SampleConfig:
    """How a trained model is sampled for evaluation: tools/sample.py and tools/sample_ddp.py use these when
    --cfg-scale / --resize are not given (the run's config.yaml carries them into its checkpoints)."""

    cfg_scale: float = 2.0  # classifier-free guidance (LlamaGen / DPAR: 2.0 for B and L, 1.75 for XL and XXL)
    resize: int = 0  # bicubic resize to R x R before uint8 (384-px models are evaluated at 256); 0 = off


@dataclass
class EvalConfig:
    """Evaluation during training (dpar_scale/sampling/training_eval.py): every `every` steps the trainer samples
    `num_samples` images (balanced labels, sample i's randomness a function of (seed, i), so the set does not depend
    on the world size) with the KV-cached sampler on all ranks, with the EMA weights when train.ema > 0, and logs
    the metrics of tools/evaluate.py (fid_domain or fid, precision, recall, class_accuracy) with train_flops."""

    every: int = 0  # steps between evaluations; 0 = off
    num_samples: int = 100
    cfg_scale: float = 0.0  # classifier-free guidance scale; 0 = sample.cfg_scale
    detector: str = ""  # domain:PATH (tools/fit_evaluator.py) or inception:PATH (a bare path: Inception TorchScript)
    reference: str = ""  # what tools/evaluate.py --reference takes: ImageFolder of real images or an npz
    batch_size: int = 32  # samples generated together (fixed chunks: the floats do not depend on the world size)
    detector_batch_size: int = 64
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cache_dir: str = ""  # where reference statistics are cached (default: beside the reference)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "dpar-scale"
    mode: str = "offline"  # offline unless the user has logged in and sets online


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


DECODER_INJECTIONS = ("every", "first")


CONDITIONINGS = ("class", "text")


PATCH_MODES = ("global", "monotonic", "global+monotonic", "static")


PATCH_ALIGNMENTS = ("reference", "blt")
