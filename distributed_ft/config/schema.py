"""The typed job configuration.

Every key a recipe or a ``key=value`` override may set lives here, with its default and a one-line
meaning. Unknown keys are errors (``extra="forbid"``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from distributed_ft.config.task_metrics import resolve_metric

log = logging.getLogger("distributed_ft")
TaskName = Literal["token_classification", "sequence_classification", "causal_lm"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """``model.*``: which pretrained model and how it is loaded."""

    name: str = "builtin:minilm-l6"
    """Hub id, local ``save_pretrained`` directory, or ``builtin:NAME`` (an offline packaged model)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (master weights; see ``train.mixed_precision`` for compute)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name`` is a hub id."""
    reset_head: bool | Literal["auto"] = "auto"
    """Classification tasks: ``auto`` replaces a pretrained head that does not fit this job's labels (one
    log line); ``false`` makes such a head an error; ``true`` always starts the head afresh. causal_lm
    has no classification head (its LM head is tied to the vocabulary): only ``auto``/``false`` there."""
    crf: bool = False
    """token_classification: a linear-chain CRF over the classifier's emissions, trained by its negative
    log-likelihood over each sentence's words and decoded by Viterbi in evaluation and ``dft predict``
    (the export carries it; plain transformers loads the export without it and takes the argmax)."""
    crf_constraints: Literal["none", "iob2"] = "iob2"
    """With ``crf``: ``iob2`` forbids ``I-X`` at a sentence's start and after anything but ``B-X``/``I-X``
    (the data's tags are IOB2 after reading); ``none`` lets the CRF learn every transition."""


class DataConfig(_Section):
    """``data.*`` keys every task has: input files, their format, length, limits and the cache.

    Each task adds its own keys in a subclass (:data:`DATA_SECTIONS`); ``JobConfig`` validates ``data``
    with the class of its ``task``, so a key of another task is an error that names that task.
    """

    train: str | None = None
    """Training file (path, glob or ``builtin:NAME``)."""
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "conll", "jsonl", "csv", "parquet", "folder"] = "auto"
    """File format; ``auto`` picks it from the file extension (a directory is read as ``folder``:
    one sub-folder per class, one text file per example; sequence classification only; ``conll``:
    token classification only)."""
    max_length: int = Field(256, ge=8)
    """Sub-word tokens per example; longer examples are truncated and the count is reported."""
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    """Validation examples used during training (the first N)."""
    max_test_samples: int | None = Field(None, ge=1)
    """Test examples scored at the end (default: all of them)."""
    group_by_length: bool = True
    """Batch training examples of similar length together (less padding)."""
    cache_dir: str | None = None
    """Where prepared shards are cached (default ``$XDG_CACHE_HOME/distributed_ft/prepared``)."""
    shard_rows: int = Field(4096, ge=1)
    """Rows per prepared Parquet shard; also the unit of parallel encoding (one shard per worker task)."""
    num_proc: int | None = Field(None, ge=1)
    """Worker processes that encode shards on a cache miss; ``null`` (auto): the usable cores, at most 8,
    but 1 for fewer than 100,000 rows (or 2 shards): starting the workers costs ~3 s."""


