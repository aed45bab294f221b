"""Every script's options, declared once: the one table argparse, --help, --config and the
embedded default are generated from.

    p = options.parser("cpt", __doc__)          # flags, defaults, help, embedded-default epilog
    args, given = flags.parse(p, argv, stage="cpt")
    changed = options.apply_embedded(args, given, "cpt")   # the demo model's settings, where not given

An `Option` is one flag: its name, parse function (a cli.flags type), default, help, group, the
embedded default's value, and the LLaMA-Factory keys (`LF`) that set it, with LLaMA-Factory's
default where a recipe is silent. The training options are declared once (`_training`) and
each training stage adds its own; a `Stage` records its recommended values (lr, LoRA alpha,
epochs: cpt 1e-4 / 16 / 2, sft 5e-5 / 32 / 1, dpo 5e-6 / 32 / 1, reward 1e-4 / 32 / 1) and its embedded-default
values (the tiny demo model on 2 CPU cores), written into its options.

From the table: `parser(stage)` (argparse), `Stage.keys` (the --config keys: each option's
dest), `lf_keys()` / `lf_list_keys()` / `lf_defaults()` / `lf_rivals()` (cli/config_file.py's
LLaMA-Factory tables), `describe_embedded` (the --help epilog) and `apply_embedded`. The library's
own settings stay `train.TrainConfig`; `cli.runtime.train_config` maps these options onto it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Union

from . import flags, llama_factory as lf, paths

FINETUNING = ("lora", "full", "full-then-lora")
DTYPES = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
TRAINING_STAGES = ("cpt", "sft", "dpo", "reward", "grpo", "kto")
# What a training run uses where the option stays unset (None, so that "not given" can be told):
# the warm-up when neither --warmup-steps nor --warmup-ratio is given, and the share of the steps
# trained in full with --finetuning full-then-lora. The length is the stage's `recommended` epochs.
WARMUP_RATIO = 0.03
FULL_FRACTION = 0.5
_UNSET = object()   # Option.lf_default when LLaMA-Factory's default is not ours to apply


@dataclass(frozen=True)
class LF:
    """A LLaMA-Factory recipe key that sets an option. `translate(value, values, file, stage)`
    gives (dest, value) pairs (None: the value as it is; `positive`: only a value > 0, HF's
    -1 / 0 meaning "not set"); `lists`: the key may hold a list."""

    key: str
    translate: Optional[lf.Translation] = None
    positive: bool = False
    lists: bool = False

    def translation(self, dest: str) -> lf.Translation:
        if self.translate is not None:
            return self.translate
        return lf.positive_or_off(dest) if self.positive else lf.same(dest)


@dataclass(frozen=True)
class Option:
    """One flag. `type` parses and checks a token (argparse's type=); `embedded` is the
    embedded default's value (None: it runs with `default`); `lf` the LLaMA-Factory keys that
    set it and `lf_default` what such a recipe runs with where it sets none; `rival` the other
    of a pair (--epochs / --max-steps, --warmup-steps / --warmup-ratio): a default or embedded
    value of this option is not filled in when the rival was set. `exclusive` names a mutually
    exclusive group; `action`, `nargs`, `metavar`, `choices`, `dest` are argparse's."""

    flag: str
    help: str
    type: Optional[Callable[[str], Any]] = None
    default: Any = None
    group: Optional[str] = None
    choices: Optional[tuple] = None
    action: Union[str, type, None] = None
    nargs: Optional[str] = None
    metavar: Optional[str] = None
    dest: Optional[str] = None
    exclusive: Optional[str] = None
    embedded: Any = None
    lf: tuple[LF, ...] = ()
    lf_default: Any = _UNSET
    rival: Optional[str] = None

    @property
    def name(self) -> str:
        """The dest: the namespace attribute and the --config key (lora_r for --lora-r)."""
        return self.dest or self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict:
        kw: dict[str, Any] = {"help": self.help}
        if self.action in ("store_true", "store_false"):
            return {**kw, "action": self.action}
        for key in ("type", "choices", "action", "nargs", "metavar", "dest"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        if self.default is not None:
            kw["default"] = self.default
        return kw


@dataclass(frozen=True)
class Stage:
    """One script's options. `recommended`: the stage's own values of shared options: the
    default of each (lr, lora_alpha), or for one of a pair, whose parsed value stays None when
    not given (epochs), what a run takes when neither of the pair is given (named in --help).
    `embedded`: the values the embedded default (no --model) runs with, in the order
    the --help epilog lists them. `lf_stage`: the stage a LLaMA-Factory recipe's `stage` key is
    checked against (None: any). `config_aliases`: other --config keys -> the option they set (TRL's
    config names, e.g. KTOConfig's max_length for max_len)."""

    prog: str
    options: tuple[Option, ...]
    recommended: dict = field(default_factory=dict)
    embedded: dict = field(default_factory=dict)
    lf_stage: Optional[str] = None
    config_aliases: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        for key in set(self.recommended) | set(self.embedded) | set(self.config_aliases.values()):
            if key not in names:
                raise ValueError(f"{self.prog}: {key!r} is not one of its options")
        resolved = []
        for o in self.options:
            value = self.recommended.get(o.name)
            if value is not None and o.rival is None:
                o = replace(o, default=value)
            elif value is not None:
                o = replace(o, help=f"{o.help} (default: {value:g})")
            if o.name in self.embedded:
                o = replace(o, embedded=self.embedded[o.name])
            resolved.append(o)
        object.__setattr__(self, "options", tuple(resolved))

    @property
    def keys(self) -> set[str]:
        """The --config keys in our names (each also spelled with dashes)."""
        return {o.name for o in self.options} - {"config"}


# ---------------------------------------------------------------------- the training options
_DEFAULT_MODEL = {"cpt": "the embedded demo model", "sft": f"{paths.MERGED_OUT}, merge.py's output",
                  "dpo": f"{paths.SFT_OUT / 'merged'}, sft.py's output",
                  "reward": f"{paths.SFT_OUT / 'merged'}, sft.py's output",
                  "grpo": f"{paths.DPO_OUT / 'merged'}, dpo.py's output, else {paths.SFT_OUT / 'merged'}",
                  "kto": f"{paths.SFT_OUT / 'merged'}, sft.py's output"}
_DEFAULT_OUT = {"cpt": paths.CPT_OUT, "sft": paths.SFT_OUT, "dpo": paths.DPO_OUT, "reward": paths.REWARD_OUT,
                "grpo": paths.GRPO_OUT, "kto": paths.KTO_OUT}
_CONFIG = Option("--config", metavar="FILE",
                 help="YAML or JSON file of flag values (our flag names, e.g. lora-r or lora_r, or LLaMA-Factory's "
                      "keys: what such a recipe leaves out takes LLaMA-Factory's / HF's defaults, e.g. lora_rank 8, "
                      "lora_alpha 2 x rank, lr 5e-5 linear, seed 42); flags on the command line win")
_CHAT_TEMPLATE = Option("--chat-template-kwargs", metavar="JSON", type=flags.template_kwargs,
                        help="chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' or "
                             "'{\"preserve_thinking\": true}' (a record's own \"chat_template_kwargs\" win)")
_OVERWRITE = Option("--overwrite", action="store_true",
                    help="replace an --out these scripts wrote earlier (never a folder they did not write)")


def _training(stage: str) -> tuple[Option, ...]:
    """The options every training stage shares; `stage` picks the data options and defaults."""
    g = "model and data"
    data: tuple[Option, ...]
    if stage == "cpt":
        data = (
            Option("--data", metavar="PATH", nargs="+", group=g, lf=(LF("dataset", lf.datasets, lists=True),),
                   help="text corpus: .txt/.jsonl/.jsonl.gz files or directories"),
            Option("--block-size", type=flags.int_at_least(2), default=2048, group=g, lf=(LF("cutoff_len", lf.cutoff_len),),
                   lf_default=2048, help="tokens per packed training block"),
        )
    else:
        what = {"sft": "SFT file(s): messages (with tools), alpaca or ShareGPT",
                "grpo": "prompts: a 'prompt' column (text or messages); the other columns go to the rewards",
                "kto": "unpaired rows: prompt + completion + label (TRL), messages + label (LLaMA-Factory), "
                       "or preference pairs (unpaired: chosen -> label true, rejected -> false)"}.get(
            stage, "preference pairs: prompt/messages + chosen + rejected (TRL or LLaMA-Factory format)"
            + (", optional margin" if stage == "reward" else ""))
        data = (
            Option("--data", metavar="FILE.jsonl", nargs="+", group=g, help=what,
                   lf=(LF("dataset", lf.datasets, lists=True),)),
            Option("--eval-data", metavar="FILE.jsonl", group=g, help="held-out file (default: a split of --data)",
                   lf=(LF("eval_dataset", lf.eval_dataset, lists=True),)),
            Option("--max-len", type=flags.int_at_least(2), default=1024, group=g, lf=(LF("cutoff_len", lf.cutoff_len),),
                   lf_default=2048, help="longest prompt in tokens (longer ones keep their end)" if stage == "grpo"
                   else "longest sample in tokens"),
        )
    return (
        Option("--model", metavar="DIR", group=g, lf=(LF("model_name_or_path"),),
               help=f"HF-format Qwen checkpoint directory (config.json + safetensors) (default: {_DEFAULT_MODEL[stage]})"),
        *data,
        Option("--eval-fraction", type=flags.ratio, default=0.05, group=g, lf=(LF("val_size", lf.val_size),),
               lf_default=0.0, help="fraction of documents/samples held out for evaluation"),
        Option("--out", metavar="DIR", default=str(_DEFAULT_OUT[stage]), group=g, lf=(LF("output_dir"),),
               help="output directory (adapter/, checkpoints/, metrics.jsonl, run.json)"),

        Option("--finetuning", choices=FINETUNING, default="lora", group="fine-tuning mode",
               lf=(LF("finetuning_type", lf.finetuning_type),),
               help="train LoRA adapters, every parameter, or every parameter first and then adapters"),
        Option("--full-fraction", type=flags.open_ratio, group="fine-tuning mode",
               help=f"with --finetuning full-then-lora: the fraction of the steps trained in full "
                    f"(default: {FULL_FRACTION:g})"),
        Option("--qlora", action="store_true", group="fine-tuning mode", lf=(LF("quantization_bit", lf.quantization_bit),),
               help="quantise the frozen base to NF4 (QLoRA; LoRA only)"),
        Option("--fsdp", action="store_true", group="fine-tuning mode",
               help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (default: DDP)"),

        Option("--lora-r", type=flags.positive_int, default=16, group="LoRA", lf=(LF("lora_rank"),), lf_default=8,
               help="LoRA rank"),
        # LLaMA-Factory's default alpha is twice the rank (cli/config_file.py computes it)
        Option("--lora-alpha", type=flags.non_negative_float, group="LoRA", lf=(LF("lora_alpha"),),
               help="LoRA alpha (scale = alpha/r)"),
        Option("--lora-dropout", type=flags.ratio, default=0.05, group="LoRA", lf=(LF("lora_dropout"),), lf_default=0.0,
               help="dropout on the LoRA input"),
        Option("--lora-targets", default="all-linear", group="LoRA", lf=(LF("lora_target", lf.lora_target, lists=True),),
               lf_default="all-linear", help="'all-linear' or comma-separated module names (q_proj,k_proj,...)"),
        Option("--use-rslora", action="store_true", group="LoRA", lf=(LF("use_rslora"),),
               help="rank-stabilised scale alpha/sqrt(r) (rsLoRA)"),
        Option("--use-dora", action="store_true", group="LoRA", lf=(LF("use_dora"),),
               help="weight-decomposed adapters (DoRA)"),

        Option("--lr", type=flags.positive_float, group="optimisation", lf=(LF("learning_rate"),), lf_default=5e-5,
               help="peak learning rate"),
        # Both of a pair may be given (a LLaMA-Factory recipe often does): as in HF's Trainer, the
        # step count wins.
        Option("--warmup-steps", type=flags.non_negative_int, group="optimisation", rival="warmup_ratio",
               lf=(LF("warmup_steps", positive=True),), lf_default=0,
               help="linear warm-up steps from lr 0, as HF's schedules; wins over --warmup-ratio "
                    f"(default: --warmup-ratio {WARMUP_RATIO:g})"),
        Option("--warmup-ratio", type=flags.ratio, group="optimisation", rival="warmup_steps",
               lf=(LF("warmup_ratio", positive=True),), help="linear warm-up as a fraction of all steps"),
        Option("--epochs", type=flags.positive_float, group="optimisation", rival="max_steps",
               lf=(LF("num_train_epochs"),), lf_default=3.0, help="passes over the data"),
        Option("--max-steps", type=flags.positive_int, group="optimisation", rival="epochs",
               lf=(LF("max_steps", positive=True),),
               help="optimizer steps; wins over --epochs when both are given, as HF's max_steps"),
        Option("--lr-scheduler", choices=SCHEDULES, default="cosine", group="optimisation",
               lf=(LF("lr_scheduler_type", lf.scheduler),), lf_default="linear",
               help="after the warm-up: cosine or linear decay to 0, or constant"),
        Option("--batch-size", type=flags.positive_int, default=1, group="optimisation",
               lf=(LF("per_device_train_batch_size"),), lf_default=8, help="micro-batch per process"),
        Option("--grad-accum", type=flags.positive_int, default=16, group="optimisation",
               lf=(LF("gradient_accumulation_steps"),), lf_default=1, help="micro-batches per optimizer step"),
        Option("--max-grad-norm", type=flags.non_negative_float, default=1.0, group="optimisation",
               lf=(LF("max_grad_norm"),), lf_default=1.0, help="gradient clipping (0: off)"),
        Option("--weight-decay", type=flags.non_negative_float, default=0.0, group="optimisation",
               lf=(LF("weight_decay"),), lf_default=0.0, help="decoupled weight decay"),
        Option("--dtype", choices=DTYPES, group="optimisation",
               lf=(LF("bf16", lf.precision), LF("fp16", lf.precision), LF("pure_bf16", lf.precision)),
               help="compute dtype (default: bf16 on a GPU, fp32 on a CPU, where bf16 matmuls are slower)"),
        Option("--no-grad-checkpointing", action="store_true", group="optimisation",
               lf=(LF("disable_gradient_checkpointing", lf.gradient_checkpointing_off),
                   LF("gradient_checkpointing", lf.gradient_checkpointing)),
               help="keep activations instead of recomputing"),
        Option("--long-context-tile", type=flags.non_negative_int, default=4096, group="optimisation",
               help="in a forward of more than --long-context-from tokens: tokens per MLP tile and queries "
                    "per block of masked attention (exact, recomputed in backward; 0: off)"),
        Option("--long-context-from", type=flags.non_negative_int, default=8192, group="optimisation",
               help="tokens per forward (batch x length) above which the long-context tiling switches on"),
        Option("--offload-activations", action="store_true", group="optimisation",
               help="with gradient checkpointing on a GPU: keep each layer's saved input in pinned CPU "
                    "memory until backward (refused on a CPU)"),
        Option("--seed", type=flags.seed, default=0, group="optimisation", lf=(LF("seed"),), lf_default=42,
               help="seed of initialisation, dropout and data order"),

        Option("--eval-every", type=flags.positive_int, group="evaluation, checkpoints and logging",
               lf=(LF("eval_steps", positive=True),), help="evaluate every N steps (default: at the end)"),
        Option("--save-every", type=flags.positive_int, group="evaluation, checkpoints and logging",
               lf=(LF("save_steps", positive=True),), lf_default=500, help="checkpoint every N steps (default: at the end)"),
        Option("--keep-last", type=flags.positive_int, default=2, group="evaluation, checkpoints and logging",
               lf=(LF("save_total_limit", positive=True),), help="checkpoints kept (plus the best by eval loss)"),
        Option("--log-every", type=flags.positive_int, group="evaluation, checkpoints and logging",
               lf=(LF("logging_steps", positive=True),), lf_default=500,
               help="without a terminal: a progress line every N steps (default: about 20 lines per run)"),
        Option("--report-to", choices=("none", "tensorboard"), default="none", group="evaluation, checkpoints and logging",
               lf=(LF("report_to", lf.report_to, lists=True),),
               help="also write TensorBoard event files under --out/runs (metrics.jsonl is always written)"),
        Option("--resume", action="store_true", group="evaluation, checkpoints and logging",
               lf=(LF("resume_from_checkpoint", lf.resume),), help="continue the run in --out from its newest checkpoint"),
        Option("--overwrite", action="store_true", group="evaluation, checkpoints and logging",
               lf=(LF("overwrite_output_dir", lf.overwrite),),
               help="delete the earlier run in --out (only a folder these scripts wrote) and start over"),
        _CONFIG,
    )


def _chat_outputs(sample_questions: int) -> tuple[Option, ...]:
    """What a chat stage (sft, dpo) writes besides the adapter, the held-out answers it shows
    before and after training, and the chat-template variables it renders with."""
    return (
        Option("--no-merge", action="store_true", help="write only adapter/, not merged/"),
        Option("--sample-questions", type=flags.non_negative_int, default=sample_questions,
               help="held-out questions answered before/after"),
        Option("--sample-tokens", type=flags.positive_int, default=48, help="tokens per sample answer"),
        _CHAT_TEMPLATE,
    )


CPT = Stage("cpt.py", options=(
    *_training("cpt"),
    Option("--text-field", default="text", help="field holding the text in .jsonl data"),
    Option("--no-document-mask", action="store_true",
           help="let attention cross document boundaries inside a packed block (plain concatenation)"),
    Option("--sample-prompt", default="The json module", help="prompt of the completion printed before and after training"),
    Option("--sample-tokens", type=flags.positive_int, default=40, help="tokens of that completion"),
    Option("--sample-temperature", type=flags.non_negative_float, default=0.8,
           help="sampling temperature of that completion (0 = greedy; top-p 0.9, seed 0 either way)"),
), recommended=dict(lr=1e-4, lora_alpha=16.0, epochs=2.0),   # CPT: lr 1e-4, alpha = r, 2 epochs
    embedded=dict(block_size=256, batch_size=4, grad_accum=2, max_steps=40, lr=2e-3, warmup_steps=4,
                  lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20), lf_stage="cpt")

SFT = Stage("sft.py", options=(
    *_training("sft"),
    Option("--format", choices=("auto", "messages", "alpaca", "sharegpt"), default="auto", help="format of --data lines"),
    *_chat_outputs(sample_questions=3),
), recommended=dict(lr=5e-5, lora_alpha=32.0, epochs=1.0),   # SFT: lr 5e-5, alpha = 2r, 1 epoch
    embedded=dict(max_len=256, batch_size=8, grad_accum=1, max_steps=40, lr=2e-3, warmup_steps=4,
                  lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20), lf_stage="sft")

_PREFERENCE = "preference objective"
DPO = Stage("dpo.py", options=(
    *_training("dpo"),
    Option("--loss", choices=("sigmoid", "ipo", "simpo", "orpo"), default="sigmoid", group=_PREFERENCE,
           lf=(LF("pref_loss", lf.pref_loss),), help="sigmoid (DPO), ipo, or the reference-free simpo / orpo"),
    Option("--beta", type=flags.positive_float, default=0.1, group=_PREFERENCE, lf=(LF("pref_beta"),),
           help="β: strength of the preference"),
    Option("--label-smoothing", type=flags.ratio, default=0.0, group=_PREFERENCE, lf=(LF("dpo_label_smoothing"),),
           help="ε of conservative DPO / SimPO: the share of pairs assumed mislabelled"),
    Option("--simpo-gamma", type=flags.non_negative_float, default=0.5, group=_PREFERENCE, lf=(LF("simpo_gamma"),),
           help="SimPO's target reward margin γ"),
    Option("--reference", choices=("adapters", "precomputed"), default="adapters", group=_PREFERENCE,
           help="DPO / IPO reference: the model with adapters disabled at every step, or its log-probs "
                "computed once before training"),
    Option("--max-prompt-len", type=flags.positive_int, group=_PREFERENCE,
           help="tokens the prompt keeps when a pair is too long (default: half of --max-len)"),
    *_chat_outputs(sample_questions=2),
), recommended=dict(lr=5e-6, lora_alpha=32.0, epochs=1.0),   # DPO: a low lr, 1 epoch
    embedded=dict(max_len=256, batch_size=4, grad_accum=2, max_steps=40, lr=5e-3, warmup_steps=4,
                  lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20, beta=0.1), lf_stage="dpo")

_GRPO = "GRPO (TRL GRPOConfig's names)"
_GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
GRPO = Stage("grpo.py", options=(
    *_training("grpo"),
    Option("--reward", metavar="FN", action="append", dest="reward", group=_GRPO,
           help="a reward: 'accuracy' (answer column, math normalisation), 'format' (<think>..</think><answer>..</answer>), "
                "FILE.py:NAME (a TRL-style function), or a reward-model folder; repeatable (default: the demo's)"),
    Option("--reward-weights", metavar="W", nargs="+", type=flags.finite_float, group=_GRPO,
           help="one weight per --reward (default: 1 each)"),
    Option("--num-generations", type=flags.int_at_least(2), default=8, group=_GRPO,
           help="G: completions per prompt (the group of the advantages)"),
    Option("--max-completion-length", type=flags.positive_int, default=256, group=_GRPO,
           help="tokens a completion may have (then it is clipped)"),
    Option("--temperature", type=flags.positive_float, default=1.0, group=_GRPO, help="sampling temperature"),
    Option("--top-p", type=flags.unit_interval, default=1.0, group=_GRPO, help="nucleus sampling mass"),
    Option("--top-k", type=flags.non_negative_int, default=0, group=_GRPO, help="top-k sampling (0: off)"),
    Option("--beta", type=flags.non_negative_float, default=0.0, group=_GRPO,
           help="KL coefficient against the reference (the model with its adapters disabled); 0: no KL term"),
    Option("--epsilon", type=flags.positive_float, default=0.2, group=_GRPO, help="clipping ε (lower bound 1 - ε)"),
    Option("--epsilon-high", type=flags.positive_float, group=_GRPO, help="upper clipping bound 1 + ε_high (default: ε)"),
    Option("--loss-type", choices=_GRPO_LOSSES, default="dapo", group=_GRPO,
           help="loss normalisation: dapo (tokens of the whole batch, TRL's default), grpo, dr_grpo, bnpo"),
    Option("--importance-sampling-level", choices=("token", "sequence"), default="token", group=_GRPO,
           help="token ratios, or one ratio per sequence (GSPO)"),
    Option("--scale-rewards", choices=("group", "batch", "none"), default="group", group=_GRPO,
           help="advantages divided by the group's std, the batch's, or not at all (Dr. GRPO)"),
    Option("--num-iterations", type=flags.positive_int, default=1, group=_GRPO,
           help="μ: optimizer steps per generation (with the old log-probs)"),
    Option("--log-completions", action="store_true", group=_GRPO,
           help="write every completion, its rewards and advantage to --out/completions.jsonl"),
    Option("--sample-prompts", type=flags.non_negative_int, default=16,
           help="held-out prompts whose completions' mean reward is printed before and after training"),
    Option("--held-out-samples", type=flags.non_negative_int, default=4,
           help="completions sampled per held-out prompt (the training's sampling settings, seeded; "
                "the same draws before and after); 0: one greedy completion each"),
    Option("--no-merge", action="store_true", help="write only adapter/, not merged/"),
    _CHAT_TEMPLATE,
), recommended=dict(lr=1e-6, lora_alpha=32.0, epochs=1.0),   # GRPOConfig: lr 1e-6
    embedded=dict(max_len=64, batch_size=8, grad_accum=2, max_steps=30, lr=2e-3, warmup_steps=0,
                  lora_r=16, lora_alpha=32.0, save_every=10, num_generations=8, max_completion_length=24,
                  temperature=0.7, top_k=50, beta=0.0))


_REWARD = "reward model"
REWARD = Stage("reward.py", options=(
    *_training("reward"),
    Option("--center-rewards-coefficient", type=flags.non_negative_float, group=_REWARD,
           help="c of TRL's RewardTrainer: adds c x mean((r_chosen + r_rejected)^2), keeping rewards centred on 0 "
                "(default: off; 0.01 is the value of the paper TRL cites)"),
    Option("--max-prompt-len", type=flags.positive_int, group=_REWARD,
           help="tokens the prompt keeps when a pair is too long (default: half of --max-len)"),
    Option("--no-merge", action="store_true", help="write only adapter/, not merged/"),
    _CHAT_TEMPLATE,
), recommended=dict(lr=1e-4, lora_alpha=32.0, epochs=1.0),   # TRL RewardConfig: lr 1e-4, 1 epoch
    embedded=dict(max_len=256, batch_size=4, grad_accum=2, max_steps=40, lr=2e-3, warmup_steps=4,
                  lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20), lf_stage="reward")   # LLaMA-Factory: stage rm
# TRL 1.16 KTOConfig (and HF TrainingArguments) names that --config reads for our options; its
# own names beta, desirable_weight, undesirable_weight and loss_type are our option names.
_TRL_KTO_NAMES = dict(max_length="max_len", max_prompt_length="max_prompt_len", learning_rate="lr",
                      per_device_train_batch_size="batch_size", gradient_accumulation_steps="grad_accum",
                      num_train_epochs="epochs")
_KTO = "KTO objective (TRL KTOConfig's names)"
KTO = Stage("kto.py", options=(
    *_training("kto"),
    Option("--loss-type", choices=("kto", "apo_zero_unpaired"), default="kto", group=_KTO,
           help="kto (with the KL baseline from mismatched pairs) or apo_zero_unpaired (no KL term)"),
    Option("--beta", type=flags.positive_float, default=0.1, group=_KTO, lf=(LF("pref_beta"),),
           help="β: how far the policy may move from the reference"),
    Option("--desirable-weight", type=flags.positive_float, default=1.0, group=_KTO, lf=(LF("kto_chosen_weight"),),
           help="weight of the desirable rows' losses (to balance unequal numbers of the two labels)"),
    Option("--undesirable-weight", type=flags.positive_float, default=1.0, group=_KTO,
           lf=(LF("kto_rejected_weight"),), help="weight of the undesirable rows' losses"),
    Option("--max-prompt-len", type=flags.positive_int, group=_KTO,
           help="tokens the prompt keeps when a row is too long (default: half of --max-len)"),
    *_chat_outputs(sample_questions=2),
), recommended=dict(lr=5e-6, lora_alpha=32.0, epochs=1.0, batch_size=8, grad_accum=2),   # KTO needs B > 1
    embedded=dict(max_len=256, batch_size=8, grad_accum=1, max_steps=40, lr=2e-3, warmup_steps=4,
                  lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20, beta=0.1),
    lf_stage="kto", config_aliases=_TRL_KTO_NAMES)


# ---------------------------------------------------------------------- the other scripts
class AppendEntry(argparse.Action):
    """evaluate.py's --model and --adapter append (kind, value) to one list, `entries`, keeping
    their order."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = list(getattr(namespace, "entries", None) or [])
        entries.append((self.dest, values))
        namespace.entries = entries


_ROWS, _HELD_OUT, _MEASURE = ("what to compare (rows, in order; the first is the reference)", "held-out data",
                              "measurement")
EVALUATE = Stage("evaluate.py", options=(
    Option("--model", metavar="[NAME=]DIR", action=AppendEntry, dest="model", group=_ROWS,
           help="an HF-format Qwen model directory (repeatable)"),
    Option("--adapter", metavar="[NAME=]DIR[@BASE]", action=AppendEntry, dest="adapter", group=_ROWS,
           help="a LoRA adapter on its base (adapter_config.json's base_model_name_or_path, or @BASE)"),
    Option("--metrics", metavar="NAME=FILE", action="append", default=[], group=_ROWS,
           help="metrics.jsonl of the run behind row NAME, for the loss plot (default: found next "
                "to the adapter / model directory)"),
    Option("--domain-data", metavar="PATH", nargs="+", group=_HELD_OUT,
           help="held-out domain text: .txt (one document per file) / .jsonl(.gz) files or directories"),
    Option("--general-data", metavar="PATH", nargs="+", group=_HELD_OUT, help="general text (the forgetting check)"),
    Option("--text-field", default="text", group=_HELD_OUT, help="field holding the text in .jsonl data"),
    Option("--instructions", metavar="FILE.jsonl", group=_HELD_OUT,
           help="held-out instructions (messages/alpaca/ShareGPT)"),
    Option("--max-tokens", type=flags.positive_int, group=_HELD_OUT,
           help="use only the first N tokens of each text set (default: all)"),
    Option("--max-instructions", type=flags.positive_int, group=_HELD_OUT, help="use only the first N instructions"),
    replace(_CHAT_TEMPLATE, group=_HELD_OUT),
    Option("--max-length", type=flags.int_at_least(2), group=_MEASURE,
           help="perplexity window in tokens (default: min(2048, the first model's max positions))"),
    Option("--stride", type=flags.positive_int, group=_MEASURE, help="step between windows (default: half)"),
    Option("--batch-size", type=flags.positive_int, default=8, group=_MEASURE, help="windows per forward pass"),
    Option("--max-new-tokens", type=flags.positive_int, default=64, group=_MEASURE, help="greedy answer budget"),
    Option("--gen-batch-size", type=flags.positive_int, default=8, group=_MEASURE, help="prompts decoded together"),
    Option("--forgetting-threshold", type=flags.non_negative_float, default=0.10, group=_MEASURE,
           help="flag general-text perplexity rising by more than this fraction over the first row"),
    Option("--dtype", choices=DTYPES, group=_MEASURE, help="compute dtype (default bf16 on a GPU, fp32 on CPU)"),
    Option("--qlora", action="store_true", group=_MEASURE,
           help="load the base of every --adapter row in NF4, as it was trained with QLoRA"),
    Option("--eval-fraction", type=flags.ratio, default=0.05, group=_MEASURE,
           help="embedded default only: the held-out fraction of the domain documentation "
                "(default: what runs/cpt/run.json records)"),
    Option("--out", metavar="DIR", default=str(paths.RUNS / "eval"), help="where report.md/.json go"),
    _CONFIG,
# the embedded default's evaluation: a slice of the held-out data (2 CPU cores, five models);
# windows match the demo's 256-token training blocks, with at least 64 tokens of context.
), embedded=dict(max_tokens=3072, max_instructions=24, max_new_tokens=32, max_length=256, stride=192))

MERGE = Stage("merge.py", options=(
    Option("--model", metavar="DIR", help="base model directory (default: the base recorded by the adapter's run)"),
    Option("--adapter", metavar="DIR", default=str(paths.CPT_OUT / "adapter"), help="PEFT-format adapter directory"),
    Option("--out", metavar="DIR", default=str(paths.MERGED_OUT), help="output model directory"),
    Option("--into", choices=("original", "nf4"), default="original",
           help="merge into the original 16-bit weights, or into the dequantised NF4 weights"),
    Option("--qlora", action="store_true",
           help="the adapter was trained on an NF4 base (default: what the adapter's run.json records)"),
    Option("--dtype", choices=DTYPES, help="dtype of the written weights (default: the base's)"),
    Option("--max-shard-size", type=flags.shard_size, default="5GB",
           help="largest safetensors shard ('5GB', '500MB' or bytes)"),
    Option("--gguf", choices=("f16", "bf16", "q8_0"), help="also write OUT/model-<type>.gguf (+ an Ollama Modelfile)"),
    _OVERWRITE,
    _CONFIG,
))

GENERATE = Stage("generate.py", options=(
    Option("--model", metavar="DIR", help=f"model directory (default: the latest stage's: {paths.DPO_OUT}/merged, "
                                          f"else {paths.SFT_OUT}/merged, else {paths.MERGED_OUT})"),
    Option("--adapter", metavar="DIR",
           help="LoRA adapter directory (default with the default model: the latest stage's adapter/ when "
                "it has no merged/ or with --compare)"),
    Option("--prompt", action="append", metavar="TEXT",
           help="prompt or user message; repeat for several (default: demo questions)"),
    Option("--mode", choices=("chat", "completion"), default="chat", help="chat template or raw completion"),
    Option("--system", help="system message in chat mode (default: the template's)"),
    _CHAT_TEMPLATE,
    Option("--compare", action="store_true", help="answer with the base (no adapter) and the tuned model"),
    Option("--max-new-tokens", type=flags.positive_int, default=64, help="tokens to generate per prompt"),
    Option("--temperature", type=flags.non_negative_float, default=0.0, help="0 = greedy"),
    Option("--top-k", type=flags.non_negative_int, default=0, help="sample from the k most likely tokens (0 = all)"),
    Option("--top-p", type=flags.unit_interval, default=1.0, help="nucleus sampling mass, in (0, 1]"),
    Option("--seed", type=flags.seed, default=0, help="sampling seed"),
    Option("--qlora", action="store_true", help="load the base in NF4 (as it was trained with QLoRA)"),
    Option("--dtype", choices=DTYPES, help="compute dtype (default: bf16 on a GPU, fp32 on a CPU)"),
    _CONFIG,
))

EXPORT_MODELS = (paths.DPO_OUT / "merged", paths.SFT_OUT / "merged")   # the latest stage first
EXPORT_DIR = paths.RUNS / "gguf"
EXPORT_TYPES = ("f16", "bf16", "q8_0")
EXPORT = Stage("export.py", options=(
    Option("--model", metavar="DIR", help="HF-format model directory (default: the latest stage's merged "
                                          f"model: {' else '.join(map(str, EXPORT_MODELS))})"),
    Option("--gguf", metavar="OUT.gguf", help=f"output file ({EXPORT_DIR}/model-TYPE.gguf when not given)"),
    Option("--type", choices=EXPORT_TYPES, default="f16", help="type of the weight matrices in the file"),
    Option("--name", help="model name stored in the file and suggested to `ollama create` "
                          "(when not given: the model directory's name, and the file's for Ollama)"),
    Option("--overwrite", action="store_true", help="replace an existing --gguf file and its Modelfile"),
    _CONFIG,
))

EXTEND_VOCAB = Stage("extend_vocab.py", options=(
    Option("--model", metavar="DIR", help="HF-format Qwen checkpoint to give the new tokens rows "
                                          "(default: none, the tokenizer alone is extended)"),
    Option("--data", metavar="PATH", nargs="+", help="domain corpus: .txt/.jsonl/.jsonl.gz files or directories "
                                                     "(default: the embedded Python-documentation domain corpus)"),
    Option("--text-field", default="text", help="field holding the text in .jsonl records"),
    Option("--max-chars", type=flags.positive_int, help="use only the first documents, up to about this many characters"),
    Option("--tokens", metavar="FILE", exclusive="tokens",
           help="UTF-8 file of tokens to add, one per line (no mining); a leading space is part of the token"),
    Option("--token", metavar="TEXT", action="append", exclusive="tokens",
           help="a token to add (repeatable; no mining)"),
    Option("--max-tokens", type=flags.positive_int, default=32, help="most tokens mining proposes"),
    Option("--min-frequency", type=flags.positive_int, default=20, help="occurrences a mined token needs in the corpus"),
    Option("--sp-model-type", choices=("unigram", "bpe"), default="unigram", help="sentencepiece model"),
    Option("--sp-vocab-size", type=flags.positive_int, default=4000, help="sentencepiece pieces to train"),
    Option("--rank", choices=("per_occurrence", "saving"), default="per_occurrence",
           help="order of candidates: tokens saved per occurrence, or estimated total saving"),
    Option("--out", metavar="DIR", default=str(paths.RUNS / "extend-vocab"), help="output directory"),
    _OVERWRITE,
    _CONFIG,
))

# examples/residual.py and `qwen-tune delta residual` (cli/delta.py, which adds the same options)
RESIDUAL_OPTIONS = (
    Option("--base", help="base model directory (the model the chat model was tuned from)"),
    Option("--chat", help="chat/instruct model directory (tokenizer and chat template come from here)"),
    Option("--target", help="model to add the residual to (e.g. the continued-pretrained base)"),
    Option("--out", help="output directory (written atomically)"),
    Option("--scale", type=flags.finite_float, default=1.0,
           help="residual scale s: target + s * (chat - base) (default 1.0)"),
    *(Option(f"--{group}-scale", type=flags.finite_float,
             help=f"extra factor for {group} tensors (multiplies --scale; default 1)")
      for group in ("attention", "mlp", "embeddings", "norms")),
    Option("--skip-embeddings", action="store_true", help="leave embeddings and head as in the target"),
    Option("--skip", action="append", default=[], metavar="GLOB",
           help="tensor-name glob left as in the target (repeatable)"),
    Option("--special-rows", choices=("auto", "always", "never"), default="auto",
           help="take the chat model's <|im_start|>/<|im_end|> rows: when untrained in base/target (auto), "
                "always, or never"),
    Option("--dtype", choices=("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
           help="output dtype (default: as the layout input, per tensor)"),
    Option("--overwrite", action="store_true",
           help="replace an --out these tools wrote earlier (never a folder they did not write)"),
    Option("--no-hash", action="store_true", help="skip the sha256 of the inputs in manifest.json"),
)
RESIDUAL = Stage("residual.py", options=(*RESIDUAL_OPTIONS, _CONFIG))

STAGES: dict[str, Stage] = {"cpt": CPT, "sft": SFT, "dpo": DPO, "reward": REWARD, "grpo": GRPO, "kto": KTO,
                            "evaluate": EVALUATE, "merge": MERGE,
                            "generate": GENERATE, "export": EXPORT, "extend_vocab": EXTEND_VOCAB, "residual": RESIDUAL}


# ---------------------------------------------------------------------- generated: argparse
def add_options(p: argparse.ArgumentParser, opts: tuple[Option, ...]) -> None:
    """Each option as an argparse argument, in its group (and mutually exclusive group)."""
    groups: dict[Optional[str], Any] = {None: p}
    exclusive: dict[str, Any] = {}
    for o in opts:
        if o.group not in groups:
            groups[o.group] = p.add_argument_group(o.group)
        container = groups[o.group]
        if o.exclusive is not None:
            if o.exclusive not in exclusive:
                exclusive[o.exclusive] = container.add_mutually_exclusive_group()
            container = exclusive[o.exclusive]
        container.add_argument(o.flag, **o.argparse_kwargs())


def parser(stage: str, description: Optional[str]) -> flags.Parser:
    """The argparse parser of `stage` (a key of STAGES), its --help listing each default once and
    the embedded default's values."""
    s = STAGES[stage]
    p = flags.new_parser(s.prog, description, epilog=describe_embedded(s.embedded) if s.embedded else None,
                         embedded=s.embedded)
    add_options(p, s.options)
    p.config_aliases = dict(s.config_aliases)   # read by cli/config_file.py
    return p


def recommended_epochs(stage: str) -> float:
    """The epochs a training stage runs when neither --epochs nor --max-steps is given."""
    return STAGES[stage].recommended["epochs"]


# ---------------------------------------------------------------------- generated: the embedded default
def describe_embedded(settings: dict) -> str:
    """The --help epilog that lists a stage's embedded-default values."""
    shown = " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                     for k, v in settings.items())
    return f"embedded default (no --model): the demo model runs with {shown} (flags you give win)"


def apply_embedded(args: argparse.Namespace, given: frozenset[str], stage: str) -> list[str]:
    """Fill the options the user did not give (`given`: what argparse parsed, in any spelling,
    or --config set) with the embedded default's values of `stage`; return them as flags.

    An option whose rival was given keeps its default (--epochs given: no embedded --max-steps).
    A short run gets a short warm-up: at most a fifth of --max-steps unless --warmup-steps is given.
    """
    s = STAGES[stage]
    rivals = {o.name: o.rival for o in s.options}
    changed = []
    for key, value in s.embedded.items():
        if key in given or rivals.get(key) in given:
            continue
        setattr(args, key, value)
        changed.append(f"--{key.replace('_', '-')} {value}")
    if ("warmup_steps" not in given and getattr(args, "warmup_steps", None) is not None
            and getattr(args, "max_steps", None) is not None):
        args.warmup_steps = min(args.warmup_steps, args.max_steps // 5)
    return changed


# ---------------------------------------------------------------------- generated: LLaMA-Factory
def _all_options() -> list[Option]:
    return [o for s in STAGES.values() for o in s.options]


def lf_keys() -> dict[str, lf.Translation]:
    """Every LLaMA-Factory key this project reads -> its translation: the options' (of every
    script, so a key for an option another script has is named, not refused) and the recipe's."""
    keys: dict[str, lf.Translation] = dict(lf.RECIPE_KEYS)
    seen: dict[str, tuple[str, LF]] = {}
    for o in _all_options():
        for k in o.lf:
            if k.key in seen:   # the same key on two scripts' options: one meaning
                dest, first = seen[k.key]
                if first != k or (k.translate is None and dest != o.name):
                    raise ValueError(f"LLaMA-Factory key {k.key!r} is declared differently on {dest} and {o.name}")
                continue
            seen[k.key] = (o.name, k)
            keys[k.key] = k.translation(o.name)
    return keys


def lf_list_keys() -> frozenset[str]:
    """The LLaMA-Factory keys whose value may be a list (the others take one scalar)."""
    return frozenset(k.key for o in _all_options() for k in o.lf if k.lists)


def lf_defaults() -> dict[str, Any]:
    """dest -> what a LLaMA-Factory recipe runs with where it sets nothing (LLaMA-Factory 0.9.5's
    hparams and HF TrainingArguments' defaults); lora_alpha, twice the rank, is computed."""
    return {o.name: o.lf_default for o in _all_options() if o.lf_default is not _UNSET}


def lf_rivals() -> dict[str, str]:
    """dest -> the other of its pair, for the options that have a LLaMA-Factory default."""
    return {o.name: o.rival for o in _all_options() if o.lf_default is not _UNSET and o.rival}
