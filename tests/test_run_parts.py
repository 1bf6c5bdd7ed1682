"""Unit tests of the run modules (jax_it/run/): metrics, setup, checkpoint identity, evaluation
output, the compare report and the CLI's own checks; test_run.py runs the whole commands."""

import argparse
import json
import math

import jax
import numpy as np
import pytest

from jax_it import config, data, scoring
from jax_it.run import checkpoint, cli, compare, evaluate, metrics, setup


def _args(**kw):
  base = dict(command="train", config=None, run_dir=None, data=None, ifeval=0, prompt=None,
              input="", base=False, out=None, merged=False, no_progress=True, overrides=[],
              system=None, show=3)
  return argparse.Namespace(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_log_keeps_steps_up_to_the_resume_point_and_writes_strict_json(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # torn
  log = metrics.MetricsLog(str(tmp_path), resume_step=1)
  log.write({"step": 2, "val_loss": math.nan})
  log.close()
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 2.0},
                   {"step": 2, "val_loss": None, "nonfinite": ["val_loss"]}]


def _fake_metrics(loss=1.0, finite=1.0):
  return {"loss": loss, "tokens": 10.0, "grad_norm": 0.5, "weights_finite": finite}


def test_reporter_times_steps_on_every_process_and_only_process_0_writes(tmp_path, monkeypatch):
  # the multi-process crash: the step timer lived in the log, which only process 0 set up
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  log = metrics.MetricsLog(str(tmp_path), resume_step=0)
  reporter = metrics.StepReporter(log, lambda step: 1e-3, start=0, last_step=2)
  record = reporter.report(1, _fake_metrics(), real_tokens=40)
  assert record["tokens_per_s"] > 0 and record["lr"] == 1e-3
  reporter.report(2, _fake_metrics(), real_tokens=40)
  log.close()
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("loss, finite, message", [(math.nan, 1.0, "loss is nan at step 3"),
                                                   (1.0, 0.0, "LoRA weights are not finite")])
def test_reporter_stops_a_diverged_run(tmp_path, loss, finite, message):
  reporter = metrics.StepReporter(metrics.MetricsLog(str(tmp_path), 0), lambda s: 1.0, 0, 5,
                                  progress=False)
  with pytest.raises(setup.RunError, match=message):
    reporter.report(3, _fake_metrics(loss, finite), real_tokens=1)


def test_reporter_logs_every_nth_step_and_the_last(tmp_path):
  log = metrics.MetricsLog(str(tmp_path), 0)
  reporter = metrics.StepReporter(log, lambda s: 1.0, 0, 5, every=2, progress=False)
  for step in range(1, 6):
    reporter.report(step, _fake_metrics(), 1)
  log.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == [2, 4, 5]


# ---------------------------------------------------------------------------------------------
# setup and checkpoint identity


def test_identity_refuses_changed_options_and_ignores_added_ones():
  cfg = config.load_config(None, [])
  ident = setup.identity(cfg)
  older = json.loads(json.dumps(ident))
  del older["data"]["pack_bins"], older["lora"]["seed"]  # options a checkpoint predates
  checkpoint.check_identity(older, ident, "run")
  changed = setup.identity(config.load_config(None, ["lora.r=4"]))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"\(lora.r: saved 8, this run 4\)"):
    checkpoint.check_identity(ident, changed, "run")


def test_context_reads_the_data_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(data, "load_splits",
                      lambda cfg, stats=None: calls.append(cfg) or {"train": [1]})
  ctx = setup.Context(config.load_config(None, []), "run", {}, None, None, None)
  assert calls == []
  assert ctx.splits == {"train": [1]} and ctx.splits == {"train": [1]}
  assert len(calls) == 1


def test_batch_that_does_not_split_over_devices_is_refused():
  cfg = config.load_config(None, ["train.batch_size=3", "train.micro_batches=3"])
  setup.check_devices(cfg)  # one device: 3 rows over 3 micro-batches is fine
  if jax.device_count() > 1:
    with pytest.raises(setup.RunError, match="multiple of devices"):
      setup.check_devices(cfg)


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_commands_without_a_checkpoint_stop_before_loading_the_model(tmp_path, monkeypatch,
                                                                    command):
  run_dir = tmp_path / "run"
  config.save_config(config.load_config(None, []), str(run_dir / "config.yaml"))
  monkeypatch.setattr(setup, "load_model", lambda section: pytest.fail("model loaded"))
  args = _args(command=command, run_dir=str(run_dir), prompt="hi", out=str(tmp_path / "out"))
  with pytest.raises(setup.RunError, match="has no checkpoint yet; train first"):
    cli.COMMANDS[command](args)


