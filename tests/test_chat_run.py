"""run.py on conversations end to end (tiny random model, Gemma's chat format): train, the
report's stop share, chat in the terminal, the template recorded by the run, export with the
chat template, the data preview and its errors."""

import json
import os

import pytest
import servers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run(*args, check=True, stdin=None):
  return servers.run_py(*args, check=check, input=stdin)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
  """The session's tiny chat run (tests/servers.py): (run_dir, what training wrote)."""
  trained = servers.trained(tmp_path_factory)
  return trained["run_dir"], trained


def test_train_on_conversations_reports_the_terminator_share(chat_run):
  _, trained = chat_run
  out, files = trained["train_stdout"], trained["train_files"]
  assert "| responses ending with <eos> or <end_of_turn> |" in out, out
  rows = json.loads(files["eval.json"])
  assert rows and rows[0]["messages"][-1]["role"] == "user" and rows[0]["output"]
  summary = json.loads(files["data_summary.json"])
  assert summary["length_percentiles"]["p50"] > 20 and summary["loss_tokens"] > 0
  metrics = json.loads(files["eval_metrics.json"])
  assert metrics["stop_tokens"] == ["<eos>", "<end_of_turn>"] and "accuracy_tuned" in metrics


def test_chat_streams_the_replies_generate_gives(chat_run):
  run_dir, _ = chat_run
  out = run("chat", "--run-dir", run_dir,
            stdin="Say hi\n/reset\n/base\nSay hi\n/reset\n/tuned\nSay hi\n")
  replies = [line.split("model> ", 1)[1] for line in out.stdout.splitlines() if "model> " in line]
  assert len(replies) == 3 and "(now the base model, no adapter)" in out.stdout
  assert "(conversation cleared)" in out.stdout and out.stdout.rstrip().endswith(">")
  gen = run("generate", "--run-dir", run_dir, "--prompt", "Say hi", "--base").stdout
  said = {line[1:].split("]")[0].split(",")[0]: line.split("] ", 1)[1]
          for line in gen.splitlines() if line.startswith("[")}
  # the first turn of a conversation is the prompt `generate` builds, base and tuned alike
  assert replies[0] == replies[2] == said["tuned"] and replies[1] == said["base"]


def test_chat_keeps_the_history_in_gemma_turns(chat_run):
  """The second turn's prompt is the whole conversation: the reply equals the eval path's
  response to the same turns."""
  import io

  from jax_it import config
  from jax_it.run import chat, evaluate, setup
  run_dir, _ = chat_run
  ctx = setup.make_context(config.load_config(os.path.join(run_dir, "config.yaml"), []), run_dir)
  adapter = setup.load_adapter(ctx)
  turns = [{"role": "user", "content": "Remember the word cat."}]
  first, _ = chat.reply(ctx, adapter, turns, io.StringIO())
  turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "Which word?"}]
  shown = io.StringIO()
  second, stopped = chat.reply(ctx, adapter, turns, shown)
  record = {"messages": turns + [{"role": "assistant", "content": "(reference)"}]}
  assert [(second, stopped)] == evaluate.responses(ctx, [record], adapter)
  assert shown.getvalue() == second  # streamed text is the reply, nothing lost or doubled


def test_generation_refuses_another_template_than_the_run_trained_with(chat_run):
  from jax_it import config
  from jax_it.run import checkpoint, setup
  run_dir, _ = chat_run
  cfg = config.load_config(os.path.join(run_dir, "config.yaml"), ["data.template=alpaca"])
  with pytest.raises(checkpoint.CheckpointMismatch,
                     match="data.template: saved 'gemma', this run 'alpaca'"):
    setup.load_adapter(setup.make_context(cfg, run_dir))


