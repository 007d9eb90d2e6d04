"""What one training run is asked to do: `TrainConfig`, Megatron-LM's flag names. Every field
is also a flag of examples/pretrain_medmoe.py (training/arguments.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medmoe_mcore.config.fields import ConfigError, option
from medmoe_mcore.conventions import DEFAULT_SEED
from medmoe_mcore.data.encoding import TEMPLATES
from medmoe_mcore.runtime.parallel import use_cuda
from medmoe_mcore.training.exits import EXIT_SIGNALS

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
STAGES = (1, 2, 3)


@dataclass
class TrainConfig:
    # Fields marked pipeline=False name a stage's own input and output: the demo pipeline
    # chooses those itself and refuses them.
    stage: Optional[int] = option(None, "train this one stage (1: projector, 2: projector + "
                                  "LLM, 3: experts + meta expert); without it: the whole demo "
                                  "pipeline", choices=STAGES, pipeline=False)
    data_path: Optional[list[str]] = option(
        None, "training data: a folder of tools/prepare_data.py, a weighted blend of them "
        "(`0.75 vqa 0.25 mnist`, Megatron's syntax) or an energon metadataset YAML",
        pipeline=False)
    valid_data_path: Optional[list[str]] = option(
        None, "validation data, the same forms: the loss on it every --eval-interval "
        "iterations", pipeline=False)
    num_workers: int = option(2, "data-loader worker processes per rank (decoding and "
                              "tokenising beside training; with any, the loader runs in a "
                              "helper process per rank); 0 reads in the training process")
    load_data_state: bool = option(True, "resume the data loader where the checkpoint left "
                                   "it; --no-load-data-state starts the data order afresh "
                                   "(the only way to resume at another data-parallel size, "
                                   "worker count or micro-batch size)")
    balanced_modality_batches: bool = option(
        False, "compose each rank's micro-batches from the modality mix of 8 micro-batches' "
        "worth of samples (the epoch's order otherwise kept; resumes exactly): with a fixed "
        "modality router the expert load follows the batch's modalities, so expert-parallel "
        "ranks stay balanced without an auxiliary loss")
    pack_sequences: bool = option(
        False, "pack several samples into each row of up to --seq-length tokens (energon's "
        "packing stage, first fit over 64 samples; resumes exactly), each attending to itself "
        "only with its positions from 0: less padding. --micro-batch-size then counts rows")
    eval_interval: Optional[int] = option(None, "iterations between validations (default "
                                          "1000, and at the end; needs --valid-data-path)")
    eval_iters: Optional[int] = option(None, "global batches per validation (default 100), "
                                       "the same ones each time, in file order")
    tokenizer: Optional[str] = option(None, "HF tokenizer folder or sentencepiece .model "
                                      "(default: the checkpoint's tokenizer/)", pipeline=False)
    template: Optional[str] = option(None, "prompt template (default: plain for stage 1, phi "
                                     "for stages 2-3)", choices=TEMPLATES, pipeline=False)
    train_iters: Optional[int] = option(None, "iterations (global batches) of the stage "
                                        "(pipeline: per stage, default 200)")
    micro_batch_size: int = option(4, "samples per micro-batch and data-parallel rank")
    global_batch_size: int = option(8, "samples per iteration over all data-parallel ranks "
                                    "(gradient accumulation makes up the rest)")
    seq_length: int = option(128, "maximum tokens per sample, image tokens included")
    lr: Optional[float] = option(None, "peak learning rate (pipeline default 1e-3)")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = option(
        "cosine", "learning-rate decay after the warm-up, by Megatron's scheduler (default "
        "cosine, the paper's; Megatron-LM's is linear)", choices=LR_DECAY_STYLES)
    lr_decay_iters: Optional[int] = option(None, "iterations over which the learning rate "
                                           "decays (default --train-iters)")
    lr_warmup_fraction: Optional[float] = option(
        None, "fraction of the decay iterations spent warming up (default 0.03 unless "
        "--lr-warmup-iters)")
    lr_warmup_iters: Optional[int] = option(None, "iterations spent warming up (instead of "
                                            "--lr-warmup-fraction)")
    lr_warmup_init: float = option(0.0, "learning rate at the start of the warm-up")
    lr_wsd_decay_style: str = option("exponential", "decay of WSD's last phase (with "
                                     "--lr-decay-style WSD)", choices=WSD_DECAY_STYLES)
    lr_wsd_decay_iters: Optional[int] = option(None, "iterations of WSD's decay phase (needed "
                                               "by --lr-decay-style WSD)")
    optimizer: str = option("adam", "Megatron's optimizer: adam (AdamW: decoupled weight "
                            "decay) or sgd", choices=("adam", "sgd"))
    adam_beta1: float = option(0.9, "Adam's first-moment decay")
    adam_beta2: float = option(0.999, "Adam's second-moment decay")
    adam_eps: float = option(1e-8, "Adam's denominator term")
    sgd_momentum: float = option(0.9, "SGD's momentum (with --optimizer sgd)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_grad: float = option(1.0, "gradient clipping by global norm")
    seed: int = option(DEFAULT_SEED, "random seed (model init, data order, dropout)")
    save: Optional[str] = option(None, "checkpoint root to save into", pipeline=False)
    load: Optional[str] = option(None, "resume exactly from this run's checkpoint root (model, "
                                 "optimizer, scheduler, RNG, data position); a folder without "
                                 "a checkpoint is an error, unless it is missing or empty and "
                                 "--pretrained-checkpoint is given (then the run starts from "
                                 "those weights, with a warning)", pipeline=False)
    ckpt_step: Optional[int] = option(None, "with --load: the iteration to load instead of the "
                                      "one latest_checkpointed_iteration.txt names (e.g. when "
                                      "that file is lost)", pipeline=False)
    finetune: bool = option(False, "with --load: its model weights only; iteration 0, new "
                            "optimizer, schedule, RNG and data order", pipeline=False)
    load_optim: bool = option(True, "resume the optimizer state; --no-load-optim starts Adam's "
                              "moments afresh (the learning-rate schedule still continues)",
                              pipeline=False)
    load_rng: bool = option(True, "resume the random state; --no-load-rng reseeds from --seed",
                            pipeline=False)
    save_optim: bool = option(True, "save the optimizer state (--no-save-optim: smaller "
                              "checkpoints; a resume from them needs --no-load-optim and is "
                              "not exact)")
    save_rng: bool = option(True, "save the random state (--no-save-rng: a resume from them "
                            "needs --no-load-rng)")
    override_opt_param_scheduler: bool = option(
        False, "on resume, the schedule flags (--lr, --min-lr, --lr-warmup-fraction, "
        "--train-iters) win over the checkpoint's scheduler (by default a difference is "
        "refused)", flag="--override-opt_param-scheduler", pipeline=False)
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "on resume, the checkpoint's scheduler wins over the schedule flags",
        flag="--use-checkpoint-opt_param-scheduler", pipeline=False)
    verify_checkpoint: bool = option(True, "check each loaded checkpoint file against the "
                                     "size and SHA-256 its save recorded "
                                     "(--no-verify-checkpoint skips it)")
    pretrained_checkpoint: Optional[str] = option(None, "start the stage from these weights "
                                                  "(the previous stage's checkpoint)",
                                                  pipeline=False)
    save_interval: Optional[int] = option(None, "save every N iterations (and at the end)")
    async_save: bool = option(
        False, "write checkpoints in a background process while training goes on (Megatron-"
        "Core's asynchronous dist-checkpointing); a checkpoint becomes the latest once every "
        "rank's files and checksums are complete")
    exit_interval: Optional[int] = option(None, "stop (after saving) at this iteration",
                                          pipeline=False)
    exit_signal_handler: bool = option(
        False, "on the --exit-signal (and SIGINT) every rank finishes its iteration, a "
        "checkpoint is saved to --save and the run exits 0 (Slurm sends SIGTERM before a job's "
        "time limit)")
    exit_signal: Optional[str] = option(None, "the signal --exit-signal-handler catches "
                                        "(default SIGTERM)", choices=EXIT_SIGNALS)
    exit_duration_in_mins: Optional[float] = option(
        None, "save and exit 0 once the process has run this many minutes (wall clock, checked "
        "after every iteration; leave the time a save takes before the allocation ends)")
    log_interval: int = option(10, "iterations per log line and TensorBoard point")
    check_for_nan_in_loss_and_grad: bool = option(
        True, "stop after --max-nan-iterations consecutive iterations whose loss or gradients "
        "are not finite (each is skipped: no update)")
    max_nan_iterations: int = option(3, "consecutive non-finite iterations that stop the run")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard logs (one subfolder per stage)")
    wandb_project: Optional[str] = option(
        None, "log to this Weights & Biases project as well (rank 0; the scalars TensorBoard "
        "gets, and the run's configuration; needs `pip install wandb`; WANDB_MODE=offline "
        "keeps the run on disk)")
    wandb_exp_name: Optional[str] = option(None, "the W&B experiment name (each stage's run "
                                           "is <name>-stage<N>, grouped under <name>)")
    wandb_save_dir: Optional[str] = option(None, "where W&B keeps its run files (default: "
                                           "<--save>/wandb)")
    log_throughput: bool = option(False, "add the model TFLOP/s per GPU to each log line and "
                                  "to the logs as `throughput` (models/flops.py)")
    log_params_norm: bool = option(False, "add the parameters' L2 norm to each log line and to "
                                   "the logs as `params-norm`")
    tensorboard_log_interval: int = option(
        1, "iterations between the points of loss, learning rate and grad norm in TensorBoard "
        "and W&B (the log line's window figures, tokens/s and time, come every --log-interval)")
    ckpt_format: str = option("torch_dist", "checkpoint format: Megatron-Core's torch_dist, the "
                              "only one written and read", choices=("torch_dist",))
    manual_gc: bool = option(False, "pause Python's automatic garbage collector for the run and "
                             "collect at set points instead (no rank stalls at random)")
    manual_gc_interval: int = option(0, "with --manual-gc: iterations between collections (0: "
                                     "only at the start and after validations)")
    manual_gc_eval: bool = option(True, "with --manual-gc: collect after each validation")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over data-parallel "
                                             "ranks (Megatron's distributed optimizer)")
    overlap_grad_reduce: bool = option(
        False, "reduce gradients bucket by bucket while the backward pass still runs (Megatron "
        "DDP's overlap)")
    overlap_param_gather: bool = option(
        False, "gather the distributed optimizer's updated parameters bucket by bucket during "
        "the next forward pass (needs --use-distributed-optimizer)")
    ddp_bucket_size: Optional[int] = option(
        None, "parameters per gradient-reduction bucket (Megatron's default: max(40M, 1M x "
        "data-parallel size) when overlapping, one bucket otherwise)")
    train_projector: bool = option(True, "stage 3 also trains the projector (the authors' "
                                   "name filter does)")
    bf16: bool = option(False, "train in bfloat16 (parameters and activations)")
    moe_expert_capacity_factor: Optional[float] = option(
        None, "learned-router baseline: each expert takes at most this factor x its even share "
        "of the tokens in training, the rest dropped (Megatron's; inference and exports "
        "compute every token)")
    moe_token_drop_policy: Literal["probs", "position"] = option(
        "probs", "with --moe-expert-capacity-factor: drop the lowest-probability tokens, or the "
        "last ones")
    moe_pad_expert_input_to_capacity: bool = option(
        False, "with --moe-expert-capacity-factor: pad every expert's input to its capacity")
    calculate_per_token_loss: bool = option(
        False, "Megatron-LM's: the loss is the mean over every supervised token of the global "
        "batch (gradients scaled by its token count over all data-parallel ranks); by default "
        "each micro-batch's per-token mean is averaged (the authors' semantics)")
    recompute_granularity: Optional[Literal["full", "selective"]] = option(
        None, "activation recomputation to save memory: full (whole layers) or selective (the "
        "attention core)")
    recompute_activations: bool = option(False, "Megatron-LM's shorthand for "
                                         "--recompute-granularity selective")
    recompute_method: Optional[Literal["uniform", "block"]] = option(
        None, "with --recompute-granularity full: uniform (every layer, in chunks of "
        "--recompute-num-layers; the default) or block (only the first --recompute-num-layers "
        "layers)")
    recompute_num_layers: Optional[int] = option(None, "with --recompute-granularity full: the "
                                                 "chunk size (uniform) or the number of layers "
                                                 "recomputed (block); default 1")

    def validate(self, dp: int) -> "TrainConfig":
        """Every flag value, before anything is read or built; each error names the flag."""
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage}: must be one of {STAGES}")
        missing = [flag for flag, value in (("--data-path", self.data_path),
                                            ("--train-iters", self.train_iters),
                                            ("--lr", self.lr)) if value is None]
        if self.load is None and self.pretrained_checkpoint is None:
            missing.append("--load or --pretrained-checkpoint")
        if missing:
            raise ConfigError(f"--stage {self.stage} needs {', '.join(missing)}")
        for flag, paths in (("--data-path", self.data_path),
                            ("--valid-data-path", self.valid_data_path)):
            if paths is not None and not any(str(p).strip() for p in paths):
                raise ConfigError(f"{flag}: empty")
        checks = [
            ("--lr", self.lr, self.lr >= 0, "must be 0 or more"),
            ("--min-lr", self.min_lr, self.lr < 0 or 0 <= self.min_lr <= self.lr,
             f"must be between 0 and --lr {self.lr}"),
            ("--lr-warmup-fraction", self.lr_warmup_fraction,
             self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction <= 1,
             "must be in [0, 1]"),
            ("--lr-warmup-iters", self.lr_warmup_iters,
             self.lr_warmup_iters is None or self.lr_warmup_iters >= 0, "must be 0 or more"),
            ("--lr-warmup-init", self.lr_warmup_init, 0 <= self.lr_warmup_init,
             "must be 0 or more"),
            ("--adam-beta1", self.adam_beta1, 0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
            ("--adam-beta2", self.adam_beta2, 0 <= self.adam_beta2 < 1, "must be in [0, 1)"),
            ("--adam-eps", self.adam_eps, self.adam_eps > 0, "must be more than 0"),
            ("--sgd-momentum", self.sgd_momentum, 0 <= self.sgd_momentum < 1,
             "must be in [0, 1)"),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "must be 0 or more"),
            ("--clip-grad", self.clip_grad, self.clip_grad >= 0, "must be 0 or more"),
            ("--num-workers", self.num_workers, self.num_workers >= 0, "must be 0 or more"),
            ("--manual-gc-interval", self.manual_gc_interval, self.manual_gc_interval >= 0,
             "must be 0 or more"),
            ("--ckpt-step", self.ckpt_step, self.ckpt_step is None or self.ckpt_step >= 0,
             "must be 0 or more"),
        ] + [(flag, value, value is None or value >= 1, "must be a positive integer")
             for flag, value in (("--train-iters", self.train_iters),
                                 ("--micro-batch-size", self.micro_batch_size),
                                 ("--global-batch-size", self.global_batch_size),
                                 ("--seq-length", self.seq_length),
                                 ("--save-interval", self.save_interval),
                                 ("--exit-interval", self.exit_interval),
                                 ("--log-interval", self.log_interval),
                                 ("--tensorboard-log-interval", self.tensorboard_log_interval),
                                 ("--eval-interval", self.eval_interval),
                                 ("--eval-iters", self.eval_iters),
                                 ("--lr-decay-iters", self.lr_decay_iters),
                                 ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
                                 ("--max-nan-iterations", self.max_nan_iterations))]
        bad = [f"{flag} {value}: {why}" for flag, value, ok, why in checks if not ok]
        if bad:
            raise ConfigError("; ".join(bad))
        self._check_schedule_flags()
        if self.valid_data_path is None:
            asked = [f for f, v in (("--eval-interval", self.eval_interval),
                                    ("--eval-iters", self.eval_iters)) if v is not None]
            if asked:
                raise ConfigError(f"{', '.join(asked)} without --valid-data-path: there is no "
                                  "validation data to evaluate")
        without_load = [flag for flag, given in (("--ckpt-step", self.ckpt_step is not None),
                                                 ("--finetune", self.finetune)) if given]
        if without_load and self.load is None:
            raise ConfigError(f"{', '.join(without_load)} without --load")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather without --use-distributed-optimizer: "
                              "only the distributed optimizer gathers parameters")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size {self.ddp_bucket_size}: must be a positive "
                              "integer")
        if self.exit_signal is not None and not self.exit_signal_handler:
            raise ConfigError(f"--exit-signal {self.exit_signal} without --exit-signal-handler: "
                              "no handler would catch it")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins {self.exit_duration_in_mins}: must be "
                              "more than 0")
        early = [f for f, on in (("--exit-signal-handler", self.exit_signal_handler),
                                 ("--exit-duration-in-mins",
                                  self.exit_duration_in_mins is not None)) if on]
        if early and self.save is None:
            raise ConfigError(f"{', '.join(early)} without --save: the run would stop without "
                              "a checkpoint of its work")
        if self.pack_sequences and self.balanced_modality_batches:
            raise ConfigError("--pack-sequences and --balanced-modality-batches both regroup "
                              "samples in energon's packing stage: choose one")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt_param-scheduler and "
                              "--use-checkpoint-opt_param-scheduler: choose one")
        self.check_precision()
        self._check_wandb()
        capacity = [f for f, v in (("--moe-token-drop-policy", self.moe_token_drop_policy
                                    != "probs"),
                                   ("--moe-pad-expert-input-to-capacity",
                                    self.moe_pad_expert_input_to_capacity)) if v]
        if capacity and self.moe_expert_capacity_factor is None:
            raise ConfigError(f"{', '.join(capacity)} without --moe-expert-capacity-factor")
        if self.moe_expert_capacity_factor is not None and not \
                self.moe_expert_capacity_factor > 0:
            raise ConfigError(f"--moe-expert-capacity-factor {self.moe_expert_capacity_factor}: "
                              "must be more than 0")
        if self.recompute_activations and self.recompute_granularity == "full":
            raise ConfigError("--recompute-activations (selective) and --recompute-granularity "
                              "full: choose one")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                              f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                              f"{dp}")
        return self

    def check_precision(self) -> None:
        """--bf16 only where Megatron's mixed-precision optimizer can run."""
        if self.bf16 and not use_cuda():
            raise ConfigError("--bf16: Megatron's mixed-precision optimizer needs CUDA tensors "
                              "and this run is on CPU (no GPU, or MEDMOE_DEVICE=cpu); train in "
                              "float32 here, or on a GPU")

    def _check_wandb(self) -> None:
        """Megatron-LM's rules for its W&B flags, and the package there before any work."""
        given = [f for f, v in (("--wandb-exp-name", self.wandb_exp_name),
                                ("--wandb-save-dir", self.wandb_save_dir)) if v is not None]
        if self.wandb_project is None:
            if given:
                raise ConfigError(f"{', '.join(given)} without --wandb-project")
            return
        if not self.wandb_exp_name:
            raise ConfigError(f"--wandb-project {self.wandb_project} needs --wandb-exp-name "
                              "(the experiment's name; Megatron-LM requires it too)")
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"--wandb-project {self.wandb_project}: the wandb package is not "
                              "installed here (pip install 'medmoe-mcore[wandb]')")

    def _check_schedule_flags(self) -> None:
        """The warm-up's two forms exclusive; WSD's decay inside the decay; Megatron-LM's
        rules, each refusal naming the flags."""
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise ConfigError("--lr-warmup-iters and --lr-warmup-fraction: choose one")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters is not None and self.lr_warmup_iters > decay:
            raise ConfigError(f"--lr-warmup-iters {self.lr_warmup_iters}: more than the "
                              f"{decay} decay iterations (--lr-decay-iters / --train-iters)")
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None or self.lr_wsd_decay_iters > decay:
                raise ConfigError(f"--lr-decay-style WSD needs --lr-wsd-decay-iters between 1 "
                                  f"and the {decay} decay iterations (got "
                                  f"{self.lr_wsd_decay_iters})")
        else:
            typed = [f for f, v in (("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
                                    ("--lr-wsd-decay-style", self.lr_wsd_decay_style
                                     if self.lr_wsd_decay_style != "exponential" else None))
                     if v is not None]
            if typed:
                raise ConfigError(f"{', '.join(typed)} without --lr-decay-style WSD")

    def schedule(self) -> dict:
        """The learning-rate schedule these flags ask for, in the keys of Megatron's
        OptimizerParamScheduler state (which every checkpoint holds)."""
        decay = self.lr_decay_iters or self.train_iters
        warmup = self.lr_warmup_iters if self.lr_warmup_iters is not None else \
            int((0.03 if self.lr_warmup_fraction is None else self.lr_warmup_fraction) * decay)
        return dict(max_lr=self.lr, min_lr=self.min_lr, lr_warmup_steps=warmup,
                    lr_decay_steps=decay, lr_decay_style=self.lr_decay_style)

    def run_flags(self) -> dict:
        """What a resume must agree on beyond Megatron's scheduler state: the scheduler's
        arguments it does not save, and the optimizer's hyperparameters (a loaded optimizer
        state would silently bring back its own)."""
        return dict(init_lr=self.lr_warmup_init, lr_wsd_decay_style=self.lr_wsd_decay_style
                    if self.lr_decay_style == "WSD" else None,
                    wsd_decay_steps=self.lr_wsd_decay_iters, optimizer=self.optimizer,
                    adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2,
                    adam_eps=self.adam_eps, sgd_momentum=self.sgd_momentum)

    @property
    def validation(self) -> Optional[tuple[int, int]]:
        """(eval interval, eval iters) with Megatron-LM's defaults, or None without data."""
        if self.valid_data_path is None:
            return None
        return self.eval_interval or 1000, self.eval_iters or 100

    @property
    def template_or_default(self) -> str:
        return self.template or ("plain" if self.stage == 1 else "phi")
