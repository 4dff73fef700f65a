"""The contract between the generic trainer and a method (causal LM, SBD, LD4LG, ...).

A task builds its model, defines the loss on a batch, and knows how to turn a trained model into
samples. The trainer owns everything else: mesh, sharding, optimiser, EMA, checkpoints, data
iteration, logging. Tasks are constructed from the run config by `lsd.methods.get_task`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from lsd.config import ConfigError

Batch = dict[str, jax.Array]
# The fields an input of `Task.generate` may carry; each method reads some of them.
GENERATE_FIELDS = ("prompt", "source", "label")


class Task(abc.ABC):
  """One trainable method. Subclasses keep no mutable state besides their config and tokenizer."""

  name: str = "task"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.tokenizer = None

  def validate(self) -> None:
    """Checks everything that can be checked before data loading (model fields, sampler and eval
    settings) and raises ConfigError naming the first bad field. The trainer calls it first, so a
    bad launch fails in seconds, not after tokenizer training or the whole run."""
    return None

  def make_data(self, workdir: Path, *, process_index: int, process_count: int):
    """Returns an object with `.tokenizer`, `.train_iter()` (a checkpointable grain iterator of
    numpy batches with leading dim = per-process batch) and `.eval_batches(n)`. The default is the
    packed-canvas language-modelling pipeline of `lsd.data`."""
    from lsd.data import build_data

    bundle = build_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )
    self.tokenizer = bundle.tokenizer
    return bundle

  def load_run_files(self, workdir: Path) -> None:
    """Reloads the files a finished run keeps beside its checkpoints besides the tokenizer (e.g.
    statistics computed by `make_data`); `lsd.train.stages.load_run` calls it after attaching the
    tokenizer, once the run has a checkpoint. The default has none."""
    return None

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Creates the model. Must be callable under `nnx.eval_shape` (no data-dependent work)."""

  def initial_params(self, params: nnx.State) -> nnx.State:
    """The parameters a fresh run starts from: `params` (the random init) unless the task starts
    from another run's weights, in which case it returns a tree of the same structure (the trainer
    places it with the init's shardings). Not called when a run resumes from its checkpoint."""
    return params

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    """Scalar fp32 loss and a dict of scalar metrics. Pure: randomness only from `key`."""

  def eval_loss(self, model: nnx.Module, batch: Batch, key: jax.Array) -> jax.Array:
    """Scalar held-out loss; `loss` unless a task has training-only noise (dropout) to turn off.
    Diffusion tasks keep their noise: it is part of the objective being estimated."""
    return self.loss(model, batch, key)[0]

  def likelihood(self, *, num_samples: int = 1, block_size: int | None = None):
    """Held-out likelihood (`lsd eval --nelbo`, `lsd.eval.likelihood`): returns (fn, info), fn(model,
    batch, key) -> (per-canvas NLL or NELBO sums [B], scored tokens [B]) over batches {"tokens",
    "valid", "row"}, info a dict describing the estimate. The default refuses, naming the method."""
    raise ConfigError(
      f"likelihood evaluation (--nelbo) is not supported for method "
      f"{self.config.get('method', self.name)!r}; accepted: runs of method sbd or causal_lm"
    )

  def tokens_in(self, batch: Batch) -> int:
    """Tokens the model consumed for this batch (for tokens/s); static from shapes."""
    tokens = batch["tokens"]
    return int(tokens.shape[0] * tokens.shape[1])

  def flops_per_token(self) -> float:
    """Approximate training FLOPs per token (6 * params + attention), for MFU. 0 if unknown."""
    return 0.0

  def prepare_abstract(self) -> None:
    """Makes `build_model`, `loss` and `flops_per_token` usable without data, for ahead-of-time
    compilation (`lsd compile`, `lsd.train.aot`). The default gives a task with no tokenizer yet
    the one its `data.tokenizer` config describes (`lsd.train.aot.config_tokenizer`: the real one
    when it needs no training, else a stand-in with `vocab_size` ids)."""
    if self.tokenizer is None:
      from lsd.train.aot import config_tokenizer

      self.tokenizer = config_tokenizer(self.config.data.tokenizer)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global training batch of `batch_size` rows, as `make_data`'s
    iterator yields them (stacked over processes). The default is the packed-canvas pipeline:
    {"tokens": int32[B, L], "valid": bool[B, L]}, L = data.seq_len."""
    from lsd.train.aot import abstract_lm_batch

    return abstract_lm_batch(batch_size, int(self.config.data.seq_len))

  def lower_sampler(self, graphdef: nnx.GraphDef, params, key, num_samples: int):
    """The jitted sampler behind `sample_text`, lowered (`jax.stages.Lowered`) for abstract
    `params` and `key` (ShapeDtypeStructs with shardings), for `lsd compile --sampler`."""
    raise NotImplementedError(f"task {self.name!r} has no sampler that compiles ahead of time")

  def sample_text(self, model: nnx.Module, key: jax.Array, num_samples: int) -> list[Any]:
    """Samples for the end-of-training printout and `lsd sample`; list of strings or dicts."""
    raise NotImplementedError(f"task {self.name!r} has no sampler")

  def generate(
    self, model: nnx.Module, key: jax.Array, inputs: list[dict], **options
  ) -> list[dict]:
    """Conditional generation, the one path of `lsd sample --inputs/--prompt/--source/--label` and
    `lsd.api.generate`: one output record per input, `{**input, "text": ..., ...}`.

    An input carries the fields its method reads (`GENERATE_FIELDS`): "prompt" (a text to
    continue), "source" (a seq2seq source text), "label" (a class id). `options` are the method's
    (e.g. guidance_scale); None or absent = the run's `config.sample`. The default refuses, naming
    the method: a method that generates conditionally overrides this."""
    raise ConfigError(
      f"method {self.config.get('method', self.name)!r} has no conditional generation (inputs "
      f"with {list(GENERATE_FIELDS)}); `lsd sample` without inputs draws unconditional samples"
    )

  def generation_inputs(self, inputs, fields: tuple[str, ...]) -> list[dict]:
    """`inputs` checked for `generate`: a list of dicts whose keys are among `fields` (the ones
    this method reads); a ConfigError names the first bad input and what is accepted."""
    method = self.config.get("method", self.name)
    if isinstance(inputs, dict | str) or not all(isinstance(x, dict) for x in inputs):
      raise ConfigError(f"generate: inputs must be a list of dicts with {list(fields)}")
    for i, x in enumerate(inputs):
      extra = sorted(set(x) - set(fields))
      if extra:
        raise ConfigError(
          f"generate: input {i} has {extra}, which this {method!r} run does not read; accepted: "
          f"{list(fields)}"
        )
    return [dict(x) for x in inputs]
