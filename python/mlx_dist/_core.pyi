"""Type stubs for the native extension ``mlx_dist._core``."""

from collections.abc import Callable, Iterator
from typing import Any

def mlx_version() -> str: ...
def supported_model_types() -> list[str]: ...

class Memory:
    """MLX's memory in this process, in bytes."""

    active: int
    peak: int
    cache: int

def memory() -> Memory:
    """MLX's memory figures now."""

def device_info(name: str, benchmark: bool = False) -> dict:
    """This process's device capabilities as a dict."""

def load(
    path_or_repo: str, materialize: bool = True, prefix_cache_mb: int | None = None
) -> tuple[Model, Tokenizer]: ...
def load_cluster(
    path_or_repo: str,
    workers: list[str],
    strategy: str = "balanced",
    compression_name: str = "none",
    kv_tokens: int = 4096,
    connect_timeout: float = 10.0,
    declared_json: str | None = None,
    progress: Callable[[int, int, int, str], None] | None = None,
    recover: bool = True,
    recovery_wait: float = 30.0,
    prefill_chunk: int = 1024,
    ring: bool = True,
    token: str | None = None,
    tls_ca: str | None = None,
    step_timeout: float | None = None,
    failure_timeout: float | None = None,
    h2_window_mb: int | None = None,
) -> tuple[Cluster, Tokenizer]:
    """Options left out (None) come from ``MLX_DIST_*`` variables, else the
    defaults; ``token`` and ``tls_ca`` (PEM text) first from
    ``set_cluster_token`` / ``set_tls_ca``."""

def start_local_worker(
    token: str | None = None,
    prefix_cache_mb: int | None = None,
    step_spin_us: int | None = None,
    launch_ahead: bool | None = None,
    warm_up: bool | None = None,
) -> str:
    """Starts a worker inside this process, which the coordinator of this
    process reaches without gRPC; returns the address that names it
    (``in-process:N``)."""

def stop_local_worker(address: str) -> None:
    """Stops a worker ``start_local_worker`` started."""

def run_worker(
    host: str = "127.0.0.1",
    port: int = 0,
    name: str | None = None,
    local_files: bool = True,
    tls_cert_pem: str | None = None,
    tls_key_pem: str | None = None,
    max_sequences: int | None = None,
    max_message_bytes: int | None = None,
    prefix_cache_mb: int | None = None,
    kv_budget_mb: int | None = None,
    token: str | None = None,
    tls_ca: str | None = None,
    cache_dir: str | None = None,
    step_spin_us: int | None = None,
    launch_ahead: bool | None = None,
    warm_up: bool | None = None,
    failure_timeout: float | None = None,
    h2_window_mb: int | None = None,
) -> None:
    """Options left out (None) come from ``MLX_DIST_*`` variables, else the
    defaults."""

def worker_info(
    address: str, timeout: float = 5.0, token: str | None = None, tls_ca: str | None = None
) -> dict:
    """The worker's DeviceInfo as a dict, its parts nested: ``device`` (what
    it can do), ``engine`` (its stage and figures), ``memory``, ``traffic``,
    ``uptime_micros`` and ``busy_for_micros``."""

def set_cluster_token(token: str | None = None) -> None:
    """The cluster token of this process's later calls given none (None or
    empty: none, whatever MLX_DIST_TOKEN says)."""

def set_tls_ca(pem: str | None = None) -> None:
    """Trust this CA certificate (PEM text) on this process's later
    connections to workers given none (TLS); None: plain connections."""

def make_certificate(hosts: list[str]) -> tuple[str, str]:
    """A self-signed certificate for these DNS names / IP addresses and its
    private key: (cert PEM, key PEM)."""

def convert(path_or_repo: str, out_dir: str) -> None: ...

# Each kind of failure is its own class: callers tell them apart by type.
# `stage` (a name) and `address` say which stage failed, where known.

class WorkerError(ConnectionError):
    """A worker failed, could not be reached, or lost its stream."""

    stage: str | None
    address: str | None

class TlsError(WorkerError):
    """The connection to the worker at ``address`` failed over TLS: its
    certificate was refused, or one side speaks TLS and the other not."""

    stage: str | None
    address: str | None

class NotReadyError(WorkerError):
    """A worker holds no shard (it restarted) or not the sequence."""

    stage: str | None
    address: str | None

class CapacityError(MemoryError):
    """A request or model that does not fit even with nothing else running:
    waiting cannot help."""

class KvBudgetExceeded(CapacityError):
    """A sequence needs more KV cache than a stage's whole budget."""

    need_bytes: int
    budget_bytes: int

class KvBudgetFull(MemoryError):
    """A stage has no room for one more sequence right now: one of those
    running ending makes room."""

class Model:
    config: dict
    model_type: str
    num_layers: int
    vocab_size: int
    path: str
    nbytes: int
    context_length: int | None
    prefix_cache_bytes: int
    prefix_cache_entries: int
    prefix_cache_budget: int
    weight_conversions: dict
    def logits(self, ids: list[int]) -> tuple[bytes, list[int]]: ...

class Cluster:
    config: dict
    plan_text: str
    plan: dict
    num_layers: int
    vocab_size: int
    context_length: int | None
    model_type: str
    names: list[str]
    addresses: list[str]
    last_stage_micros: list[int]
    epoch: int
    all_workers: list[str]
    excluded: list[str]
    recoveries: list[dict]
    prefix_index_entries: int
    def add_worker(self, address: str) -> bool: ...
    def excluded_back(self) -> bool: ...
    def replan(self, reason: str) -> int: ...

class Tokenizer:
    eos_token_ids: list[int]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    vocab_size: int
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self,
        messages_json: str,
        add_generation_prompt: bool = True,
        tools_json: str | None = None,
        extra_json: str | None = None,
    ) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def save(self, dir: str) -> None: ...

class Logprobs:
    def raw(self) -> tuple[bytes, list[int], str]: ...

class Record:
    """One step of a generation (mlx-lm's ``GenerationResponse`` fields);
    it also reads as the tuple of its fields, in this order."""

    text: str
    token: int
    logprobs: Logprobs | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...

class Generation(Iterator[Record]):
    tokens: list[int]
    cache_nbytes: int
    cached_tokens: int
    prefilling: bool
    def __init__(
        self,
        model: Model | Cluster,
        tokenizer: Tokenizer,
        prompt: list[int],
        *,
        max_tokens: int = 256,
        temp: float = 0.0,
        top_p: float = 0.0,
        min_p: float = 0.0,
        min_tokens_to_keep: int = 1,
        top_k: int = 0,
        seed: int | None = None,
        logit_bias: list[tuple[int, float]] = ...,
        repetition_penalty: float | None = None,
        repetition_context_size: int = 20,
        presence_penalty: float | None = None,
        presence_context_size: int = 20,
        frequency_penalty: float | None = None,
        frequency_context_size: int = 20,
        stop: list[str] = ...,
        prefill_step_size: int = 2048,
        logprobs: bool = True,
        defer_prefill: bool = False,
    ) -> None: ...
    def __next__(self) -> Record: ...
    def prefill_step(self) -> bool:
        """With ``defer_prefill``: runs the prompt's next chunk; True once
        all of it has run."""
