"""TrainConfig: every setting of one SAE's training run. The fields' docstrings are the
``saeengine train --help`` text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import field_checks as checks
from ..architectures import get_architecture
from ..architectures.matryoshka import INNER as MATRYOSHKA_INNER
from ..config import ARCHITECTURES, NORMALIZATIONS, SAEConfig
from ..errors import ConfigError

B_DEC_INITS = ("geometric_median", "mean", "zeros")
OPTIMIZERS = ("adam", "row_sparse_adam")
MOMENT_DTYPES = ("float32", "bfloat16")
AUTOCAST = ("none", "bfloat16", "float16")
SEED_LIMIT = 2**32  # seeds are drawn below it
# out_dir/<CHECKPOINTS_DIR>/ holds the resumable checkpoints, so no SAE may take that name.
CHECKPOINTS_DIR = "checkpoints"
MAX_NAME_BYTES = 255  # a folder name on common filesystems
# Fields that every config of a sweep must share: the SAEs read the same batches.
SHARED_FIELDS = ("total_tokens", "batch_size", "seed", "device", "out_dir", "checkpoint_every_tokens", "resume")

# How resuming treats the fields (saeengine.trainer.checkpoints). These never change the
# math of a step, so a resumed run may change them (on the same device and backend it
# still ends bit for bit where the uninterrupted run would):
RESUME_FREE_FIELDS = ("device", "backend", "out_dir", "name", "checkpoint_every_tokens", "resume", "log_every",
                      "tensorboard", "wandb_project", "progress")
# These act only when a run starts; the checkpoint holds what they did.
START_ONLY_FIELDS = ("init_from", "b_dec_init")
# total_tokens may change within limits (TrainConfig.lr_factor). Every other field changes
# the math, and resuming refuses a change, naming the field: a field added later is math
# until listed above.
SCHEDULE_FIELD = "total_tokens"
# Fields of earlier versions: a saved config that has them still resumes (with a note).
REMOVED_FIELDS = {
    "weight_copies": "the kernels' weight reads are chosen per call; SAE.forward(weight_copies=...) overrides "
                     "that (TrainStep(forward_options=...) in training)",
}


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(F / 2^14) (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one SAE training run (a sweep is a list of them)."""

    d_sae: int = 16384
    """Number of latents F."""
    architecture: str = "topk"
    """topk, batchtopk, relu (with an L1 penalty), jumprelu (with an L0 penalty) or
    matryoshka (nested prefixes of the dictionary each reconstruct; see matryoshka_*)."""
    k: int = 32
    """Active latents per token (topk, matryoshka; the batch average for batchtopk)."""
    k_anneal_from: int = 0
    """Start with this many active latents and lower it linearly to k over the first
    k_anneal_fraction of the run (0: no annealing; topk, batchtopk and matryoshka)."""
    k_anneal_fraction: float = 0.1
    """Fraction of the run over which k is annealed."""
    total_tokens: int = 10_000_000
    """Training tokens; the run takes total_tokens // batch_size steps. A resumed run may
    raise it (or lower it down to the tokens already trained): the learning-rate decay
    and the k annealing are then those of the new total from the checkpoint's step on."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 0.0
    """Adam learning rate; 0 means 2e-4 / sqrt(d_sae / 2^14)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from 0."""
    decay_start: float = 0.8
    """Fraction of the run after which the learning rate decays linearly to 0."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    clip_grad_norm: float = 1.0
    """Clip the gradient norm to this value; 0 disables clipping."""
    optimizer: str = "adam"
    """adam (dense), or row_sparse_adam (only latents that fired this step are updated;
    their moments do not decay in between; on the GPU paths the weight gradients are
    then sparse rows, with no [d_sae, d_in] gradient buffers)."""
    moment_dtype: str = "float32"
    """Adam moments of row_sparse_adam: float32, or bfloat16 (half the optimizer memory;
    what lets F=2^21 fit on one 80 GB GPU)."""
    resample_every_tokens: int = 0
    """Resample latents dead at that moment every this many tokens (0: never)."""
    auxk: bool = True
    """AuxK loss over dead latents (topk and batchtopk)."""
    k_aux: int = 0
    """AuxK code width; 0 means d_in // 2."""
    aux_alpha: float = 1.0 / 32.0
    """Weight of the AuxK loss."""
    dead_after_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many tokens."""
    sparsity_coefficient: float = 1e-3
    """Penalty weight: L1 for relu, L0 for jumprelu (unused by topk and batchtopk)."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient from 0 (the L1 warm-up of relu)."""
    jumprelu_threshold: float = 1e-3
    """Initial JumpReLU threshold."""
    matryoshka_inner: str = "topk"
    """Selection of matryoshka: topk or batchtopk."""
    matryoshka_prefixes: str = ""
    """Fixed prefix lengths of matryoshka, comma-separated and ascending, the last d_sae
    (e.g. 64,512,4096); empty: lengths drawn each step (matryoshka_random_prefixes)."""
    matryoshka_random_prefixes: int = 10
    """Prefixes per step of matryoshka without fixed lengths: the full dictionary and
    this many minus one random lengths m, P(length <= m) = (m / d_sae) ^ 0.5."""
    b_dec_init: str = "geometric_median"
    """Decoder bias start: geometric_median (Weiszfeld), mean, or zeros of a data sample."""
    init_from: str = ""
    """Directory of a saved SAE to start from (weights, normalization, threshold): d_in,
    d_sae and architecture must match. Empty: a fresh SAE initialized from the data."""
    normalization: str = "mean_norm"
    """Input normalization estimated from the data and saved with the SAE: mean_norm or none."""
    autocast: str = "none"
    """Mixed precision on CUDA: none, bfloat16 or float16 compute over fp32 parameters."""
    seed: int = 0
    """Seed of the initialization and of the data order."""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda or cuda:N."""
    backend: str = "auto"
    """Op backend: auto, torch, triton or cuda."""
    out_dir: str = "runs/sae"
    """Run directory: checkpoints/, and one folder per SAE with the trained SAE and metrics.jsonl."""
    name: str = ""
    """This SAE's folder under out_dir: one folder name (no '/', not starting with '.', not
    'checkpoints'); empty means a name built from the settings."""
    checkpoint_every_tokens: int = 0
    """Write a resumable checkpoint every this many tokens (0: only at the end)."""
    resume: bool = True
    """Continue from out_dir's latest checkpoint when there is one (on the same data and
    settings, else an error says what differs). False starts over: an earlier run in
    out_dir is replaced, with a warning."""
    log_every: int = 50
    """Steps between metric lines in metrics.jsonl (and TensorBoard or W&B); the last step
    is always logged."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard events into the SAE's folder (needs tensorboard)."""
    wandb_project: str = ""
    """Also log the metrics to this Weights & Biases project (needs wandb; WANDB_MODE decides
    online or offline)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        # Each field's type and range first (values come back normalized: numpy ints ->
        # int, ints given for floats -> float), then the rules that tie fields together.
        checks.check_fields(self, CHECKS, _RULES)
        try:  # the architecture's own fields (they do not depend on d_in)
            self.sae_config(d_in=1)
        except ValueError as err:
            raise ConfigError(f"TrainConfig: {err} (the TrainConfig field of the same name sets it)") from err

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def learning_rate(self) -> float:
        return self.lr or default_lr(self.d_sae)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.architecture}-F{self.d_sae}-k{self.k}-lr{self.learning_rate:.2g}"

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step``: linear warm-up over warmup_steps,
        flat, then linear decay to 0 from step ``int(decay_start * steps)`` to ``steps``.

        A function of (step, total_tokens) alone. A run resumed with a larger total_tokens
        follows the new total's schedule from its checkpoint's step on: the decay start
        moves to decay_start of the new total. An interrupted run that had not begun to
        decay thus ends exactly as a run started with the larger total. A run that had
        decayed, or had finished (its last step at 1 / (steps - decay start) of the peak),
        continues at the new schedule's factor for its next step: back to 1.0 when that
        step lies before the new decay start (no second warm-up), then down to 0 at the
        new end."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_from = int(self.decay_start * self.steps)
        decay = 1.0 if step < decay_from else max(0.0, (self.steps - step) / max(1, self.steps - decay_from))
        return warm * decay

    def k_at(self, step: int) -> int:
        """Active latents at ``step``: k_anneal_from lowered linearly to k, then k.

        Each distinct value compiles its own fused-encoder variant once."""
        if not self.k_anneal_from:
            return self.k
        span = max(1, round(self.k_anneal_fraction * self.steps))
        t = min(1.0, step / span)
        return round(self.k_anneal_from + t * (self.k - self.k_anneal_from))

    def sparsity_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def known_fields(cls, saved: dict) -> tuple[dict, dict]:
        """A saved config dict split into (fields this version has, removed fields with
        the reason each left); a field neither known nor removed raises ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names - set(REMOVED_FIELDS))
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; the checkpoint may come from a newer saeengine")
        return ({key: value for key, value in saved.items() if key in names},
                {key: REMOVED_FIELDS[key] for key in saved if key in REMOVED_FIELDS})

    def sae_config(self, d_in: int) -> SAEConfig:
        """The :class:`saeengine.SAEConfig` of the SAE this run trains on ``d_in``-wide data
        (the architecture's fields; the training settings stay in the run's provenance)."""
        return SAEConfig(d_in=d_in, d_sae=self.d_sae, architecture=self.architecture, k=self.k,
                         normalization=self.normalization, k_aux=self.k_aux or None, aux_alpha=self.aux_alpha,
                         jumprelu_threshold=self.jumprelu_threshold, matryoshka_inner=self.matryoshka_inner,
                         matryoshka_prefixes=self._matryoshka_prefixes(),
                         matryoshka_random_prefixes=self.matryoshka_random_prefixes)

    def _matryoshka_prefixes(self) -> tuple[int, ...]:
        """matryoshka_prefixes "64,512,4096" -> (64, 512, 4096); "" -> ()."""
        return _parse_prefixes(self.matryoshka_prefixes)