class AugmentConfig(_Section):
    """``data.augment.*``: augmented copies of the training split, made once and cached with it.

    Deterministic by ``train.seed``; validation and test are never augmented. Each task has its own
    operations (:class:`TokenAugmentConfig`, :class:`TextAugmentConfig`).
    """

    multiplier: int = Field(0, ge=0, le=64)
    """Augmented copies of each training example (0: no augmentation); the originals are kept."""

    OTHER_TASK: ClassVar[dict[str, str]] = {}
    """Keys of the other task's augmentation, and what this task uses instead (for the error)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_task_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, hint in cls.OTHER_TASK.items():
                if key in value:
                    raise ValueError(f"data.augment.{key} does not apply to this task: {hint}")
        return value

    def probabilities(self) -> dict[str, float]:
        """The operation probabilities of the task, by key."""
        return {k: v for k, v in self.model_dump().items() if k != "multiplier"}

    @model_validator(mode="after")
    def _check_operations(self) -> AugmentConfig:
        probabilities = self.probabilities()
        if self.multiplier and not any(probabilities.values()):
            keys = " / ".join(f"data.augment.{k}" for k in probabilities)
            raise ValueError(
                f"data.augment.multiplier={self.multiplier} with every operation at 0 would only copy "
                f"examples: set {keys} above 0, or data.augment.multiplier=0"
            )
        return self


class TokenAugmentConfig(AugmentConfig):
    """``data.augment.*`` of token classification: label-preserving, every copy valid IOB2."""

    mention_replace: float = Field(0.5, ge=0, le=1)
    """Chance that an entity mention (``B-X I-X*``) is replaced by another mention of type X from the
    training split (re-tagged ``B-X I-X...``)."""
    token_substitute: float = Field(0.1, ge=0, le=1)
    """Chance that a word (outside replaced mentions) is replaced by another training word of the same
    tag (``O`` by ``O``, ``B-X`` by ``B-X``, ``I-X`` by ``I-X``)."""

    OTHER_TASK: ClassVar[dict[str, str]] = {
        "token_noise": "it is sequence_classification's; token classification uses "
        "data.augment.mention_replace and data.augment.token_substitute",
    }


class TextAugmentConfig(AugmentConfig):
    """``data.augment.*`` of sequence classification: word-level noise on the texts, labels kept."""

    token_noise: float = Field(0.1, ge=0, le=1)
    """Chance per word of one noise operation, picked uniformly: swap with the next word, delete it, or
    replace it by a word of the training texts (entity-marker words are left in place)."""

    OTHER_TASK: ClassVar[dict[str, str]] = {
        key: "it is token_classification's; sequence classification uses data.augment.token_noise"
        for key in ("mention_replace", "token_substitute")
    }


class LabelledData(DataConfig):
    """``data.*`` keys of the classification tasks: few-shot selection of the training split."""

    shots_per_label: int | None = Field(None, ge=1)
    """Few-shot: keep k training examples per class (token classification: k sentences per entity
    type, see ``distributed_ft/data/few_shot.py``), sampled by ``train.seed``; before augmentation."""


class TokenClassificationData(LabelledData):
    """``data.*`` of ``task=token_classification`` (NER and other word tagging)."""

    tokens_column: str = "tokens"
    """Column (JSONL/CSV/Parquet) holding the list of words of a sentence."""
    tags_column: str = "tags"
    """Column holding the list of word tags."""
    conll_tag_column: int = -1
    """Which CoNLL column holds the tag (0-based). -1 (default): the last one, and the number of columns
    may vary from line to line (MeCab-style files); any other value: every line has the same columns."""
    tag_scheme: Literal["auto", "iob1", "iob2", "iobes"] = "auto"
    """Input tagging scheme; everything is normalised to IOB2."""
    label_all_subtokens: bool = False
    """Label every sub-token of a word (continuations get the ``I-`` tag) instead of the first only."""
    augment: TokenAugmentConfig = TokenAugmentConfig()
    """Mention replacement and same-tag word substitution on the training split."""
    gazetteer: str | None = None
    """A gazetteer file (UTF-8 ``surface<TAB>TYPE`` lines; ``dft data gazetteer`` builds one from the
    training split): its dictionary matches (longest first, on words) become per-token features added
    to the word embeddings through a zero-initialised embedding (``distributed_ft/data/gazetteer.py``)."""
    gazetteer_lowercase: bool = False
    """Match the gazetteer case-insensitively (both sides lowercased)."""

    @model_validator(mode="after")
    def _check_gazetteer(self) -> TokenClassificationData:
        if self.gazetteer_lowercase and not self.gazetteer:
            raise ValueError("data.gazetteer_lowercase=true is for a gazetteer: set data.gazetteer=FILE")
        return self


class SequenceClassificationData(LabelledData):
    """``data.*`` of ``task=sequence_classification`` (single- and multi-label, pairs, relations)."""

    text_column: str = "text"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Column holding the second text of a pair (e.g. NLI hypothesis)."""
    label_column: str = "label"
    """Column holding the label (multi-label: a list, or see ``label_delimiter``)."""
    multi_label: bool = False
    """Each example has any number of labels (sigmoid per class)."""
    label_delimiter: str | None = None
    """Multi-label labels written in one string, split at this delimiter (e.g. ``|``)."""
    class_weights: Literal["none", "balanced"] = "none"
    """``balanced`` weights the loss by inverse class frequency of the training set (multi-label: a
    positive weight per class, negatives/positives)."""
    entity_markers: bool | list[str] = False
    """Relation classification: marker tokens added to the tokenizer (``true``: ``[E1]`` ``[/E1]``
    ``[E2]`` ``[/E2]``); each text must contain every marker once."""
    augment: TextAugmentConfig = TextAugmentConfig()
    """Word-level noise on the training texts."""