def test_merged_and_gguf_exports_carry_the_chat_template(chat_run, tmp_path):
  """export --merged --gguf: the HF folder's tokenizer renders the turns the run trained on, and
  the GGUF file gives the tuned model's logits and carries Gemma's chat template."""
  import jax.numpy as jnp
  import numpy as np
  from transformers import AutoTokenizer

  from jax_it import config, model, templates, weights
  from jax_it.ckpt import gguf_write
  from jax_it.run import setup
  run_dir, _ = chat_run
  out = run("export", "--run-dir", run_dir, "--out", str(tmp_path), "--merged", "--gguf",
            "--gguf-type", "q8_0")
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}]
  ex = templates.tokenize_segments(templates.render({"messages": msgs}, "gemma"), tok,
                                   add_eos=False)
  ids = ex["tokens"].tolist() + ex["targets"][-1:].tolist()
  assert tok.apply_chat_template(msgs, tokenize=True)["input_ids"] == ids

  path = str(tmp_path / "model-q8_0.gguf")
  assert f"merged GGUF model written to {path}" in out.stdout
  params, cfg = weights.load(path)
  ctx = setup.make_context(config.load_config(os.path.join(run_dir, "config.yaml"), []), run_dir)
  x = jnp.asarray(np.random.RandomState(0).randint(0, 1000, (2, 16)))
  want = model.forward(ctx.params, x, ctx.mcfg, lora=setup.load_adapter(ctx))
  err = float(jnp.max(jnp.abs(model.forward(params, x, cfg) - want)) / jnp.max(jnp.abs(want)))
  assert cfg.family == ctx.mcfg.family and err < 5e-2  # q8_0's tolerance
  fields = gguf_write._StringsReader(path).fields
  assert fields["tokenizer.chat_template"] == templates.GEMMA_CHAT_TEMPLATE


def _conversations(path, n=6, long_at=None):
  recs = []
  for i in range(n):
    user = "word " * 300 if i == long_at else f"What is {i} plus {i}?"
    recs.append({"messages": [{"role": "user", "content": user},
                              {"role": "assistant", "content": str(2 * i)}]})
  path.write_text("\n".join(json.dumps(r) for r in recs))
  return str(path)


def test_data_preview_marks_trained_tokens_and_counts_cuts(tmp_path):
  from jax_it import config
  from jax_it.run import preview
  path = _conversations(tmp_path / "chats.jsonl", long_at=1)
  cfg = config.load_config(TINY, [f"data.path={path}", "data.template=gemma",
                                  "data.splits=[1,0,0]", "data.max_len=128", "data.loss_on=null"])
  text = preview.preview(cfg, show=2)
  assert "\x1b[" not in text and "\x1b[32m0<end_of_turn>\x1b[0m" in preview.preview(cfg, 1, True)
  assert "[[0<end_of_turn>]]" in text and "<start_of_turn>model\n[[" in text, text
  assert "<<< data.max_len=128: training sees nothing after this >>>" in text
  # the long record's only model turn lies past max_len: dropped and counted, never trained
  assert "1 dropped with no loss token left, 5 trained on" in text
  assert "tokens per record before any cut: p50" in text and "in the loss" in text


def test_conversations_read_as_alpaca_are_one_line_errors(tmp_path):
  from jax_it import config, data
  from jax_it.run import preview
  path = _conversations(tmp_path / "chats.jsonl")
  out = run("data", "--config", TINY, f"data.path={path}", "data.format=alpaca", check=False)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert f"{path}: record 0 (line 1): missing key 'instruction'" in out.stderr
  assert "set data.format=messages" in out.stderr
  cfg = config.load_config(TINY, [f"data.path={path}", "data.splits=[1,0,0]"])  # alpaca template
  with pytest.raises(data.DataError, match="record 0: .*set data.template=gemma"):
    preview.preview(cfg)


def test_eval_of_prompts_without_references_and_of_ifeval_prompts(chat_run, tmp_path, capsys):
  import argparse

  from jax_it.run import cli
  run_dir, _ = chat_run
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]})
                               for q in ("Hi", "Name a colour.")))
  args = dict(command="eval", config=None, run_dir=run_dir, no_progress=True,
              overrides=["generate.max_new_tokens=5", "report.eval_samples=0"])
  assert cli.cmd_eval(argparse.Namespace(**args, data=str(prompts), ifeval=0)) == 0
  metrics = json.load(open(os.path.join(run_dir, "eval_metrics.json")))
  assert metrics["generated"] == 2 and metrics["loss_tuned"] is None
  assert "ROUGE-L: not every record has a reference output" in capsys.readouterr().out
  assert metrics["text_tuned"]["n"] == 2 and "rouge_l" not in metrics["text_tuned"]
  assert cli.cmd_eval(argparse.Namespace(**args, data=None, ifeval=3)) == 0
  metrics = json.load(open(os.path.join(run_dir, "eval_metrics.json")))
  assert metrics["ifeval_tuned"]["n_prompts"] == 3 and metrics["max_new_tokens"] == 5
  assert "| prompts, loose |" in open(os.path.join(run_dir, "report.md")).read()