# ----- field checks (saeengine.field_checks) ---------------------------------------------
def _parse_prefixes(value: str) -> tuple[int, ...]:
    return tuple(int(m) for m in value.split(",")) if value.strip() else ()


def _prefixes(cfg):
    rule = f"comma-separated ints ending at d_sae, e.g. '{max(1, cfg.d_sae // 8)},{cfg.d_sae}' (empty: random lengths)"

    def check(value):
        checks.text(value)
        try:
            _parse_prefixes(value)
        except ValueError:
            raise ValueError(rule) from None
        return value
    return check


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be the folder of an SAE under out_dir, or None if it can."""
    if value != value.strip():
        return "a name without leading or trailing spaces"
    if "/" in value or "\\" in value or value in (".", ".."):
        return "one folder name inside out_dir (no '/', '\\', '.' or '..': it must not leave out_dir)"
    if value.startswith("."):
        return "a name that does not start with '.' (hidden names are the trainer's temporary files)"
    if value == CHECKPOINTS_DIR:
        return f"another name than {CHECKPOINTS_DIR!r} (out_dir/{CHECKPOINTS_DIR} holds the checkpoints)"
    if any(ord(c) < 32 for c in value):
        return "a name without control characters"
    if len(value.encode()) > MAX_NAME_BYTES:
        return f"at most {MAX_NAME_BYTES} bytes long (a folder name)"
    return None


def _name(value):
    checks.text(value)
    problem = name_problem(value) if value else None
    if problem:
        raise ValueError(f"empty (a name built from the settings) or {problem}")
    return value


def _k_anneal_applies(cfg) -> str:
    selecting = ", ".join(a for a in ARCHITECTURES if get_architecture(a).selects_k)
    return f"0 (off): k_anneal_from applies to {selecting}, not {cfg.architecture!r}"


# The demos hand lr, batch_size and seed on to a TrainConfig, so they check them with these.
CHECKS = {
    "d_sae": checks.integer(1),
    "architecture": checks.choice(ARCHITECTURES),
    "k": checks.integer(1),
    "k_anneal_from": checks.integer(0, why="0: off; else in (k, d_sae]"),
    "k_anneal_fraction": checks.real(0.0, 1.0, low_open=True),
    "total_tokens": checks.integer(1, why="and >= batch_size: the run takes total_tokens // batch_size steps"),
    "batch_size": checks.integer(2, why="FVU needs two rows"),
    "lr": checks.real(0.0, why="> 0, or 0 for the default 2e-4 / sqrt(d_sae / 2^14)"),
    "warmup_steps": checks.integer(0, why="0: no warm-up"),
    "decay_start": checks.real(0.0, 1.0, why="a fraction of the run; 1: no decay"),
    "adam_beta1": checks.real(0.0, 1.0, high_open=True),
    "adam_beta2": checks.real(0.0, 1.0, high_open=True),
    "clip_grad_norm": checks.real(0.0, why="0: no clipping"),
    "optimizer": checks.choice(OPTIMIZERS),
    "moment_dtype": checks.choice(MOMENT_DTYPES),
    "resample_every_tokens": checks.integer(0, why="0: never resample"),
    "auxk": checks.boolean,
    "k_aux": checks.integer(0, why="0: d_in // 2"),
    "aux_alpha": checks.real(0.0),
    "dead_after_tokens": checks.integer(1, why="tokens without firing before a latent counts as dead"),
    "sparsity_coefficient": checks.real(0.0),
    "sparsity_warmup_steps": checks.integer(0, why="0: no warm-up"),
    "jumprelu_threshold": checks.real(0.0, low_open=True),
    "matryoshka_inner": checks.choice(MATRYOSHKA_INNER),
    "matryoshka_prefixes": checks.using_config(_prefixes),
    "matryoshka_random_prefixes": checks.integer(1),
    "b_dec_init": checks.choice(B_DEC_INITS),
    "init_from": checks.text,
    "normalization": checks.choice(NORMALIZATIONS),
    "autocast": checks.choice(AUTOCAST),
    "seed": checks.integer(0, SEED_LIMIT - 1, rule=f"an int in [0, 2^32), i.e. [0, {SEED_LIMIT - 1}]"),
    "device": checks.device,
    "backend": checks.backend,
    "out_dir": checks.folder,
    "name": _name,
    "checkpoint_every_tokens": checks.integer(0, why="0: only at the end"),
    "resume": checks.boolean,
    "log_every": checks.integer(1, why="steps between metric lines"),
    "tensorboard": checks.boolean,
    "wandb_project": checks.text,
    "progress": checks.boolean,
}
checks.require_every_field(TrainConfig, CHECKS)
_RULES = (
    checks.Rule("moment_dtype", lambda cfg: cfg.moment_dtype == "float32" or cfg.optimizer == "row_sparse_adam",
                lambda cfg: "'float32' with optimizer='adam' (torch's Adam keeps moments in the parameters' dtype)",
                lambda cfg: "needs optimizer='row_sparse_adam'"),
    checks.Rule("total_tokens", lambda cfg: cfg.total_tokens >= cfg.batch_size,
                lambda cfg: f"an int >= batch_size={cfg.batch_size} (the run would take no step); raise "
                            f"total_tokens to at least {cfg.batch_size}, or lower batch_size",
                lambda cfg: f"is less than one batch (batch_size={cfg.batch_size})"),
    checks.Rule("k_anneal_from", lambda cfg: cfg.k_anneal_from == 0 or cfg.k < cfg.k_anneal_from <= cfg.d_sae,
                lambda cfg: f"0 (off) or an int in (k={cfg.k}, d_sae={cfg.d_sae}]"),
    checks.Rule("k_anneal_from", lambda cfg: cfg.k_anneal_from == 0 or get_architecture(cfg.architecture).selects_k,
                _k_anneal_applies),
)


def check_sweep(configs: list[TrainConfig]) -> None:
    """The configs of one sweep are TrainConfigs that share their data settings and have
    distinct names; raises ConfigError (TypeError for something else than a TrainConfig)."""
    if not configs:
        raise ConfigError("train() needs at least one TrainConfig (got an empty sweep)")
    wrong = [type(c).__name__ for c in configs if not isinstance(c, TrainConfig)]
    if wrong:
        raise TypeError(f"train() takes a TrainConfig or a list of them; the sweep holds {wrong}")
    for field in SHARED_FIELDS:
        values = {getattr(c, field) for c in configs}
        if len(values) > 1:
            raise ConfigError(f"the SAEs of one sweep read the same batches, so TrainConfig.{field} must be "
                              f"equal across the sweep; got {sorted(map(str, values))}")
    names = [c.run_name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"two SAEs of the sweep have the same name {repeated} (of {names}): they would write the "
                          "same folder; set TrainConfig.name to tell them apart")