class CausalLMData(DataConfig):
    """``data.*`` of ``task=causal_lm`` (instruction tuning on prompt/response or chat records)."""

    prompt_column: str = "prompt"
    """Column holding the prompt (instruction) of a prompt/response record."""
    response_column: str = "response"
    """Column holding the response the model learns to produce."""
    messages_column: str = "messages"
    """Column holding a chat (a list of ``role``/``content`` objects); loss on assistant turns."""
    chat_template: Literal["auto", "plain"] = "auto"
    """``auto`` uses the tokenizer's chat template when it has one, else the plain template."""
    packing: bool = True
    """Pack training examples into rows of ``max_length`` tokens (no attention across them)."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens generated per prompt (``dft predict`` and evaluation samples)."""
    generate_samples: int = Field(0, ge=0)
    """Generate responses for the first N evaluation prompts and keep them in the results."""


DATA_SECTIONS: dict[str, type[DataConfig]] = {
    "token_classification": TokenClassificationData,
    "sequence_classification": SequenceClassificationData,
    "causal_lm": CausalLMData,
}
"""The ``data`` section of each task: the shared keys plus the task's own."""

TASK_FORMATS: dict[str, str] = {"conll": "token_classification", "folder": "sequence_classification"}
"""Formats only one task reads."""


def key_owners(key: str) -> tuple[str, ...]:
    """The tasks whose ``data`` sections have ``key`` (empty: shared by all, or no task has it)."""
    if key in DataConfig.model_fields:
        return ()
    return tuple(task for task, section in DATA_SECTIONS.items() if key in section.model_fields)


def data_section(task: str, value: Any) -> DataConfig:
    """Validate ``value`` (a mapping or another task's section) as the ``data`` section of ``task``."""
    section = DATA_SECTIONS[task]
    if isinstance(value, section):
        return value
    if isinstance(value, DataConfig):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, dict):
        for key in value:
            owners = key_owners(key)
            if owners and task not in owners:
                raise ValueError(
                    f"data.{key} is a {' / '.join(owners)} key, but this job's task is {task}: "
                    f"drop it, or set task={' or task='.join(owners)}"
                )
        fmt = value.get("format")
        if fmt in TASK_FORMATS and TASK_FORMATS[fmt] != task:
            raise ValueError(f"data.format={fmt} is read by {TASK_FORMATS[fmt]} only, not by task={task}")
    return section.model_validate(value)


