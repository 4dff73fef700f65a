"""The reference side of benchmarks/peers.py: a long-lived worker run with the reference's own
Python (its virtual environment, torch on CPU), speaking one JSON object per line on stdin / stdout.

    <ref venv>/bin/python benchmarks/peers_ref_worker.py --bd3lms PATH --threads N
    <ref venv>/bin/python benchmarks/peers_ref_worker.py --ld4lg PATH --threads N

bd3lms requests: {"cmd": "build_sampler", "length": L, "batch": B, "steps": T}, {"cmd": "sample"},
{"cmd": "build_train", "batch": B, "length": L}, {"cmd": "train", "steps": n}, {"cmd": "quit"}.
LD4LG requests: {"cmd": "build_sampler", "batch": B, "steps": T, "model": {...}}, {"cmd": "sample"}.
Every answer is one line, {"ok": true, ...} or {"ok": false, "error": ...}; timed answers carry
"seconds", measured here around the call only (no pipe traffic).

The CPU patches bd3lms needs are made here, in this process, never in the checkout's files:
- `DIT.reset_kv_cache` allocates its buffer on CUDA in bf16 and lacks the `eval_batch_size=`
  argument `_semi_ar_sampler` passes: it is replaced by one that allocates the same buffer in fp32
  on the CPU.
- `timm` (only its LR scheduler, for training with Lightning) and the reference's `dataloader`
  (the corpora) are imported at module level and not needed for a forward: stub modules.
- `metrics.Metrics` loads a tokenizer from the hub: `transformers.AutoTokenizer.from_pretrained`
  returns a local stand-in instead (vocabulary 4099; bd3lms adds its [MASK] as id 4099).
- The head and adaLN layers start at zero (an untrained model would emit constant logits): every
  all-zero parameter is redrawn from N(0, 0.02).

The patches of latent-diffusion-for-language (LD4LG), made the same way:
- `diffusion/text_denoising_diffusion.py` imports its whole training stack at module level (the
  BART / T5 latent models, accelerate, wandb, ema_pytorch, PIL, the datasets and evaluation
  packages); `model/diffusion_transformer.py` imports torchvision, whose PyPI build does not load
  beside this torch. None is used by the denoiser or `GaussianDiffusion.ddpm_sample`: stub modules,
  installed after transformers is imported (it probes for accelerate when imported).
- `GaussianDiffusion.using_latent_model` is set by its Trainer; it is set to True (the latent
  model: every latent is valid), as the Trainer does for LD4LG runs.
- The output projection starts at zero: all-zero parameters are redrawn from N(0, 0.02).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import warnings

VOCAB = 4099  # bd3lms appends [MASK] = 4099, so the model's vocabulary is 4100, as lsd's
DATA_IDS = 4096  # training ids are drawn below this (never a special or the mask id)


class LocalTokenizer:
  """Stands in for the hub tokenizers bd3lms loads; only the fields its model and sampler read."""

  vocab_size = VOCAB
  mask_token = None
  mask_token_id = None
  bos_token_id = 4096
  eos_token_id = 4097
  pad_token_id = 4098
  bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"

  def __len__(self):
    return self.vocab_size

  def batch_decode(self, ids, **kw):
    return [" ".join(map(str, row)) for row in ids]


def install_stubs():
  timm = types.ModuleType("timm")
  timm.scheduler = types.ModuleType("timm.scheduler")
  timm.scheduler.CosineLRScheduler = type("CosineLRScheduler", (), {})
  sys.modules["timm"] = timm
  sys.modules["timm.scheduler"] = timm.scheduler
  dataloader = types.ModuleType("dataloader")
  for name in ("FaultTolerantDistributedSampler", "RandomFaultTolerantSampler"):
    setattr(dataloader, name, type(name, (), {}))
  sys.modules["dataloader"] = dataloader
  import transformers

  transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: LocalTokenizer())


class Reference:
  def __init__(self, path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    self.torch = torch
    self.path = os.path.abspath(path)
    sys.path.insert(0, self.path)
    install_stubs()
    import omegaconf

    for name, fn in [
      ("cwd", os.getcwd),
      ("device_count", torch.cuda.device_count),
      ("eval", eval),
      ("div_up", lambda x, y: (x + y - 1) // y),
    ]:
      if not omegaconf.OmegaConf.has_resolver(name):
        omegaconf.OmegaConf.register_new_resolver(name, fn)
    import diffusion
    import models.dit

    self.diffusion = diffusion

    def reset_kv_cache(dit, eval_batch_size=None):
      n = dit.config.loader.eval_batch_size if eval_batch_size is None else eval_batch_size
      for block in dit.blocks:
        block.kv_cache = torch.zeros(
          n, dit.max_seqlen, dit.config.model.hidden_size * 3, dtype=torch.float32
        )
        block.cache_idx = 0

    models.dit.DIT.reset_kv_cache = reset_kv_cache
    self.model = None
    self.forwards = 0

  def config(self, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    base = [
      "model=tiny",
      "model.hidden_size=128",
      "model.n_blocks=4",
      "model.n_heads=4",
      "model.cond_dim=64",
      "model.dropout=0",
      "model.attn_backend=sdpa",
      "block_size=4",
      "training.ema=0",
      "trainer.devices=1",
      "trainer.accelerator=cpu",
    ]
    with initialize_config_dir(config_dir=os.path.join(self.path, "configs"), version_base=None):
      return compose(config_name="config", overrides=base + overrides)

  def build(self, overrides: list[str]):
    torch = self.torch
    torch.manual_seed(0)
    model = self.diffusion.Diffusion(self.config(overrides), tokenizer=LocalTokenizer())
    with torch.no_grad():
      for p in model.backbone.parameters():
        if not p.any():
          p.normal_(0.0, 0.02)

    def count(*_):
      self.forwards += 1

    model.backbone.register_forward_pre_hook(count)
    self.model = model
    return model

  def build_sampler(self, length: int, batch: int, steps: int) -> dict:
    self.batch, self.length, self.steps = batch, length, steps
    model = self.build(
      [
        "mode=sample_eval",
        f"model.length={length}",
        f"loader.eval_batch_size={batch}",
        f"loader.batch_size={batch}",
        "sampling.kv_cache=true",
        "sampling.first_hitting=false",
        f"algo.T={steps}",
        "sampling.nucleus_p=1.0",
      ]
    )
    model.eval()
    n_params = sum(p.numel() for p in model.backbone.parameters())
    return {"n_params": n_params, "mask_id": model.mask_index, "vocab": model.vocab_size}

  def sample(self) -> dict:
    m = self.model
    self.forwards = 0
    t = time.perf_counter()
    x, steps = m._semi_ar_sampler(self.batch, self.steps, self.length // m.block_size, self.length)
    seconds = time.perf_counter() - t
    if x is None:
      return {"seconds": seconds, "nfe": self.forwards, "stopped_early": True}
    return {
      "seconds": seconds,
      "nfe": self.forwards,
      "sampler_steps": steps,
      "shape": list(x.shape),
      "masked_left": int((x == m.mask_index).sum()),
      "distinct_tokens": int(x.unique().numel()),
    }

  def build_train(self, batch: int, length: int) -> dict:
    torch = self.torch
    model = self.build(
      [f"model.length={length}", f"loader.batch_size={batch}", f"loader.eval_batch_size={batch}"]
    )
    model.train()
    cfg = model.config.optim
    self.opt = torch.optim.AdamW(
      model._get_parameters(),
      lr=cfg.lr,
      betas=(cfg.beta1, cfg.beta2),
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
    )
    g = torch.Generator().manual_seed(0)
    self.batches = [torch.randint(0, DATA_IDS, (batch, length), generator=g) for _ in range(4)]
    self.mask = torch.ones(batch, length)
    self.step_i = 0
    return {"n_params": sum(p.numel() for p in model.backbone.parameters())}

  def train(self, steps: int) -> dict:
    torch, m = self.torch, self.model
    t = time.perf_counter()
    for _ in range(steps):
      x0 = self.batches[self.step_i % len(self.batches)]
      self.step_i += 1
      loss = m._loss(x0, self.mask.clone()).loss
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(m.backbone.parameters(), 1.0)
      self.opt.step()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "loss": float(loss.detach())}


class LD4LGReference:
  """LD4LG's denoiser (`model.diffusion_transformer.DiffusionTransformer`) and its DDPM sampler
  (`GaussianDiffusion.ddpm_sample`: self-conditioned, `steps` uniform steps of t from 1 to 0)."""

  STUBS = (
    "PIL", "PIL.Image", "ema_pytorch", "accelerate", "wandb", "torchvision",
    "torchvision.transforms", "torchvision.utils", "latent_models", "latent_models.bart_latent_model",
    "latent_models.t5_latent_model", "latent_models.latent_utils", "evaluation",
    "evaluation.evaluation", "dataset_utils", "dataset_utils.text_dataset",
  )  # fmt: skip

  def __init__(self, path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    self.torch = torch
    sys.path.insert(0, os.path.abspath(path))
    # transformers probes which optional packages exist when it is imported: import it (and the
    # classes the reference imports from it) before the stubs exist, so it never sees them.
    import transformers  # noqa: F401
    from transformers.models.bart import modeling_bart  # noqa: F401

    for name in self.STUBS:
      mod = sys.modules[name] = types.ModuleType(name)
      mod.__path__ = []  # a package, so `from x.y import z` finds the stub submodule
      mod.__getattr__ = lambda attr, name=name: type(attr, (), {})  # any imported name
    from diffusion.text_denoising_diffusion import GaussianDiffusion
    from model.diffusion_transformer import DiffusionTransformer

    self.GaussianDiffusion, self.DiffusionTransformer = GaussianDiffusion, DiffusionTransformer

  def build_sampler(self, batch: int, steps: int, model: dict) -> dict:
    torch = self.torch
    torch.manual_seed(0)
    net = self.DiffusionTransformer(
      tx_dim=model["d_model"],
      tx_depth=model["n_layers"],
      heads=model["n_heads"],
      latent_dim=model["d_latent"],
      max_seq_len=model["num_latents"],
      self_condition=True,
      dropout=0.0,
      scale_shift=True,
      num_dense_connections=model["skips"],
    )
    diffusion = self.GaussianDiffusion(
      net,
      max_seq_len=model["num_latents"],
      sampling_timesteps=steps,
      objective="pred_v",
      train_schedule="cosine",
      sampler="ddpm",
    )
    diffusion.using_latent_model = True
    with torch.no_grad():
      for p in net.parameters():
        if not p.any():
          p.normal_(0.0, 0.02)
    diffusion.eval()
    self.forwards = 0

    def count(*_):
      self.forwards += 1

    net.register_forward_pre_hook(count)
    self.diffusion, self.batch, self.steps = diffusion, batch, steps
    return {"n_params": sum(p.numel() for p in net.parameters())}

  def sample(self) -> dict:
    self.forwards = 0
    t = time.perf_counter()
    with self.torch.no_grad():
      z, _ = self.diffusion.sample(self.batch, None)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "nfe": self.forwards, "shape": list(z.shape),
            "finite": bool(self.torch.isfinite(z).all())}  # fmt: skip


def main():
  p = argparse.ArgumentParser()
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--bd3lms", help="a bd3lms checkout")
  which.add_argument("--ld4lg", help="a latent-diffusion-for-language checkout")
  p.add_argument("--threads", type=int, required=True)
  args = p.parse_args()
  warnings.filterwarnings("ignore", message=".*Disabling autocast")  # autocast('cuda') on a CPU
  # The protocol owns the original stdout; anything the reference prints goes to stderr.
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  try:
    if args.bd3lms:
      ref = Reference(args.bd3lms, args.threads)
    else:
      ref = LD4LGReference(args.ld4lg, args.threads)
    import torch

    hello = {"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads()}
  except Exception as e:  # noqa: BLE001 (reported to the driver, which stops)
    hello = {"ok": False, "error": f"{type(e).__name__}: {e}"}
  proto.write(json.dumps(hello) + "\n")
  if not hello["ok"]:
    return
  for line in sys.stdin:
    req = json.loads(line)
    cmd = req.pop("cmd")
    if cmd == "quit":
      break
    try:
      out = {"ok": True, **getattr(ref, cmd)(**req)}
    except Exception as e:  # noqa: BLE001
      import traceback

      traceback.print_exc()
      out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    proto.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main()
