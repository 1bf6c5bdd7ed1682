"""Share of row positions holding real tokens: packed vs padded batches of Alpaca data.

Usage: python benchmarks/data_efficiency.py [alpaca.json] [--max-len 1024] [--batch 8]
Tokenizer: the real Gemma 3 270M tokenizer from the packaged GGUF file.
"""

from __future__ import annotations

import argparse
import os
import time

import common  # benchmarks/ is on sys.path when this file is run as a script

from jax_it import data, packing


def gemma_tokenizer():
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  p = common.gemma3_gguf()
  return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


def token_shares(records, tokenizer, cfg: data.DataConfig, batch_size: int) -> dict[str, float]:
  """Real-token share of one unshuffled epoch in each batch mode."""
  shares = {}
  for mode in ("pack", "pad"):
    shares[mode] = packing.real_token_share(common.epoch_batches(records, tokenizer, cfg,
                                                                 batch_size, mode))
  return shares


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("path", nargs="?", default=str(common.SHARED_DATA / common.ALPACA),
                  help="Alpaca-format JSON (default: $JAX_IT_SHARED_DATA or shared/data beside "
                  "the checkout)")
  ap.add_argument("--max-len", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--pack-bins", type=int, default=data.DataConfig.pack_bins)
  args = ap.parse_args()
  tokenizer = gemma_tokenizer()
  cfg = data.DataConfig(path=args.path, max_len=args.max_len, splits=(1.0, 0.0, 0.0),
                        pack_bins=args.pack_bins)
  records = data.load_records(cfg)
  t = time.perf_counter()
  shares = token_shares(records, tokenizer, cfg, args.batch)
  print(f"{args.path}: {len(records)} records, rows of {args.max_len}, batch {args.batch}, "
        f"{args.pack_bins} packing bins ({time.perf_counter() - t:.1f} s)")
  print(f"pack: {shares['pack']:.1%} of positions are real tokens")
  print(f"pad:  {shares['pad']:.1%} of positions are real tokens")


if __name__ == "__main__":
  main()
