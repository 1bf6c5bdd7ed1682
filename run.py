"""jax_it command line: train (default) | data | eval | generate | chat | serve | export | compare |
plan.

  python run.py [train] [--config FILE] [--run-dir DIR] [section.key=value ...]
  python run.py data     [--config FILE] [--show N] [section.key=value ...]   what training sees
  python run.py eval     --run-dir DIR [--data FILE | --ifeval N] [--judge URL [--judge-model M]]
  python run.py generate --run-dir DIR --prompt TEXT [--input TEXT] [--base]
  python run.py chat     --run-dir DIR [--system TEXT]    talk to the tuned model (/base, /reset)
  python run.py serve    --run-dir DIR [--port P]    the OpenAI API of the base and tuned model
  python run.py export   --run-dir DIR --out DIR [--merged] [--gguf [--gguf-type T]]
  python run.py compare  (--run-dir DIR | --config FILE)
  python run.py plan     [--config FILE] [section.key=value ...]   memory per device
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("train", "data", "eval", "generate", "chat", "serve", "export", "compare", "plan")


def parse(argv):
  if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and "=" not in argv[0]:
    # neither a command nor an option nor an override: a mistyped command, said as one
    print(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} (or "
          "options and section.key=value overrides for train)", file=sys.stderr)
    sys.exit(2)
  if not argv or argv[0] not in COMMANDS:
    argv = ["train", *argv]  # `python run.py` alone trains the default config
  p = argparse.ArgumentParser(prog="run.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=COMMANDS)
  p.add_argument("--config", help="YAML run config (train default: configs/default.yaml)")
  p.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
  p.add_argument("--data", help="eval: a file of records instead of the test split")
  p.add_argument("--ifeval", type=int, default=0, metavar="N",
                 help="eval: N generated prompts with verifiable constraints (IFEval-style)")
  p.add_argument("--judge", metavar="URL",
                 help="eval: score responses with the model behind this OpenAI-compatible URL")
  p.add_argument("--judge-model", metavar="NAME",
                 help="eval: the judge's model name (default: the first the server lists)")
  p.add_argument("--judge-prompt", metavar="FILE",
                 help="eval: a 0-100 scoring prompt instead of the packaged judge_score.txt")
  p.add_argument("--judge-pair-prompt", metavar="FILE",
                 help="eval: a pairwise prompt instead of the packaged judge_pair.txt")
  p.add_argument("--prompt", help="generate: the instruction (a user turn in a chat format)")
  p.add_argument("--input", default="", help="generate: the optional input")
  p.add_argument("--base", action="store_true", help="generate with the base model too")
  p.add_argument("--system", help="chat: a system message starting the conversation")
  p.add_argument("--port", type=int, default=8000, help="serve: the port (0: any free one)")
  p.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on")
  p.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                 help="serve: the most new tokens one request may ask for")
  p.add_argument("--show", type=int, default=3, help="data: how many records to render")
  p.add_argument("--out", help="export: the output folder")
  p.add_argument("--merged", action="store_true", help="export a merged HF model as well")
  p.add_argument("--gguf", action="store_true",
                 help="export the merged model as a llama.cpp GGUF file as well")
  p.add_argument("--gguf-type", default="f16", choices=("bf16", "f16", "q8_0"),
                 help="export --gguf: the type of the weight matrices (default: f16)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
  return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  from jax_it.run import cli  # imported after parsing so --help is instant
  return cli.run(args)


if __name__ == "__main__":
  sys.exit(main())
