"""The shape of every experiment config, and the checks run before anything compiles.

Config files start from ``base_config()`` and change what they need; the CLI then
applies overrides and ``validate`` rejects bad values with the key that holds them.
"""

from __future__ import annotations

import re

import ml_collections as mc

from ftlab.config import ConfigError

METHODS = ("full", "frozen", "partial", "bitfit", "lora", "qlora", "ia3", "prompt")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
LOSSES = ("cross_entropy", "mse", "causal_lm", "seq2seq")
MODELS = ("cnn", "mlp", "resnet", "hf")
SOURCES = ("sklearn", "npz", "hf", "tfds", "arrays")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("auto", "xla", "cudnn", "splash", "naive")  # ftlab.models.layers.ATTENTION
REMAT_POLICIES = ("none", "dots", "full")  # ftlab.models.layers.REMAT_POLICIES


def base_config() -> mc.ConfigDict:
    """Every key an experiment may set, with defaults."""
    c = mc.ConfigDict()
    c.seed = 0

    c.data = mc.ConfigDict()
    # sklearn (bundled sets) | npz (local arrays: inputs, labels) | hf (Hugging Face datasets:
    # local files, a saved dataset, or a hub name when online) | tfds (prepared, data_dir)
    c.data.source = "sklearn"
    c.data.name = (
        "digits"  # sklearn set (digits, breast_cancer, wine, iris, diabetes), hub/tfds name
    )
    c.data.path = ""  # npz file; hf: a csv/json(l)/parquet file, an imagefolder or saved dataset
    c.data.format = ""  # hf: csv | json | parquet | imagefolder | disk ("" = from the path)
    c.data.files = ""  # hf: files per split, "train=a.csv,test=b.csv"
    c.data.subset = ""  # hf: the dataset's configuration (glue: sst2)
    c.data.data_dir = ""  # tfds: where the prepared dataset lives
    c.data.cache_dir = ""
    c.data.columns = ""  # canonical=source column: "text=sentence,label=sentiment" (or a dict)
    c.data.splits = ""  # train/val/test = source split names: "val=validation"
    # classification | regression | causal_lm | seq2seq (audio + transcripts: speech
    # recognition) | auto (from the columns)
    c.data.task = "auto"
    c.data.classes = ()  # keep only these labels, remapped to 0..k-1 in this order
    c.data.val_fraction = 0.15
    c.data.test_fraction = 0.15
    c.data.train_per_class = 0  # >0: a small labelled subset of the training split
    c.data.stratify = True
    c.data.shuffle = True  # reshuffle the training split each epoch (from the seed)
    c.data.scale = (
        0.0  # >0: multiply inputs by this (digits: 1/16); else standardise on train stats
    )
    c.data.split_seed = 0
    c.data.last_batch = "drop"  # the epoch's last partial batch: drop | pad (weight 0) | wrap
    c.data.prefetch = 2  # host batches prepared ahead by background threads (0: none)
    # text: a tokenizer directory (or hub id, online only); "" = model.pretrained's
    c.data.tokenizer = ""
    c.data.max_length = 128  # tokens per example (instruction cutoff, LM block size)
    # seq2seq (text to text, T5) only: text put before every source (T5's task prefix, e.g.
    # "summarize: "; training, evaluation by generation and predict alike), and the label /
    # decoder length in tokens (0 = data.max_length, which bounds the sources)
    c.data.source_prefix = ""
    c.data.target_length = 0
    c.data.template = ""  # instructions: alpaca | alpaca_legacy | chat | a JSON template file
    c.data.pack = False  # language modelling: concatenate examples and cut fixed blocks
    c.data.train_on_inputs = False  # instructions: also train on the prompt tokens
    c.data.clean = mc.ConfigDict()  # each step logged with its counts
    c.data.clean.malformed = True  # reject undecodable images, wrong types, empty text
    c.data.clean.missing = "drop"  # drop | mean | median | most_frequent | "" (keep)
    c.data.clean.duplicates = True  # exact duplicate rows within a split
    c.data.clean.leakage = "remove"  # train rows also in val/test: remove | error | ""
    c.data.clean.outliers = ""  # zscore | iqr (numeric features, train statistics)
    c.data.clean.outlier_threshold = 0.0  # 0: 3 (z-score) or 1.5 (IQR)
    c.data.clean.normalise = ""  # standardise | minmax | image (replaces data.scale)
    c.data.clean.image_mean = ()
    c.data.clean.image_std = ()
    c.data.clean.image_size = ()  # (height, width) to resize images to
    c.data.clean.label_map = ""  # "neg=0,pos=1": labels outside it are an error
    c.data.clean.rejects_file = "rejects.jsonl"  # in the workdir
    c.data.balance = mc.ConfigDict()  # training split only
    c.data.balance.method = ""  # oversample | undersample | smote
    c.data.balance.ratio = 1.0  # each class >= ratio x the largest (over) / <= smallest / ratio
    c.data.balance.k_neighbors = 5  # smote
    c.data.balance.class_weights = False  # weight the loss by 'balanced' class weights
    c.data.augment = mc.ConfigDict()  # training batches only; deterministic in (seed, step)
    c.data.augment.crop_padding = 0
    c.data.augment.flip = False
    c.data.augment.rotate_degrees = 0.0
    c.data.augment.brightness = 0.0
    c.data.augment.contrast = 0.0
    c.data.augment.mixup_alpha = 0.0
    c.data.augment.synonym_prob = 0.0
    c.data.augment.swap_prob = 0.0
    c.data.augment.deletion_prob = 0.0
    c.data.augment.synonyms = ""  # JSON file {word: [synonyms]}
    c.data.augment.speed = 0.0  # audio: resample each clip by a factor in [1-speed, 1+speed]
    c.data.augment.noise = 0.0  # audio: Gaussian noise, std in [0, noise] x the clip's RMS
    # audio columns (speech recognition, ftlab/data/audio.py): file paths, arrays or HF Audio
    c.data.audio = mc.ConfigDict()
    c.data.audio.root = ""  # relative paths are read from here ("" = data.path's directory)
    c.data.audio.sampling_rate = 16000  # of array cells (files say theirs); resampled to 16 kHz
    c.data.audio.language = "en"  # Whisper's forced tokens <|en|><|transcribe|>; "" = none
    c.data.audio.task = "transcribe"  # transcribe | translate | ""
    c.data.audio.num_frames = 0  # mel frames per clip; 0 = the model's 2 x max_source_positions

    c.model = mc.ConfigDict()
    c.model.name = "cnn"
    c.model.features = (16, 32)
    c.model.hidden = (64,)
    c.model.depths = (1, 1)  # resnet: blocks per stage (stage widths are model.features)
    c.model.dropout = 0.0
    # name "hf": a Hugging Face family (gpt2, llama, bert, vit, resnet) from a local directory
    # or hub id (online only) in `pretrained`, with `hf_config` fields laid over its config.json;
    # without `pretrained`, `hf_config` (model_type included) describes a fresh model.
    c.model.pretrained = ""
    c.model.hf_config = mc.ConfigDict()
    c.model.remat = False  # recompute each block in the backward pass (less activation memory)
    # what remat keeps: none | dots (matmul outputs saved, the rest recomputed) | full
    # (only each block's input saved); model.remat = True alone means full
    c.model.remat_policy = "none"
    # transformer attention: auto (= xla) | xla (jax.nn.dot_product_attention, fused by XLA) |
    # cudnn (its cuDNN kernel, GPU) | splash (Pallas splash attention, TPU) | naive (reference)
    c.model.attention = "auto"

    c.init = mc.ConfigDict()
    c.init.checkpoint = ""  # parameters saved by a run (its workdir/params), or "stage:NAME"
    c.init.reinit = ()  # regexes of leaves that keep their fresh init (a new head)

    # Knowledge distillation (ftlab/train/distill.py): with a teacher, the training loss is
    # alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))
    # (+ hidden_weight * MSE(projected student hidden state, teacher's)); classification and
    # causal LM (per target token) only. The teacher runs forward only, frozen, outside the
    # train state; validation and test scores are the student's plain loss and metrics.
    c.distill = mc.ConfigDict()
    c.distill.teacher = ""  # an earlier run's directory (its best params), or "stage:NAME", or
    # a Hugging Face model directory
    c.distill.alpha = 0.5  # weight of the label cross-entropy (1: plain training)
    c.distill.temperature = 2.0  # softens both distributions; the KL term is scaled by T^2
    c.distill.hidden_weight = 0.0  # >0: MSE of the last hidden state through a learned projection

    c.method = mc.ConfigDict()
    c.method.name = "full"
    # dtype frozen leaves are stored in (trained leaves and optimizer state stay float32):
    # auto = bfloat16 on GPU/TPU, float32 on CPU | float32 | bfloat16
    c.method.frozen_dtype = "auto"
    c.method.trainable = ()  # regexes trained in addition to what the method selects
    # QLoRA: "qlora" is "lora" over a quantised frozen base (every method.lora key applies).
    # Frozen kernels (not trained, not matched by quantize_skip) stored quantised and
    # dequantised inside each layer's matmul: auto (nf4 for qlora, none otherwise) | none |
    # int8 (per output channel) | nf4 (4-bit NormalFloat, float32 absmax per block of
    # quantize_block weights along the fan-in, two codes per byte). Any method composes with
    # it (frozen + nf4: a probe over a 4-bit backbone); other frozen leaves use frozen_dtype.
    c.method.quantize = "auto"
    c.method.quantize_block = 64  # NF4 block size (QLoRA's 64)
    # NF4 only: each block's float32 absmax stored as an 8-bit float (blocks of 256, a float32
    # scale each, the mean subtracted): 0.5159 instead of 0.5625 bytes per weight (QLoRA 3)
    c.method.quantize_double = False
    c.method.quantize_skip = (r"(^|/)lm_head/",)  # kernel regexes kept unquantised
    c.method.partial = mc.ConfigDict()
    c.method.partial.last_k = 0  # train the last k blocks
    c.method.partial.blocks = ()  # or the blocks whose paths match these regexes
    c.method.partial.block_pattern = r"(?:^|/)(?:block|blocks|h|layer|layers)_(\d+)(?:/|$)"
    c.method.lora = mc.ConfigDict()
    c.method.lora.rank = 4
    c.method.lora.alpha = 8.0
    c.method.lora.dropout = 0.0
    c.method.lora.targets = ()  # regexes of kernel paths to adapt
    c.method.lora.rslora = False  # scale alpha/sqrt(r) instead of alpha/r
    # DoRA (Liu et al. 2024; PEFT use_dora) on top of lora/qlora: each target also trains a
    # magnitude per output unit, W' = m * (W + s a@b) / ||W + s a@b|| (per column, detached)
    c.method.lora.dora = False
    # IA3 (method.name "ia3"): trained scaling vectors, initialised to 1, on the kernels the
    # targets match: output side W * l and bias * l; feedforward (input side) diag(l) W
    c.method.ia3 = mc.ConfigDict()
    c.method.ia3.targets = ()  # regexes of kernel paths to scale
    c.method.ia3.feedforward = ()  # regexes of those targets scaled on their input side
    # prompt tuning (method.name "prompt"; causal LMs on GPT-2 / LLaMA, T5): a trained soft
    # prompt of num_virtual_tokens embeddings prepended to the input embeddings (T5: the
    # encoder's), the model frozen
    # (plus method.trainable); PEFT's PROMPT_TUNING (ftlab.methods.prompt)
    c.method.prompt = mc.ConfigDict()
    c.method.prompt.num_virtual_tokens = 20  # virtual tokens (> 0)
    # random: N(0, 1) (PEFT RANDOM) | vocab: embeddings of random vocabulary tokens
    # (SAMPLE_VOCAB) | text: embeddings of init_text's tokens, repeated / cut (TEXT)
    c.method.prompt.init = "random"
    c.method.prompt.init_text = ""  # init "text": tokenised by the run's tokenizer

    c.optim = mc.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 0.0  # where cosine/linear decay ends, relative to lr
    c.optim.weight_decay = 0.0  # never applied to biases or norm scales
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 turns it off
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.momentum = 0.9  # sgd
    c.optim.accum_steps = 1  # gradient accumulation: micro-batches per update
    c.optim.state_dtype = "float32"  # optimizer state (adam moments): float32 | bfloat16

    c.train = mc.ConfigDict()
    c.train.batch_size = 32
    c.train.num_steps = 0  # >0 wins over num_epochs
    c.train.num_epochs = 10
    c.train.loss = "cross_entropy"
    c.train.label_smoothing = 0.0
    c.train.compute_dtype = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # causal LM: logits and cross-entropy this many positions at a time (0: all at once), so
    # batch x length x vocabulary float32 logits never sit in memory
    c.train.loss_chunk = 0
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batch_size = 256

    c.export = mc.ConfigDict()  # written into the workdir when training ends
    c.export.hf = False  # workdir/hf: a Hugging Face directory (LoRA merged) transformers loads
    c.export.peft = False  # workdir/peft_adapter: the LoRA adapter in PEFT's format

    c.eval = mc.ConfigDict()
    # the starting model (pretrained weights, step 0) scored on val and test before training:
    # the report's "before" row; turn off for very large models
    c.eval.before_training = True
    c.eval.label_issues = False  # classification: flag likely mislabelled training rows
    c.eval.label_issue_folds = 5  # out-of-fold predictions for label_issues.csv
    c.eval.fairness_threshold = 0.1  # flag demographic-parity / equal-opportunity gaps above
    # causal LMs: decode test prompts and score BLEU / chrF / ROUGE
    c.eval.generate_examples = 0  # distinct test prompts decoded at the end (0: none)
    c.eval.max_new_tokens = 64
    c.eval.num_beams = 1
    c.eval.length_penalty = 1.0
    c.eval.no_repeat_ngram_size = 0
    c.eval.batch_size = 16

    c.early_stopping = mc.ConfigDict()
    c.early_stopping.metric = "val/loss"
    c.early_stopping.mode = "min"
    c.early_stopping.patience = 0  # evaluations without improvement; 0 = never stop early
    c.early_stopping.min_delta = 0.0
    c.early_stopping.restore_best = True

    c.checkpoint = mc.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True

    # Devices: one mesh over every device of every host. Axes: data (replicas), fsdp (weights,
    # gradients and optimizer state split, ZeRO-3 style; also splits the batch), tensor (heads,
    # MLP, vocabulary split). One axis may be -1: the devices left over.
    c.platform = "auto"  # auto | cpu | gpu | tpu
    c.distributed = (
        "auto"  # jax.distributed.initialize(): auto (when launched as several) | on | off
    )
    c.mesh = mc.ConfigDict()
    c.mesh.shape = mc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # Multi-run experiments: (name, {dotted.key: value}) pairs applied on top of this config.
    c.stages = ()  # run in order before the variants (e.g. pretraining), in workdir/NAME
    c.variants = ()  # compared with one another; each in workdir/NAME, table in workdir
    c.variant_seeds = ()  # run each variant once per seed (seed and data.split_seed), mean ± std
    # A sweep (ftlab/sweep.py): more variants, named from their values (r4_lr1e-3), laid on
    # top of each declared variant (or alone). grid: (dotted_key, (values...)) pairs, a product;
    # zip: groups of such pairs of equal length that move together, each one more axis of the
    # product (a group is named by its first key, or by a ("name", (labels...)) entry).
    c.sweep = mc.ConfigDict()
    c.sweep.grid = ()
    c.sweep.zip = ()
    c.baseline = ""  # the variant the comparison's paired deltas are taken against ("" = first)
    return c


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _one_of(cfg: mc.ConfigDict, key: str, allowed: tuple[str, ...]) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    _check(
        value in allowed,
        key,
        f"unknown value {value!r}; choose one of {', '.join(allowed)}",
    )