# ---------------------------------------------------------------------------------------------
# evaluation output, compare report, CLI checks


def test_evaluation_files_and_report(tmp_path):
  rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "response_base": "2 + 3 = 5",
           "eos_base": False, "response_tuned": "5", "eos_tuned": True},
          {"instruction": "Name a colour.", "input": "", "output": "red", "response_base": "red",
           "eos_base": False, "response_tuned": "blue", "eos_tuned": True}]
  refs, base, tuned = ([r[k] for r in rows] for k in ("output", "response_base", "response_tuned"))
  result = {"records": 4, "generated": 2, "rows": rows, "loss_base": 2.5, "loss_tuned": 0.5,
            "eos_share_base": 0.0, "eos_share_tuned": 1.0, "max_new_tokens": 24,
            "generate_seconds_base": 61.24, "generate_seconds_tuned": 9.0,
            "answers": scoring.answer_metrics(refs, base, tuned, ["add", "colour"]),
            "text_base": scoring.text_metrics(refs, base, [False, False]),
            "text_tuned": scoring.text_metrics(refs, tuned, [True, True])}
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n'
                                          '{"step": 1, "val_loss": 1.0}\n')
  text = evaluate.write(result, str(tmp_path), show=1)
  assert "| exact match (strict) | 50.0% | 50.0% |" in text
  assert "| answer anywhere in the response (the base's best reading) | 100.0% | 50.0% |" in text
  assert "| regressions: base had the answer, tuned is wrong | | 1 of 2 |" in text
  assert "| colour | 1 | 100.0% | 100.0% | 0.0% | 1 |" in text
  assert "| response-token loss | 2.5000 | 0.5000 |" in text and "expected: '5'" in text
  assert "| ending in a repetition loop | 0.0% | 0.0% |" in text and "ROUGE-L" in text
  assert "| generation wall time (compiles included) | 61 s | 9 s |" in text
  assert json.loads((tmp_path / "eval.json").read_text()) == rows
  assert json.loads((tmp_path / "eval_metrics.json").read_text())["loss_tuned"] == 0.5
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert (tmp_path / "lengths.png").stat().st_size > 1000


def test_compare_report_and_float32_terms():
  report = {"tokens": 7, "loss_jax": 1.0, "loss_torch": 1.0, "ok": False,
            "errors": {"logits": 1e-6, "loss": 2e-5, "lora_grad": 1e-5}}
  text = compare.format_report(report)
  assert "| loss | 2.00e-05 | 1e-05 |" in text and text.endswith("FAILED: error above tolerance")
  cfg = compare.float32_config(config.load_config(None, ["model.dtype=bfloat16",
                                                         "model.matmul=bfloat16",
                                                         "model.quant=int8"]))
  assert (cfg.model.dtype, cfg.model.matmul, cfg.model.quant) == ("float32", "params", "none")


def test_cli_usage_errors_name_what_is_missing(tmp_path):
  with pytest.raises(cli.UsageError, match="generate needs --prompt"):
    cli.cmd_generate(_args(command="generate", run_dir=str(tmp_path)))
  with pytest.raises(cli.UsageError, match="holds no config.yaml"):
    cli.cmd_eval(_args(command="eval", run_dir=str(tmp_path)))
  with pytest.raises(cli.UsageError, match="export needs --out"):
    cli.cmd_export(_args(command="export", run_dir=str(tmp_path)))
  assert cli.run_dir_of(_args(), "configs/tiny.yaml") == "runs/tiny"


def test_eval_data_file_is_read_before_the_model(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  config.save_config(config.load_config(None, []), str(run_dir / "config.yaml"))
  (run_dir / "checkpoints" / "3").mkdir(parents=True)
  monkeypatch.setattr(setup, "load_model", lambda section: pytest.fail("model loaded"))
  for text, message in (('[{"output": "x"}]', r"bad.json: record 0: missing key 'instruction'"),
                        ("[]", "bad.json: no records"),
                        ('{"instruction": "x"}', "expected a JSON list of records")):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(data.DataError, match=message):
      cli.cmd_eval(_args(command="eval", run_dir=str(run_dir), data=str(tmp_path / "bad.json")))
  (tmp_path / "prompts.json").write_text('[{"instruction": "no output: a prompt alone"}]')
  with pytest.raises(cli.UsageError, match="generate.max_new_tokens=0"):
    cli.cmd_eval(_args(command="eval", run_dir=str(run_dir), data=str(tmp_path / "prompts.json"),
                       overrides=["generate.max_new_tokens=0"]))
  np.testing.assert_equal(sorted(p.name for p in run_dir.iterdir()), ["checkpoints",
                                                                     "config.yaml"])
