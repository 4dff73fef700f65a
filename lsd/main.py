"""`lsd` command line: train, sample, eval.

lsd train  --config FILE[:ARG] --workdir DIR [--config.a.b=value ...]
lsd sample --workdir DIR [--num_samples N] [--seed S] [--out FILE.jsonl] [--config.a.b=value ...]
           [--inputs FILE.jsonl | --prompt TEXT ... | --prompts FILE | --infill TEXT ...
            | --source TEXT ... | --label N ...]
           [--attribute NAME=TARGET:SCALE ...]
lsd eval   --samples FILE.jsonl [--references FILE] [--metrics a,b] [--gen_ppl] --out PREFIX
lsd eval   --nelbo --workdir RUN [--data FILE] [--nelbo_samples K] [--block_size B] [--seed S]
lsd compile --config FILE[:ARG] --topology v5e-16|v5e:4x4|local [--mesh D,F,T] [--sampler]
lsd prepare --config FILE[:ARG] --out DIR [--shards N] [--config.a.b=value ...]
lsd export --workdir RUN --out DIR [--step N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from lsd.config import ConfigError
from lsd.fileio import as_path, one_line

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)=(.*)$", re.S)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    m = _OVERRIDE.match(argv[i])
    if m:
      overrides.append((m.group(1), m.group(2)))
    elif argv[i].startswith("--config.") and i + 1 < len(argv):
      overrides.append((argv[i][len("--config.") :], argv[i + 1]))
      i += 1
    else:
      rest.append(argv[i])
    i += 1
  return rest, overrides


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
  return value


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsd",
    description="Diffusion language models in JAX: train, sample, evaluate.",
    epilog="Run `lsd <verb> --help` for the options of each verb.",
  )
  verbs = p.add_subparsers(dest="verb", metavar="{train,sample,eval,compile,prepare,export}")
  t = verbs.add_parser(
    "train",
    help="train a model (resumes from --workdir automatically)",
    description="Train a model from a config file; resumes from the latest checkpoint in "
    "--workdir. Override any field with --config.<field>=<value>, e.g. --config.train.steps=100.",
  )
  t.add_argument(
    "--config",
    help="FILE[:ARG], e.g. configs/sbd.py:size=tiny. Optional when "
    "--workdir already holds a run (its config.json is reused).",
  )
  t.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
  d = t.add_argument_group("multi-host (one process per host, same command everywhere)")
  d.add_argument(
    "--distributed",
    action="store_true",
    help="jax.distributed.initialize() from the environment (TPU pods, SLURM)",
  )
  d.add_argument("--coordinator", help="host:port of process 0 (explicit multi-process setup)")
  d.add_argument("--num_processes", type=int)
  d.add_argument("--process_id", type=int)
  s = verbs.add_parser(
    "sample",
    help="sample from a trained run",
    description="Load the latest checkpoint of a run and print samples: unconditional ones, or "
    "with inputs one output per input (the run's method reads prompt / source / label). Any field "
    "of the run's config can be overridden for this sampling only (not saved) with "
    "--config.<field>=<value>, e.g. --config.sample.steps=50 or, LD4LG, "
    "--config.ld4lg.decoder_workdir=RUN (decode with a stage-3 run).",
  )
  s.add_argument("--workdir", required=True)
  s.add_argument(
    "--num_samples",
    type=_positive_int,
    default=None,
    help="samples to draw (>= 1; default 4), or with inputs outputs per input (default 1)",
  )
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  s.add_argument("--out", default=None, help="also write the samples to this JSONL file")
  g = s.add_argument_group("conditional generation (Task.generate; each flag repeatable)")
  g.add_argument(
    "--inputs",
    default=None,
    help="JSONL, one input per line: {prompt|infill|source|label|text+segment}",
  )
  g.add_argument("--prompt", action="append", default=[], help="a text to continue")
  g.add_argument(
    "--prompts", default=None, metavar="FILE", help="a text file, one prompt to continue per line"
  )
  g.add_argument(
    "--infill",
    action="append",
    default=[],
    metavar="TEMPLATE",
    help="SBD runs: a text whose spans [MASK:n] (n tokens each) are filled, e.g. "
    "'The [MASK:3] sat on the mat.'",
  )
  s.add_argument(
    "--max_new_tokens",
    type=_positive_int,
    default=None,
    help="SBD runs: tokens to generate per sample or prompt; may exceed data.seq_len (a sliding "
    "window of the last data.seq_len - block tokens is kept)",
  )
  g.add_argument("--source", action="append", default=[], help="a seq2seq source text")
  g.add_argument("--label", action="append", type=int, default=[], help="a class id")
  g.add_argument(
    "--text", action="append", default=[], help="a text to edit, with --segment (SLD runs)"
  )
  g.add_argument(
    "--segment",
    action="append",
    type=int,
    default=[],
    help="the segment (0-based) of --text to regenerate given the others (SLD runs)",
  )
  g.add_argument(
    "--attribute",
    action="append",
    default=[],
    metavar="NAME=TARGET:SCALE",
    help="DGLM decoder runs: guide the proposals with the classifier NAME of dglm.classifiers "
    "towards class TARGET with strength SCALE, e.g. sentiment=positive:3.0 (repeatable: the "
    "log-probabilities add up)",
  )
  e = verbs.add_parser(
    "eval",
    help="score a samples JSONL file, or a run's held-out likelihood (--nelbo)",
    description="Compute metrics for a samples JSONL ({'text': ..., 'tokens'?: [...]} per line) "
    "and write PREFIX.json and PREFIX.md. With --nelbo: the held-out NELBO (sbd runs; exact NLL for "
    "causal_lm runs) of --workdir in nats per token and its perplexity bound.",
  )
  e.add_argument("--samples", default=None, help="samples JSONL (required without --nelbo)")
  e.add_argument("--references", default=None, help="references .jsonl/.txt (ROUGE, BLEU, MAUVE)")
  e.add_argument("--reference_field", default="text")
  e.add_argument(
    "--metrics",
    default="entropy,dist_n",
    help="comma-separated: entropy, dist_n, diversity, rouge, bleu, attribute_accuracy (samples "
    "carry pred_label), mauve (judge features vs --references), classifier (a LinearProbe on judge "
    "features predicts each sample's attribute; samples carry label)",
  )
  e.add_argument("--classifier", default=None, help="LinearProbe .npz for --metrics classifier")
  e.add_argument("--gen_ppl", action="store_true", help="also score with the judge LM")
  e.add_argument("--out", default=None, help="output prefix (--nelbo: default WORKDIR/nelbo)")
  n = e.add_argument_group("likelihood (--nelbo)")
  n.add_argument("--nelbo", action="store_true", help="held-out NELBO / NLL of a trained run")
  n.add_argument("--workdir", default=None, help="the run (required with --nelbo)")
  n.add_argument(
    "--data",
    default=None,
    help=".txt (a document per line) or .jsonl; default: run's held-out split",
  )
  n.add_argument(
    "--nelbo_samples", type=_positive_int, default=8, help="draws of t per block (default 8)"
  )
  n.add_argument("--block_size", type=int, default=None, help="sbd runs (default sbd.block_small)")
  n.add_argument("--seed", type=int, default=0, help="the noise key")
  n.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  _compile_parser(verbs)
  _prepare_parser(verbs)
  _export_parser(verbs)
  return p


def _export_parser(verbs) -> None:
  x = verbs.add_parser(
    "export",
    help="write a run as a self-contained model directory (for a model hub)",
    description="Write the latest (or --step) checkpoint of a training run to --out (a new or "
    "empty directory): config.json, tokenizer.json, model.safetensors (the params, and the EMA "
    "under ema/ when the run has one) and a README.md model card with the training config and "
    "the metrics the run recorded. Earlier-stage runs the run loads (*_workdir fields) are "
    "exported inside it under stages/, a decoder checkpoint under files/. "
    "`lsd sample --workdir DIR` and lsd.api.load(DIR) read it; "
    "uploaded to the Hugging Face hub, lsd.api.load('hf:org/name') does.",
  )
  x.add_argument("--workdir", required=True, help="the training run to export")
  x.add_argument("--out", required=True, help="the model directory to write (local or gs://, ...)")
  x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _prepare_parser(verbs) -> None:
  r = verbs.add_parser(
    "prepare",
    help="tokenise a config's corpus once into ArrayRecord shards",
    description="Stream the corpus of a config's data section (three passes: count, tokenizer "
    "texts, tokenise; never held whole), tokenise it once with the run's tokenizer (a BPE trained "
    "on the training split, as `lsd train` would) and write N "
    "ArrayRecord shards, lengths.npy, tokenizer.json and manifest.json (last) to --out. Train on "
    "it with --config.data.source=prepared --config.data.path=DIR.",
  )
  r.add_argument("--config", required=True, help="FILE[:ARG], e.g. configs/sbd.py:data=text")
  r.add_argument("--out", required=True, help="the prepared directory (local or gs://, ...)")
  r.add_argument("--shards", type=_positive_int, default=1, help="ArrayRecord files (default 1)")


def _compile_parser(verbs) -> None:
  c = verbs.add_parser(
    "compile",
    help="compile the train step for a TPU topology (no TPU, no data): memory, FLOPs, fit",
    description="Lower and compile the train step (or, with --sampler, the sampler) for a TPU "
    "topology with the trainer's shardings, on any machine with libtpu installed (pip install "
    "'lsd[aot]'), and report per-device memory against the HBM, FLOPs per step, whether it fits "
    "and which levers to try. Override any field with --config.<field>=<value>. Exit code 4 when "
    "it does not fit.",
  )
  c.add_argument("--config", required=True, help="FILE[:ARG], e.g. configs/sbd.py:size=base")
  c.add_argument(
    "--topology",
    required=True,
    help="a slice (v5e-16, v4-32, v5p-128, v5e-1, v2-8, ...), a libtpu topology (v5e:4x4, "
    "v4:2x2x4) or 'local' (this machine's devices)",
  )
  c.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 16,1,1 or -1,4,1")
  c.add_argument("--sampler", action="store_true", help="compile the sampler instead")
  c.add_argument("--num_samples", type=_positive_int, default=8, help="sampler batch (--sampler)")
  c.add_argument("--out", default=None, help="report JSON (default compile-<topology>.json)")


def _train(args, overrides) -> None:
  from lsd.api import train
  from lsd.config import apply_override, from_json_file, load_config_file

  if args.coordinator:
    import jax

    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    import jax

    jax.distributed.initialize()
  workdir = as_path(args.workdir)  # a local directory or a remote URL (gs://, ...)
  try:
    resumable = (workdir / "config.json").is_file()
  except Exception as e:  # a remote store's client missing, or refusing (credentials)
    raise ConfigError(f"--workdir {str(workdir)!r} cannot be read: {one_line(e)}") from e
  if args.config:
    config = load_config_file(args.config)
  elif resumable:
    config = from_json_file(workdir / "config.json")
  else:
    raise ConfigError("--config is required for a new run (no config.json in --workdir)")
  for dotted, raw in overrides:
    apply_override(config, dotted, raw)
  result = train(config, workdir)
  if result.stopped_by is None:
    print_samples(result.samples)


def print_samples(samples: list, header: str = "") -> None:
  """Prints samples; draft-then-revise samples show the draft and the revision side by side."""
  for i, s in enumerate(samples):
    s = s if isinstance(s, dict) else {"text": s}
    ppl = lambda k, s=s: f" (judge PPL {s[k]:.1f})" if k in s else ""
    nfe = f", NFE {s['nfe_per_stage']}" if "nfe_per_stage" in s else ""
    given = "".join(f", {k} {s[k]!r}" for k in ("label", "prompt", "source") if k in s)
    print(f"\n--- sample {i}{header}{nfe}{given} ---")
    if "draft_text" in s:
      print(f"[draft]{ppl('draft_gen_ppl')}\n{s['draft_text']}\n[revised]{ppl('gen_ppl')}")
    print(f"{s['text']}" + ("" if "draft_text" in s else ppl("gen_ppl")))


def _sample_inputs(args) -> list[dict]:
  """The inputs of `lsd sample`: --inputs lines, or the --prompt (and --prompts lines) / --source /
  --label flags zipped (equal counts) and one input per --infill, each repeated --num_samples
  times; [] = unconditional sampling."""
  if args.prompts:
    try:
      with open(args.prompts, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"--prompts {args.prompts!r} cannot be read: {one_line(e)}") from e
    if not lines:
      raise ConfigError(f"--prompts {args.prompts!r} holds no prompts (one text per line)")
    args.prompt = [*args.prompt, *lines]
  if args.infill:
    from lsd.methods.sbd import parse_infill

    for template in args.infill:  # syntax errors before the run is loaded
      parse_infill(template, "--infill")
  flags = {
    k: getattr(args, k)
    for k in ("prompt", "source", "label", "text", "segment")
    if getattr(args, k)
  }
  if args.inputs and (flags or args.infill):
    given = [*flags, *(["infill"] if args.infill else [])]
    raise ConfigError(f"--inputs and --{'/--'.join(given)} exclude each other: give one")
  if args.inputs:
    from lsd.eval.report import read_jsonl  # one object per line; errors name the line

    inputs = read_jsonl(args.inputs)
    if not inputs:
      raise ConfigError(f"--inputs {args.inputs!r} holds no records (one JSON object per line)")
  else:
    counts = {len(v) for v in flags.values()}
    if len(counts) > 1:
      given = ", ".join(f"{len(v)} --{k}" for k, v in flags.items())
      raise ConfigError(f"{given}: give as many of each (input i takes the i-th of each)")
    n = counts.pop() if counts else 0
    inputs = [{k: v[i] for k, v in flags.items()} for i in range(n)]
    inputs += [{"infill": t} for t in args.infill]  # each template is an input of its own
  return [x for x in inputs for _ in range(args.num_samples or 1)]


def _sample(args, overrides) -> None:
  import jax

  from lsd import api
  from lsd.config import apply_override

  inputs = _sample_inputs(args)
  options = {}
  if args.attribute:
    from lsd.methods.dglm import parse_attribute

    if not inputs:
      raise ConfigError("--attribute guides conditional generation: give --prompt or --inputs")
    options["attributes"] = [parse_attribute(a, "--attribute") for a in args.attribute]
  run = api.load(args.workdir, step=args.step)
  for dotted, raw in overrides:  # the loaded run's config, in memory only (the task reads it)
    apply_override(run.config, dotted, raw)
  if overrides:
    run.task.validate()
  if args.max_new_tokens:
    if inputs:
      options["max_new_tokens"] = args.max_new_tokens
    elif "max_new_tokens" in run.config.sample or run.task.name == "sbd":
      with run.config.unlocked():  # an sbd run saved before the field existed lacks it
        run.config.sample.max_new_tokens = args.max_new_tokens
      run.task.validate()
    else:
      raise ConfigError(
        f"--max_new_tokens {args.max_new_tokens}: the run's method "
        f"({run.config.get('method', '?')!r}) has no sample.max_new_tokens; accepted: an sbd "
        "run, or --prompt / --inputs for methods whose generate takes it"
      )
  key = jax.random.key(args.seed)
  if inputs:
    samples = api.generate(run, key, inputs, **options)
  else:
    samples = api.sample(run, key, args.num_samples or 4)
  print_samples(samples, header=f" (step {run.step})")
  if args.out:
    with open(args.out, "w") as f:
      for s in samples:
        f.write(json.dumps(s if isinstance(s, dict) else {"text": s}) + "\n")


def _nelbo(args) -> None:
  from lsd import api
  from lsd.eval import report
  from lsd.fileio import as_path

  if not args.workdir:
    raise ConfigError("--nelbo needs --workdir RUN (a trained sbd or causal_lm run)")
  run = api.load(args.workdir, step=args.step)
  result = api.nelbo(
    run, args.data, num_samples=args.nelbo_samples, block_size=args.block_size, seed=args.seed
  )
  result = {"workdir": str(args.workdir), "data": args.data or "held-out split", **result}
  out = args.out or str(as_path(args.workdir) / "nelbo")
  report.write_report(result, out)
  kind = "NELBO" if result["estimate"].startswith("nelbo") else "NLL"
  bound = "<= " if kind == "NELBO" else ""
  print(
    f"{kind} {result['nats_per_token']:.4f} nats/token, PPL {bound}{result['ppl']:.3f} over "
    f"{result['tokens']} tokens ({result['canvases']} canvases) -> {out}.json"
  )


def _eval(args) -> None:
  from lsd.eval import report

  if args.nelbo:
    return _nelbo(args)
  if not args.samples or not args.out:
    raise ConfigError("lsd eval needs --samples FILE.jsonl and --out PREFIX (or --nelbo --workdir)")
  samples = report.read_samples(args.samples)
  refs = report.load_references(args.references, args.reference_field) if args.references else None
  metrics = [m for m in args.metrics.split(",") if m]
  extra, judge_metrics = {}, [m for m in metrics if m in ("mauve", "classifier")]
  metrics = [m for m in metrics if m not in judge_metrics]
  texts = [s["text"] for s in samples]
  if args.gen_ppl or judge_metrics:
    from lsd.eval.genppl import GenPPL

    judge = GenPPL()
    if args.gen_ppl:
      extra.update({k: v for k, v in judge(texts).items() if k != "n_samples"})
    if judge_metrics:
      features = judge.hidden_features(texts)
  if "mauve" in judge_metrics:
    if refs is None:
      raise ConfigError("--metrics mauve needs --references (the human texts to compare with)")
    from lsd.eval.metrics import mauve

    ref_texts = [r if isinstance(r, str) else r[0] for r in refs]
    extra["mauve"] = mauve(features, judge.hidden_features(ref_texts))
    extra["mauve_features"] = f"judge hidden states ({judge.judge.name}, mean-pooled)"
  if "classifier" in judge_metrics:
    if not args.classifier:
      raise ConfigError("--metrics classifier needs --classifier PROBE.npz (lsd.eval.LinearProbe)")
    from lsd.eval.metrics import LinearProbe, attribute_accuracy

    if any("label" not in s for s in samples):
      raise ConfigError(f"--metrics classifier: every record of {args.samples} needs a 'label'")
    predicted = LinearProbe.load(args.classifier).predict(features)
    extra["attribute_accuracy"] = attribute_accuracy(predicted, [s["label"] for s in samples])
  results = report.evaluate_samples(samples, references=refs, metrics=metrics, extra=extra)
  report.write_report(results, args.out)
  print(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if args.verb is None:
    _parser().print_help()
    return 2
  if overrides and args.verb not in ("train", "compile", "sample", "prepare"):
    print(
      f"lsd {args.verb}: --config.* overrides apply to train, sample, compile, prepare",
      file=sys.stderr,
    )
    return 2
  try:
    if args.verb == "train":
      _train(args, overrides)
    elif args.verb == "sample":
      _sample(args, overrides)
    elif args.verb == "compile":
      return _compile(args, overrides)
    elif args.verb == "prepare":
      _prepare(args, overrides)
    elif args.verb == "export":
      _export(args)
    else:
      _eval(args)
  except Exception as e:
    code = _exit_code(e)
    if code is None or os.environ.get("LSD_DEBUG"):
      raise
    # One line, whatever the message holds (a ConfigDict value prints as several YAML lines).
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"lsd {args.verb}: error: {text}", file=sys.stderr)
    if code == 1:
      print("(set LSD_DEBUG=1 to see the traceback)", file=sys.stderr)
    return code
  return 0


def _prepare(args, overrides) -> None:
  from lsd.api import prepare
  from lsd.config import apply_override, load_config_file

  config = load_config_file(args.config)
  for dotted, raw in overrides:
    apply_override(config, dotted, raw)
  prepare(config, args.out, shards=args.shards)


def _export(args) -> None:
  from lsd.api import export

  out = export(args.workdir, args.out, step=args.step)
  print(f"exported {args.workdir} -> {out}")


def _compile(args, overrides) -> int:
  from lsd.config import apply_override, load_config_file
  from lsd.methods import abstract, get_task
  from lsd.train import aot
  from lsd.train.state import validate_train_config

  config = load_config_file(args.config)
  if args.mesh:
    aot.set_mesh_sizes(config.mesh, args.mesh)
  for dotted, raw in overrides:
    apply_override(config, dotted, raw)
  validate_train_config(config.train)
  local = args.topology == "local"
  topology = aot.local_topology() if local else aot.describe_topology(args.topology)
  task = get_task(config)
  task.validate()
  abstract.prepare(task)
  if args.sampler:
    report = aot.compile_sampler(config, task, topology, args.num_samples)
  else:
    batch = abstract.batch(task, config.data.batch_size)
    report = aot.compile_train_step(config, task, topology, batch)
  print(aot.format_report(report))
  out = args.out or f"compile-{args.topology.replace(':', '-')}.json"
  aot.write_report(out, report, config=args.config, overrides=[f"{k}={v}" for k, v in overrides])
  print(f"report: {out}")
  return 4 if report.fits is False else 0


def _exit_code(e: BaseException) -> int | None:
  """The exit code of an error shown as one message (2 bad input, 3 divergence, 1 the machine:
  disk full, permissions); None for a bug, which keeps its traceback."""
  from lsd.train.trainer import CheckpointWriteError, TrainingDiverged

  if isinstance(e, ConfigError):
    return 2
  if isinstance(e, TrainingDiverged):
    return 3
  if isinstance(e, CheckpointWriteError | OSError):
    return 1
  return None


if __name__ == "__main__":
  sys.exit(main())