def _regexes(values, key: str) -> None:
    for pattern in values:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{key}: invalid regex {pattern!r}: {e}") from None


def validate(cfg: mc.ConfigDict) -> None:
    """Raise ConfigError for any value that cannot run, before data or compilation."""
    for key, allowed in [
        ("data.source", SOURCES),
        ("model.name", MODELS),
        ("method.name", METHODS),
        ("optim.name", OPTIMIZERS),
        ("optim.schedule", SCHEDULES),
        ("train.loss", LOSSES),
        ("train.compute_dtype", DTYPES),
        ("model.attention", ATTENTION),
        ("model.remat_policy", REMAT_POLICIES),
        ("method.frozen_dtype", ("auto", "float32", "bfloat16")),
        ("method.quantize", ("auto", "none", "int8", "nf4")),
        ("optim.state_dtype", ("float32", "bfloat16")),
        ("early_stopping.mode", ("min", "max")),
        ("data.last_batch", ("drop", "pad", "wrap")),
        ("data.task", ("auto", "classification", "regression", "causal_lm", "seq2seq")),
        ("data.clean.missing", ("", "drop", "mean", "median", "most_frequent")),
        ("data.clean.leakage", ("", "remove", "error")),
        ("data.clean.outliers", ("", "zscore", "iqr")),
        ("data.clean.normalise", ("", "standardise", "minmax", "image")),
        ("data.balance.method", ("", "oversample", "undersample", "smote")),
    ]:
        _one_of(cfg, key, allowed)
    _check(cfg.optim.lr > 0, "optim.lr", f"learning rate must be > 0, got {cfg.optim.lr}")
    _check(
        cfg.train.batch_size > 0,
        "train.batch_size",
        f"must be > 0, got {cfg.train.batch_size}",
    )
    _check(cfg.train.eval_batch_size > 0, "train.eval_batch_size", "must be > 0")
    _check(cfg.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
    _check(cfg.train.loss_chunk >= 0, "train.loss_chunk", "must be >= 0 (0 = no chunking)")
    if cfg.train.loss_chunk:
        _check(
            cfg.train.loss == "causal_lm",
            "train.loss_chunk",
            f"chunked cross-entropy is for train.loss 'causal_lm', not {cfg.train.loss!r}",
        )
    _check(
        cfg.train.batch_size % cfg.optim.accum_steps == 0,
        "optim.accum_steps",
        f"batch_size {cfg.train.batch_size} is not divisible by accum_steps {cfg.optim.accum_steps}",
    )
    _check(
        cfg.train.num_steps > 0 or cfg.train.num_epochs > 0,
        "train.num_steps",
        "set train.num_steps or train.num_epochs to a positive number",
    )
    _check(cfg.train.num_steps >= 0, "train.num_steps", "must be >= 0")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(cfg.optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
    _check(0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _check(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)")
    for key in (
        "train.log_every",
        "train.eval_every",
        "checkpoint.every_steps",
        "checkpoint.keep",
    ):
        section, name = key.split(".")
        _check(cfg[section][name] > 0, key, f"must be > 0, got {cfg[section][name]}")
    _check(cfg.early_stopping.patience >= 0, "early_stopping.patience", "must be >= 0")
    _check(
        cfg.early_stopping.metric.startswith("val/"),
        "early_stopping.metric",
        f"must be a validation metric such as 'val/loss' or 'val/accuracy', "
        f"got {cfg.early_stopping.metric!r} (the test split never selects models)",
    )
    for key in ("val_fraction", "test_fraction"):
        _check(0 <= cfg.data[key] < 1, f"data.{key}", "must be in [0, 1)")
    _check(
        cfg.data.val_fraction > 0,
        "data.val_fraction",
        "must be > 0: evaluation needs a validation split",
    )
    _check(
        cfg.data.val_fraction + cfg.data.test_fraction < 1,
        "data.val_fraction",
        "val + test fractions must be < 1",
    )
    if cfg.data.source == "npz":
        _check(bool(cfg.data.path), "data.path", "source 'npz' needs data.path")
    if cfg.data.source == "hf":
        _check(
            bool(cfg.data.path or cfg.data.files or cfg.data.name),
            "data.path",
            "source 'hf' needs data.path (a local file or directory), data.files or data.name",
        )
    if cfg.data.source == "tfds":
        _check(bool(cfg.data.name), "data.name", "source 'tfds' needs the dataset's name")
    _check(
        0 < cfg.data.balance.ratio <= 1,
        "data.balance.ratio",
        f"must be in (0, 1], got {cfg.data.balance.ratio}",
    )
    _check(cfg.data.max_length > 1, "data.max_length", "must be > 1")
    _check(
        isinstance(cfg.data.source_prefix, str),
        "data.source_prefix",
        f"must be a string, got {cfg.data.source_prefix!r}",
    )
    _check(
        cfg.data.target_length == 0 or cfg.data.target_length > 1,
        "data.target_length",
        f"must be 0 (= data.max_length) or > 1 tokens, got {cfg.data.target_length}",
    )
    if cfg.data.task not in ("auto", "seq2seq"):
        for key in ("source_prefix", "target_length"):
            _check(
                not cfg.data[key],
                f"data.{key}",
                f"only for text-to-text data (data.task 'seq2seq'), not {cfg.data.task!r}",
            )
    _check(cfg.data.prefetch >= 0, "data.prefetch", "must be >= 0")
    _check(cfg.eval.label_issue_folds >= 2, "eval.label_issue_folds", "must be >= 2")
    lora = cfg.method.lora
    if cfg.method.name in ("lora", "qlora"):
        _check(lora.rank > 0, "method.lora.rank", f"must be > 0, got {lora.rank}")
        _check(lora.alpha > 0, "method.lora.alpha", f"must be > 0, got {lora.alpha}")
        _check(0 <= lora.dropout < 1, "method.lora.dropout", "must be in [0, 1)")
        _check(
            not (lora.dora and lora.dropout > 0),
            "method.lora.dropout",
            "DoRA (method.lora.dora) runs as one combined kernel, without dropout on the "
            "low-rank branch; set it to 0",
        )
        _check(
            len(lora.targets) > 0,
            "method.lora.targets",
            "LoRA needs at least one target regex",
        )
    if cfg.export.hf or cfg.export.peft:
        _check(
            cfg.model.name == "hf",
            "export.hf" if cfg.export.hf else "export.peft",
            "Hugging Face export needs a Hugging Face model (model.name = 'hf')",
        )
    if cfg.export.peft:
        _check(
            cfg.method.name in ("lora", "qlora", "ia3", "prompt"),
            "export.peft",
            "a PEFT adapter needs method.name 'lora', 'qlora', 'ia3' or 'prompt'",
        )
    _check(cfg.method.quantize_block >= 1, "method.quantize_block", "must be >= 1")
    _check(
        not (cfg.method.name == "qlora" and cfg.method.quantize == "none"),
        "method.quantize",
        "'none' with method 'qlora' (whose base is quantised); use method.name 'lora'",
    )
    _regexes(cfg.method.quantize_skip, "method.quantize_skip")
    if cfg.method.name == "frozen":
        _check(
            len(cfg.method.trainable) > 0,
            "method.trainable",
            "method 'frozen' trains only these regexes (e.g. ('head/',)); none given",
        )
    if cfg.method.name == "partial":
        p = cfg.method.partial
        _check(
            (p.last_k > 0) != (len(p.blocks) > 0),
            "method.partial.last_k",
            "method 'partial' needs exactly one of partial.last_k > 0 or partial.blocks",
        )
    _regexes(cfg.method.trainable, "method.trainable")
    _regexes(lora.targets, "method.lora.targets")
    if cfg.method.name == "ia3":
        _check(
            len(cfg.method.ia3.targets) > 0,
            "method.ia3.targets",
            "IA3 needs at least one target regex",
        )
    _regexes(cfg.method.ia3.targets, "method.ia3.targets")
    if cfg.method.name == "prompt":
        pt = cfg.method.prompt
        _check(
            pt.num_virtual_tokens > 0,
            "method.prompt.num_virtual_tokens",
            f"must be > 0, got {pt.num_virtual_tokens}",
        )
        _check(
            pt.init in ("random", "vocab", "text"),
            "method.prompt.init",
            f"{pt.init!r}; choose random, vocab, text",
        )
        _check(
            pt.init != "text" or bool(pt.init_text),
            "method.prompt.init_text",
            "init 'text' needs a text",
        )
        _check(
            cfg.train.loss in ("causal_lm", "seq2seq"),
            "method.name",
            "'prompt' (prompt tuning) supports causal language models (train.loss "
            "'causal_lm') on GPT-2 and LLaMA and T5 encoder-decoders (train.loss 'seq2seq'), "
            f"not train.loss {cfg.train.loss!r}",
        )
    _regexes(cfg.method.ia3.feedforward, "method.ia3.feedforward")
    _regexes(cfg.method.partial.blocks, "method.partial.blocks")
    _regexes((cfg.method.partial.block_pattern,), "method.partial.block_pattern")
    _regexes(cfg.init.reinit, "init.reinit")
    _check_distill(cfg)
    _check(
        len(set(cfg.variant_seeds)) == len(cfg.variant_seeds),
        "variant_seeds",
        "seeds must be unique",
    )
    for group in ("stages", "variants"):
        names = [name for name, _ in cfg[group]]
        _check(len(names) == len(set(names)), group, f"names must be unique, got {names}")
    from ftlab.sweep import check as check_sweep  # the sweep's keys, values, names, baseline

    check_sweep(cfg)


def _check_distill(cfg: mc.ConfigDict) -> None:
    """``config.distill``: values in range, a loss that has class or token distributions."""
    d = cfg.distill
    _check(0 <= d.alpha <= 1, "distill.alpha", f"must be in [0, 1], got {d.alpha}")
    _check(d.temperature > 0, "distill.temperature", f"must be > 0, got {d.temperature}")
    _check(d.hidden_weight >= 0, "distill.hidden_weight", f"must be >= 0, got {d.hidden_weight}")
    if not d.teacher:
        return
    stages = [name for name, _ in cfg.stages]
    _check(
        not d.teacher.startswith("stage:") or len(stages) > 0,
        "distill.teacher",
        f"{d.teacher!r} names no stage of this config (stages: {stages})",
    )
    _check(
        cfg.train.loss in ("cross_entropy", "causal_lm"),
        "distill.teacher",
        f"distillation matches class or token distributions (train.loss 'cross_entropy' or "
        f"'causal_lm'); train.loss {cfg.train.loss!r} is not supported (regression has no "
        "distribution to match)",
    )
    _check(
        cfg.train.loss_chunk == 0,
        "train.loss_chunk",
        "distillation needs the student's full logits; set train.loss_chunk = 0",
    )