class TrainConfig(_Section):
    """``train.*``: optimisation, schedule, evaluation and checkpoint cadence."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides ``epochs`` when set."""
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    """Examples per device per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    layer_lr_decay: float | None = Field(None, gt=0, le=1)
    """Discriminative fine-tuning: layer i of L trains at ``lr * decay**(L - i)``, the embeddings at
    ``lr * decay**(L + 1)``, what sits above the layers (final norm, pooler, head) at ``lr``."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the task head (classification tasks; default ``lr``)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (``null`` disables clipping)."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N optimizer steps (in addition to the end of each epoch when ``eval_each_epoch``)."""
    eval_each_epoch: bool = True
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of ``eval.metric``."""
    seed: int = 42
    save_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every N optimizer steps (and always at each evaluation)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep (the best one is kept in addition)."""
    log_every: int = Field(10, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast compute dtype; master weights stay in ``model.dtype``."""
    fused_optimizer: bool = True
    """Use torch's fused AdamW kernel where available (much faster on CPU)."""
    adversarial: Literal["none", "fgm", "pgd"] = "none"
    """Adversarial training on the input embeddings (``train/adversarial.py``): ``fgm`` adds one
    perturbation of norm ``adversarial_epsilon`` along the clean loss's gradient; ``pgd`` takes
    ``adversarial_steps`` ascent steps of size ``adversarial_alpha`` inside that ball. Each micro-batch
    then trains on the mean of the clean and the adversarial loss (cost: 1 + steps forwards)."""
    adversarial_epsilon: float = Field(1.0, ge=0)
    """Radius of the perturbation, an L2 norm per example (over all its tokens and hidden units)."""
    adversarial_alpha: float | None = Field(None, gt=0)
    """pgd: size of each ascent step (default ``adversarial_epsilon / adversarial_steps``)."""
    adversarial_steps: int = Field(3, ge=1)
    """pgd: ascent steps (each one more forward and input-gradient backward per micro-batch)."""
    adversarial_target: Literal["word", "all"] = "word"
    """Which embeddings are perturbed: ``word`` the token embeddings (``get_input_embeddings()``);
    ``all`` the output of the model's embeddings block (BERT-style: word + position + token type,
    normalised), for models that have one."""

    @model_validator(mode="after")
    def _check_adversarial(self) -> TrainConfig:
        """Settings of a method that is not on are errors; defaults are not (a resolved config.yaml)."""
        fields = type(self).model_fields
        given = {k for k in self.model_fields_set if getattr(self, k) != fields[k].default}
        pgd_only = sorted(k for k in ("adversarial_alpha", "adversarial_steps") if k in given)
        if pgd_only and self.adversarial != "pgd":
            raise ValueError(
                f"train.{pgd_only[0]} is a PGD setting but train.adversarial={self.adversarial}: "
                "drop it, or set train.adversarial=pgd"
            )
        options = sorted(k for k in ("adversarial_epsilon", "adversarial_target") if k in given)
        if options and self.adversarial == "none":
            raise ValueError(
                f"train.{options[0]} is set but train.adversarial=none: drop it, or set "
                "train.adversarial=fgm (or pgd)"
            )
        return self

    @property
    def adversarial_step_size(self) -> float:
        """The ascent step of PGD (FGM: one step of the whole radius)."""
        if self.adversarial != "pgd":
            return self.adversarial_epsilon
        return self.adversarial_alpha or self.adversarial_epsilon / self.adversarial_steps


class EvalConfig(_Section):
    """``eval.*``: the metric that picks the best checkpoint and evaluation batching."""

    metric: str | None = None
    """Metric that drives early stopping and the best checkpoint; ``null``: the task's default (f1,
    macro_f1, loss), resolved when the config loads (see ``config/task_metrics.py``)."""
    batch_size: int = Field(64, ge=1)
    seqeval_mode: Literal["default", "strict"] = "default"
    """``strict`` scores IOB2 entities with seqeval's strict mode."""


class PeftConfig(_Section):
    """``peft.*``: parameter-efficient fine-tuning (LoRA and friends)."""

    method: Literal["none", "lora", "ia3", "prompt_tuning", "prefix_tuning", "freeze"] = "none"
    """``none`` trains every weight; ``freeze`` trains the head (and ``train_top_k_layers``) only; the
    others train PEFT adapters plus the task head (see ``distributed_ft/modeling/PEFT.md``)."""
    r: int = Field(8, ge=1)
    """lora: rank of the A (r x in) and B (out x r) matrices."""
    alpha: int = Field(16, ge=1)
    """lora: scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """lora: dropout on the adapter input."""
    target_modules: list[str] | None = None
    """lora/ia3: module names to adapt (a name matches a module whose dotted path ends with it, e.g.
    ``query`` or ``attention.output.dense``); default: chosen per architecture (BERT: query, value)."""
    use_dora: bool = False
    """lora: DoRA, weight-decomposed LoRA (adds a magnitude vector per adapted module)."""
    use_rslora: bool = False
    """lora: rank-stabilised scaling ``alpha / sqrt(r)``."""
    feedforward_modules: list[str] | None = None
    """ia3: which of the targets are feed-forward layers (scaled at their input, not output); default
    per architecture when ``target_modules`` is not set, else none."""
    num_virtual_tokens: int = Field(20, ge=1)
    """prompt_tuning/prefix_tuning: learned virtual tokens (prompt: input embeddings; prefix: keys and
    values in every layer)."""
    train_top_k_layers: int = Field(0, ge=0)
    """freeze: also train the top k transformer layers and everything above them (final norm, pooler);
    0 trains the task head only."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (the task head always is)."""

    @model_validator(mode="after")
    def _check_method_options(self) -> PeftConfig:
        if (self.use_dora or self.use_rslora) and self.method != "lora":
            raise ValueError("peft.use_dora / peft.use_rslora need peft.method=lora")
        if self.train_top_k_layers and self.method != "freeze":
            raise ValueError("peft.train_top_k_layers needs peft.method=freeze")
        if self.feedforward_modules is not None and self.method != "ia3":
            raise ValueError("peft.feedforward_modules needs peft.method=ia3")
        return self


