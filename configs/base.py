"""Every maxlm default, one documented line each. Experiments override a few fields.

Every value is checked when a config is loaded (maxlm/config.py): floats must be finite, counts and sizes > 0
unless a comment gives 0 a meaning, shares and probabilities within [0, 1], seeds in [0, 2^32), other integers
below 2^31.

Run:  maxlm train --config=configs/base.py --workdir=runs/base
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()

  # ---- model: a Llama-family decoder ----
  m = c.model = config_dict.ConfigDict()
  m.vocab_size = 32000  # tokenizer vocabulary size (the embedded tokenizer is trained to this size)
  m.d_model = 512  # residual stream width
  m.num_layers = 8  # decoder blocks
  m.num_heads = 8  # query heads
  m.num_kv_heads = 4  # key/value heads: 1 = MQA, num_heads = MHA, in between = GQA
  m.head_dim = placeholder(int)  # per-head width; None = d_model // num_heads
  m.mlp_dim = 1408  # SwiGLU hidden width (of each expert in a MoE)
  m.num_experts = 0  # 0 = dense SwiGLU; N = Mixture of Experts with N SwiGLU experts per layer
  m.num_experts_per_tok = 2  # MoE: experts each token is routed to (top-k of the router's softmax)
  m.moe_aux_loss_coef = 0.01  # MoE: weight of the load-balancing loss E * sum_e f_e * P_e (1.0 when balanced)
  m.moe_capacity_factor = 0.0  # MoE: 0 = dropless grouped matmul; c > 0 = an expert takes at most
  #   c * seq_len * k / num_experts tokens of each sequence (GShard dispatch, shards over mesh.expert); the
  #   overflow is dropped (passes through the residual) and counted in the moe_dropped metric
  m.max_seq_len = 2048  # longest position the model is built for (RoPE tables, generation)
  m.rope_theta = 10000.0  # RoPE base frequency
  m.rope_scaling = ""  # "" = none; "llama3" = Llama-3.1 frequency scaling with the fields below
  m.rope_scaling_factor = 8.0  # llama3 scaling: overall context extension factor
  m.rope_low_freq_factor = 1.0  # llama3 scaling: wavelengths above orig/low are fully scaled
  m.rope_high_freq_factor = 4.0  # llama3 scaling: wavelengths below orig/high are untouched
  m.rope_original_max_len = 8192  # llama3 scaling: the context the base model was trained at
  m.rms_norm_eps = 1e-5  # RMSNorm epsilon
  m.tie_embeddings = False  # share the input embedding with the output projection
  m.sliding_window = placeholder(int)  # None = full causal attention; N = attend to the last N tokens
  m.attention_bias = False  # biases on the q/k/v projections (Qwen2)
  m.attention = "xla"  # attention backend: xla (einsum reference) | dot_product (jax.nn.dot_product_attention) |
  #   ring (ring attention over the mesh's sequence axis: K/V blocks rotate, nothing is all-gathered) |
  #   pallas_flash (kernels_pallas flash attention: O(seq) memory, causal block skipping, custom backward)
  m.pallas_backend = "auto"  # Pallas kernel formulation: auto (the running platform) | tpu (Mosaic) | gpu (Triton)
  #   | cpu (interpreted: the CPU has no Pallas compiler); auto on a CPU host is cpu
  m.flash_block_sizes = ""  # "block_q,block_kv,block_q_bwd,block_kv_bwd" (powers of two); "" = per-backend defaults
  m.scan_layers = True  # run the blocks under jax.lax.scan: compile time flat in depth
  m.scan_unroll = 1  # layers per scan iteration; num_layers = fully unrolled (faster on CPU, slower compile)
  m.remat = "none"  # rematerialisation policy: none | full | dots_saveable | dots_with_no_batch_dims_saveable
  m.dtype = "auto"  # compute dtype: auto (bfloat16 on TPU/GPU, float32 on CPU) | float32 | bfloat16
  m.param_dtype = "float32"  # master-weight dtype
  m.init_std = 0.02  # std of the normal initialiser of every matrix (> 0)

  # ---- mesh: devices per axis (their product = all devices); one axis may be -1 = all remaining ----
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # data parallelism: the batch is split, parameters replicated
  c.mesh.fsdp = 1  # FSDP (ZeRO-3): the batch and every parameter/optimizer tensor are split
  c.mesh.sequence = 1  # sequence parallelism: activations split along the sequence (model.attention=ring)
  c.mesh.tensor = 1  # tensor parallelism (Megatron): heads, MLP width and vocabulary are split
  c.mesh.expert = 1  # expert parallelism: MoE experts are split (and the batch, outside the experts)

  # ---- sharding: logical axis names -> mesh axes (maxlm/logical_rules.py lists the presets' rules) ----
  c.sharding = config_dict.ConfigDict()
  c.sharding.preset = "fsdp_tp_sp"  # dp | fsdp | fsdp_tp | fsdp_tp_sp; mesh axes of size 1 make rules no-ops
  c.sharding.rules = ""  # per-name overrides of the preset, e.g. "vocab=,embed=fsdp+data" ("" after = = replicate)

  # ---- multi-host: one process per host, all running the same command ----
  c.distributed = config_dict.ConfigDict()
  c.distributed.coordinator = ""  # HOST:PORT of process 0; "" = single process unless auto-detected below
  c.distributed.num_processes = 1  # processes in the job (with coordinator)
  c.distributed.process_id = 0  # this process's index (with coordinator)
  c.distributed.auto_detect = True  # on a TPU pod / SLURM / MPI job jax finds the coordinator itself
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join

  # ---- the host process on a CPU-only machine (applied by the CLI before jax starts; no effect on TPU/GPU hosts) ----
  c.host = config_dict.ConfigDict()
  c.host.malloc_tuning = "auto"  # auto (on when the host has no TPU/GPU) | on | off: glibc keeps freed memory mapped,
  #   so XLA:CPU's per-step temporary buffer is not page-faulted in again on every step (maxlm/host.py)
  c.host.xla_flags = ""  # extra XLA_FLAGS for CPU runs, appended to the environment's (e.g. --xla_cpu_use_onednn=true)

  # ---- data ----
  d = c.data = config_dict.ConfigDict()
  d.paths = ""  # comma-separated text/JSONL files, dirs or globs; "" = the embedded default corpus
  d.text_field = "text"  # JSONL field holding the document text
  d.skip_bad_records = False  # skip (and count, per reason, with the first file:line) records of data.paths that
  # cannot be documents (invalid UTF-8, malformed JSON, no text field) instead of stopping; `maxlm curate` cleans them
  d.max_corpus_mb = 8.0  # cap on the default corpus (MB of text, > 0), picked deterministically
  d.tokenizer = ""  # sentencepiece .model, HF tokenizer.json, or a directory of either; "" = train one (cached)
  d.cache_dir = ""  # tokenizer / tokenized-corpus cache; "" = $MAXLM_CACHE or ~/.cache/maxlm
  d.eval_fraction = 0.02  # share of documents held out for eval loss (chosen by hash: stable)
  d.seq_len = 512  # tokens per packed training row
  d.batch_size = 16  # global batch (rows) per optimizer step
  d.seed = 0  # shuffling seed
  d.num_packing_bins = 8  # open bins of grain's first-fit packer
  d.loader_streams = 0  # independent packed streams the global batch is drawn from, split over processes: the
  #   data is identical and resumable on any host count dividing it. 0 = the checkpoint's count, else
  #   lcm(8, processes) if data.batch_size divides into that many, else one per process
  # Token shards from `maxlm tokenize` (used instead of data.paths when data.tokenized is set):
  d.tokenized = ""  # comma-separated `maxlm tokenize` output directories (one tokenizer)
  d.mixture = ""  # NAME=WEIGHT,... over their sources, e.g. "web=0.7,code=0.3"; "" = all, by their token counts
  d.mixture_unit = "tokens"  # the weights are shares of tokens | documents (document pieces)
  d.curriculum = "none"  # none | length | tokens_per_byte: order each epoch from low to high score, in stages
  d.curriculum_stages = 4  # stages of the curriculum (shuffled within a stage)
  d.verify_checksums = False  # sha256 every shard at start (sizes are always checked)

  # ---- training ----
  t = c.train = config_dict.ConfigDict()
  t.steps = 1000  # optimizer steps
  t.objective = "lm"  # lm: next-token loss on every token | sft: data.paths are chat / prompt-completion / text JSONL
  #   (TRL's formats), trained on assistant / completion tokens only | dpo: {"prompt", "chosen", "rejected"} JSONL,
  #   the dpo.* loss (docs/post_training.md)
  t.seed = 0  # parameter-initialisation seed
  t.learning_rate = 3e-4  # peak learning rate
  t.schedule = "cosine"  # after warmup: cosine | linear | constant
  t.warmup_steps = 100  # linear warmup from 0 to the peak (a warning if beyond train.steps: the peak is never reached)
  t.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak (cosine, linear)
  t.weight_decay = 0.1  # AdamW decoupled weight decay (never applied to norms or biases); 0 = none
  t.b1 = 0.9  # Adam beta1, in [0, 1)
  t.b2 = 0.95  # Adam beta2, in [0, 1)
  t.eps = 1e-8  # Adam epsilon (> 0)
  t.grad_clip = 1.0  # global-norm clipping threshold; 0 disables
  t.grad_accum_steps = 1  # micro-batches per step; the batch is split, the result equals the full batch
  t.z_loss = 0.0  # weight of the z-loss (log Z)^2 that keeps logits from drifting; 0 = off
  t.max_nonfinite_steps = 5  # stop after this many consecutive NaN/inf steps (each one is skipped)
  t.log_every = 10  # steps between log lines when progress_bar is off (metrics.jsonl and TensorBoard get every step)
  t.eval_every = 200  # steps between eval-loss passes; 0 = only at the end
  t.eval_batches = 4  # batches per eval pass
  t.eval_tasks = ""  # evaluation task files / directories (comma-separated; see docs/evaluation.md) run at every eval:
  #   metrics eval_<task>_<metric> beside the eval loss; "" = none
  t.eval_tasks_limit = 0  # records per task at each eval; 0 = all
  t.eval_tasks_fewshot = 0  # few-shot examples before each prompt of train.eval_tasks
  t.checkpoint_every = 200  # steps between checkpoints
  t.keep_checkpoints = 3  # newest checkpoints kept on disk
  t.async_checkpointing = True  # write checkpoints in the background
  t.sample_tokens = 64  # tokens generated as a sample at the end of training; 0 = none
  t.sample_prompt = "def "  # prompt of that sample
  t.progress_bar = True  # tqdm bar with loss, tokens/s and ETA (a log line every log_every otherwise)

  # ---- curation (`maxlm curate --output DIR INPUT...`) ----
  u = c.curate = config_dict.ConfigDict()
  u.text_field = "text"  # JSONL field holding the document text
  u.shard_docs = 10000  # kept documents per output shard (and per resume checkpoint)
  u.max_doc_mb = 64.0  # larger documents (or JSONL lines) are skipped as document_too_large, never loaded
  u.normalize = config_dict.ConfigDict({"enabled": True, "fix_mojibake": False})  # NFC, controls, whitespace
  u.exact_dedup = config_dict.ConfigDict({"enabled": True})  # hash of the case- and whitespace-folded text
  u.language = config_dict.ConfigDict({
    "enabled": True,
    "keep": "",  # comma-separated ISO 639-1 codes, e.g. "en,de"; "" = keep every language
    "min_confidence": 0.5,  # py3langid normalized probability below which a document is dropped
  })
  # Gopher / C4 quality rules (data_pipelines/curate/quality.py documents each); a negative value disables one.
  u.quality = config_dict.ConfigDict({
    "enabled": True, "min_words": 50, "max_words": 100_000, "min_mean_word_length": 3.0,
    "max_mean_word_length": 10.0, "max_symbol_word_ratio": 0.1, "max_bullet_line_fraction": 0.9,
    "max_ellipsis_line_fraction": 0.3, "min_alpha_word_fraction": 0.8, "max_digit_fraction": 0.15,
    "min_stop_words": 2, "min_terminal_punct_line_fraction": 0.1, "reject_lorem_ipsum": True,
    "max_dup_line_fraction": 0.30, "max_dup_paragraph_fraction": 0.30, "max_dup_line_char_fraction": 0.20,
    "max_dup_paragraph_char_fraction": 0.20,
  })
  u.near_dedup = config_dict.ConfigDict({
    "enabled": True, "threshold": 0.8,  # estimated Jaccard of shingle sets at which a document is a near-dup
    "shingle_size": 5, "shingle_unit": "word",  # word | char n-grams
    "num_perm": 128, "seed": 0,  # MinHash permutations
    "bands": 0, "rows": 0,  # LSH banding; 0 = chosen for the threshold
  })
  u.pii = config_dict.ConfigDict({"enabled": False})  # redact emails, IP addresses, phone numbers

  # ---- tokenization (`maxlm tokenize --output DIR [NAME=]CURATED...`) ----
  k = c.tokenize = config_dict.ConfigDict()
  k.tokenizer = ""  # sentencepiece .model, HF tokenizer.json or a directory of either; "" = train a BPE
  k.vocab_size = 0  # pieces of the trained tokenizer; 0 = model.vocab_size
  k.max_train_mb = 32.0  # MB of text (round-robin over the sources) the tokenizer is trained on
  k.text_field = "text"  # JSONL field holding the document text
  k.max_doc_mb = 64.0  # larger documents are skipped (counted in the manifest)
  k.eval_fraction = 0.02  # share of documents held out as each source's eval split (by a stable hash)
  k.shard_mb = 256.0  # target size of one ArrayRecord shard
  k.array_record_options = "group_size:1"  # one record per chunk: cheap random access for the loader
  # ---- serving (`maxlm generate` / `maxlm serve`): maxlm/serve/ ----
  v = c.serve = config_dict.ConfigDict()
  v.devices = 1  # devices the engine runs on (the first N); the mesh.* axes must multiply to N (e.g. tensor=N)
  v.max_batch = 8  # concurrent sequences (decode slots) in the running batch
  v.max_len = 0  # tokens per sequence (prompt + completion); 0 = model.max_seq_len
  v.kv_layout = "paged"  # paged (pages allocated as a sequence grows, prefix sharing) | contiguous (max_len per slot)
  v.page_size = 16  # tokens per KV page
  v.num_pages = 0  # KV pages in the pool (one is a reserved scratch page); 0 = enough for max_batch x max_len
  v.prefix_sharing = True  # paged: requests with the same prompt prefix share its full pages (reference counted)
  v.prefill_chunk = 256  # prompt tokens per prefill step (longer prompts are prefilled in chunks); power of two
  v.attention = "auto"  # decode attention: auto (pallas on TPU/GPU, xla on CPU) | pallas (kernels_pallas paged
  #   kernel; paged layout) | xla (gather + masked einsum in plain JAX)
  v.weights = "none"  # weight quantization: none (model.dtype) | bf16 | int8 (per-channel) | int4 (group-wise)
  v.int4_group = 128  # int4: input channels per scale group
  v.fuse_projections = True  # decode with q|k|v and gate|up concatenated (one matmul each; float weights, heads and
  #   MLP unsplit): fewer, larger matmuls per step; false = the blocks' own weights
  v.kv_cache = "auto"  # KV cache storage: auto (model.dtype) | bf16 | float32 | int8 (per-page, per-head scales)
  v.max_queue = 256  # waiting requests beyond the running batch; more are refused (HTTP 429)
  v.speculative_k = 4  # draft tokens proposed per step when a draft model is given
  v.decode_steps = 8  # decode steps (or speculative rounds) per device call while no request waits to join the
  #   batch: amortises host work; tokens stream in groups of up to this many (1 = one token per call)
  v.seed = 0  # sampling seed of requests that give none
  v.model_name = ""  # name reported by /v1/models; "" = the workdir's directory name

  # ---- distillation (`maxlm train --config.distill.teacher=WORKDIR`): a student trained on a teacher's logits ----
  s = c.distill = config_dict.ConfigDict()
  s.teacher = ""  # workdir of the teacher (same tokenizer and vocabulary); "" = no distillation
  s.alpha = 0.5  # loss = alpha * KL(teacher || student at temperature T) * T^2 + (1 - alpha) * data loss
  s.temperature = 2.0  # softening temperature of both distributions in the KL term

  # ---- DPO (`--config.train.objective=dpo`): TRL's losses on preference pairs ----
  o = c.dpo = config_dict.ConfigDict()
  o.beta = 0.1  # strength of the implicit KL to the reference
  o.loss_type = "sigmoid"  # sigmoid | ipo | hinge | robust, as TRL defines them
  o.label_smoothing = 0.0  # conservative DPO (sigmoid, robust): the share of flipped preference labels
  o.reference = "base"  # base: the starting model, with LoRA the adapters switched off | precomputed: the starting
  #   model's log-probabilities of every pair, computed once (any run, full fine-tuning too) | none: reference-free
  o.pairs_per_row = 4  # most pairs packed into one row of data.seq_len

  # ---- LoRA / QLoRA (`maxlm train --workdir NEW --config.lora.base=WORKDIR --config.lora.rank=16`) ----
  # The base workdir's newest parameters stay frozen (no gradient, no optimizer state); the new workdir's
  # checkpoints hold only the adapters, and its config names the base. The model section comes from the base.
  r = c.lora = config_dict.ConfigDict()
  r.base = ""  # workdir of the frozen base model; "" = no LoRA (every parameter trains)
  r.rank = 16  # adapter rank r
  r.alpha = 32.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
  r.dropout = 0.0  # PEFT's lora_dropout: on each adapter's input while training (off in evals and serving)
  r.targets = r".*\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))"  # regex over projection paths (layers.3.attn.q, ...)
  r.rslora = False  # rank-stabilized scale alpha / sqrt(r)
  r.base_quant = "none"  # QLoRA: the adapted base weights stored as int8, int4 or nf4 (NormalFloat4 with double-
  #   quantized block scales, as QLoRA), dequantized inside the matmul
  r.base_quant_group = 64  # int4 / nf4 block size (input channels per scale; QLoRA's 64)
  return c