class DeepSpeedConfig(_Section):
    """``deepspeed.*``: ZeRO stage and offload; setting any of them selects ``run.engine=deepspeed``."""

    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = False
    config: str | None = None
    """A DeepSpeed JSON file to start from; values that conflict with this job config are errors."""


class RunConfig(_Section):
    """``run.*``: where the run writes, which backend and engine, how many workers."""

    output_dir: str | None = None
    """Run directory (default ``runs/<recipe>-<timestamp>``)."""
    backend: Literal["local", "ray"] = "local"
    engine: Literal["torch", "deepspeed"] = "torch"
    """``torch`` (plain/DDP) unless a ``deepspeed.*`` key is given: then ``deepspeed``."""
    num_workers: int | tuple[int, int] = 1
    """Workers (ranks). ``[min, max]``: elastic (Ray Train's elastic scaling; any world size in the range
    under torchrun): the global batch is fixed at ``max x batch_size x grad_accum`` and ``grad_accum``
    grows when fewer workers run, so every size in the range must divide ``max x grad_accum``."""
    use_gpu: bool | Literal["auto"] = "auto"
    """``auto``: a GPU when one is present (the log says which device); ``true`` insists on one; ``false``
    stays on the CPU. The same for training and for ``dft predict`` / ``evaluate`` / ``export``."""
    resume: str = "auto"
    """``auto`` (newest good checkpoint in ``output_dir`` if any), ``never``, or a checkpoint path."""
    progress: bool = True
    """Show progress bars (rank 0 only)."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per process (default: torch's choice)."""
    storage_path: str | None = None
    """Ray: where checkpoints persist (local path or a pyarrow URI such as s3://...; default run_dir/ray)."""
    max_failures: int = Field(3, ge=-1)
    """Ray: worker-group restarts from the last checkpoint before the job fails (-1: unlimited)."""
    resources_per_worker: dict[str, float] | None = None
    """Ray: resources each worker reserves, e.g. {CPU: 8, GPU: 1}."""
    ray_run_name: str | None = None
    """Ray: the run name under ``storage_path`` (default: the run directory's name)."""
    hang_timeout_s: float | None = Field(None, gt=0)
    """A rank that makes no step progress for this long writes every thread's stack and its last
    collectives to ``RUN_DIR/hangs/rank-N.txt`` and exits non-zero, so the launcher restarts the run from
    its last checkpoint (``null``: no watchdog)."""

    @field_validator("num_workers")
    @classmethod
    def _workers_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"run.num_workers must be >= 1, or [min, max] with 1 <= min <= max; got {value}")
        return value

    @property
    def worker_range(self) -> tuple[int, int]:
        """``(min, max)`` workers; equal unless the run is elastic."""
        workers = self.num_workers
        return (workers, workers) if isinstance(workers, int) else workers

    @property
    def elastic(self) -> bool:
        """Whether ``run.num_workers`` is a ``[min, max]`` range."""
        low, high = self.worker_range
        return low != high


class TrackConfig(_Section):
    """``track.*``: where a run's metrics go besides ``metrics.jsonl`` (rank 0; JSONL stays the record)."""

    tensorboard: bool = False
    """Write TensorBoard event files to ``RUN_DIR/tensorboard`` (needs the ``tracking`` extra)."""
    mlflow: bool = False
    """Log the run to MLflow: params (the resolved config), metrics per step, the export as an artifact."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; ``null``: a local file store in ``RUN_DIR/mlruns``."""
    mlflow_experiment: str = "distributed_ft"
    """MLflow experiment name."""
    report: bool = True
    """Write ``RUN_DIR/report/`` at the end of the run: PNG curves and ``report.md`` (``dft report``)."""


class ClusterConfig(_Section):
    """``cluster.*``: the hardware ``dft plan`` sizes the job for."""

    gpu_type: str = "H100-80GB"
    gpu_memory_gb: float = Field(80, gt=0)
    gpus_per_node: int = Field(8, ge=1)
    nodes: int = Field(1, ge=1)
    host_memory_gb: float = Field(1024, gt=0)
    price_per_gpu_hour: float = Field(2.5, ge=0)


class JobConfig(_Section):
    """A whole fine-tuning job."""

    task: TaskName = "token_classification"
    model: ModelConfig = ModelConfig()
    data: SerializeAsAny[DataConfig] = Field(default_factory=dict, validate_default=True)
    """The shared ``data.*`` keys plus those of ``task`` (see :data:`DATA_SECTIONS`)."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    peft: PeftConfig = PeftConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    run: RunConfig = RunConfig()
    track: TrackConfig = TrackConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("data", mode="before")
    @classmethod
    def _task_data(cls, value: Any, info: ValidationInfo) -> Any:
        task = info.data.get("task")
        return value if task is None else data_section(task, value)

    @model_validator(mode="after")
    def _resolve(self) -> JobConfig:
        """The task's default metric, the engine a ``deepspeed.*`` key implies, the head rule."""
        self.eval.metric = resolve_metric(self.task, self.eval.metric)
        self._select_engine()
        if self.task == "causal_lm" and self.model.reset_head is True:
            raise ValueError(
                "model.reset_head=true: causal_lm has no classification head (the LM head is tied to the "
                "vocabulary); use auto or false"
            )
        self._check_crf()
        return self

    def _check_crf(self) -> None:
        """``model.crf`` tags words: token classification only, on each word's first sub-token."""
        if not self.model.crf:
            if self.model.crf_constraints != ModelConfig.model_fields["crf_constraints"].default:
                raise ValueError(
                    f"model.crf_constraints={self.model.crf_constraints} is for the CRF: set model.crf=true"
                )
            return
        if self.task != "token_classification":
            raise ValueError(
                f"model.crf=true tags the words of a sentence (task=token_classification); task={self.task} "
                "has no CRF: drop model.crf"
            )
        if self.data.label_all_subtokens:
            raise ValueError(
                "model.crf=true runs the CRF over each word's first sub-token: set "
                "data.label_all_subtokens=false, or model.crf=false for the plain head"
            )

    def _select_engine(self) -> None:
        """A given ``deepspeed.*`` key selects ``run.engine=deepspeed``; beside an explicit torch: an error.

        Keys equal to their defaults are allowed beside an explicit ``run.engine=torch``: that is how the
        resolved ``config.yaml`` of a torch run reads.
        """
        given = sorted(self.deepspeed.model_fields_set)
        if not given or self.run.engine == "deepspeed":
            return
        if "engine" not in self.run.model_fields_set:
            shown = " ".join(f"deepspeed.{key}={getattr(self.deepspeed, key)}" for key in given)
            log.warning("%s is set: using run.engine=deepspeed", shown)
            self.run.engine = "deepspeed"
            return
        defaults = DeepSpeedConfig.model_fields
        for key in given:
            value = getattr(self.deepspeed, key)
            if value != defaults[key].default:
                raise ValueError(
                    f"deepspeed.{key}={value} is set but run.engine=torch: drop one, or set "
                    "run.engine=deepspeed"
                )

    @model_validator(mode="after")
    def _check_combinations(self) -> JobConfig:
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero3 = self.run.engine == "deepspeed" and self.deepspeed.zero_stage == 3
        if self.train.adversarial != "none" and zero3:
            raise ValueError(
                f"train.adversarial={self.train.adversarial} with deepspeed.zero_stage=3: the perturbation "
                "takes the loss's gradient on the embeddings in a backward of its own, outside "
                "DeepSpeed's, and ZeRO-3 gathers and releases its partitioned parameters in backward "
                "hooks that do not expect one; set deepspeed.zero_stage to 2 or lower (or "
                "run.engine=torch), or train.adversarial=none"
            )
        low, high = self.run.worker_range
        lanes = high * self.train.grad_accum
        uneven = [n for n in range(low, high + 1) if lanes % n]
        if uneven:
            common = math.lcm(*range(low, high + 1))
            accum = common // math.gcd(common, high)  # the smallest grad_accum every size divides
            raise ValueError(
                f"run.num_workers={list(self.run.worker_range)} with "
                f"train.grad_accum={self.train.grad_accum}: the global batch is {lanes} micro-batches "
                f"per step, which {uneven[0]} workers cannot split "
                f"evenly; set train.grad_accum to a multiple of {accum}, or narrow the range"
            )
        return self
