"""`cepo predict` end to end: what it writes must be what validation scores, for any question source."""

import io
import json
from pathlib import Path

import pytest
import torch

from cepo.answers import AnswerParser, resolve_markers
from cepo.answers.matching import answers_match
from cepo.cli import main
from cepo.coherence.scorer import CoherenceScorer
from cepo.data.prompt_file import PromptFile
from helpers.runs import small_run_args

SPLITS = ("in_distribution", "flipped", "edited")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step GRPO run on the embedded task and model: its log folder."""
    tmp = tmp_path_factory.mktemp("predict_run")
    cli = main(["fit", *small_run_args(tmp)])
    return Path(cli.trainer.log_dir), tmp


@pytest.mark.slow
def test_greedy_predictions_are_what_validation_scores(trained):
    log_dir, tmp = trained
    ckpt = str(log_dir / "checkpoints" / "last.ckpt")
    out = tmp / "val_predictions.jsonl"
    main(["predict", *small_run_args(tmp), "--ckpt_path", ckpt, "--prediction.output", str(out)])
    records = read_jsonl(out)
    assert [r["dataset"] for r in records] == [s for s in SPLITS for _ in range(8)]
    parser = AnswerParser(resolve_markers("answer", ["answer", "finalanswer", "boxed", "gsm8k"]))
    for r in records:
        parsed = parser(r["completion"])
        assert (r["rationale"], r["answer"], r["marker_found"]) == (parsed.rationale, parsed.answer, parsed.marker_found)
        assert r["correct"] == answers_match(r["answer"], tuple(r["gold"]), "number")
        assert r["prompt"] == r["question"]  # the quickstart's raw template
    # The accuracy `cepo validate` reports for this checkpoint is the mean of the written verdicts.
    validate = main(["validate", *small_run_args(tmp), "--ckpt_path", ckpt])
    for split in SPLITS:
        correct = [r["correct"] for r in records if r["dataset"] == split]
        assert float(validate.trainer.callback_metrics[f"val/{split}/accuracy"]) == pytest.approx(sum(correct) / len(correct))
    # The adapter folder written at the end of fit holds the same weights as last.ckpt: same answers.
    from_adapter = tmp / "adapter_predictions.jsonl"
    main(["predict", *small_run_args(tmp), "--model.init_args.policy.adapter_path", str(log_dir / "adapter"),
          "--prediction.output", str(from_adapter)])
    assert [r["completion"] for r in read_jsonl(from_adapter)] == [r["completion"] for r in records]


@pytest.mark.slow
def test_predict_from_a_file_with_and_without_gold_and_coherence(trained, tmp_path):
    log_dir, _ = trained
    questions = tmp_path / "questions.jsonl"
    rows = [{"question": "Q: 7+5-3 hint: 9", "answer": "9"}, {"question": "Q: 4+4-2 hint: 6"},
            {"question": "Q: 1+8-2 hint: 3", "answer": "7"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cli = main(["predict", *small_run_args(tmp_path), "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"),
                "--data.predict+=cepo.PromptFile", "--data.predict.path", str(questions),
                "--prediction.output", str(out), "--prediction.coherence", "true"])
    records = read_jsonl(out)
    assert [r["question"] for r in records] == [r["question"] for r in rows]
    assert [("correct" in r) for r in records] == [True, False, True]
    for r, row in zip(records, rows):
        if "answer" in row:
            assert r["gold"] == [row["answer"]]
            assert r["correct"] == answers_match(r["answer"], (row["answer"],), "auto")
    # Coherence scores are the scorer's, on the frozen reference network, for exactly these texts.
    module = cli.model
    with module.reference_model() as net:
        expected = CoherenceScorer().score(
            net, tokenizer=module.tokenizer, prompts=[r["prompt"] for r in records],
            rationales=[r["rationale"] for r in records], answers=[r["answer"] for r in records],
            step=module.rollout_step,
        )
    for channel in ("zx", "xy", "zy"):
        got = torch.tensor([r[f"coherence_{channel}"] for r in records])
        torch.testing.assert_close(got, getattr(expected, channel), rtol=1e-5, atol=1e-6)
        assert bool(((got >= 0.005) & (got <= 1)).all())
    assert [(r["coherence_truncated"], r["coherence_capped"]) for r in records] == [(False, False)] * len(rows)


def test_prompt_file_reads_stdin_csv_and_text(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('Q: 1+1 hint: 2\n\n{"question": "Q: 2+3", "answer": "5"}\n'))
    examples = PromptFile("-").load()
    assert [(e.question, e.gold, e.source) for e in examples] == [("Q: 1+1 hint: 2", (), "stdin"), ("Q: 2+3", ("5",), "stdin")]
    csv = tmp_path / "qs.csv"
    csv.write_text("prompt,label\nWhat is 2+2?,4\nName a colour,\n")
    examples = PromptFile(str(csv), question_field="prompt", answer_field="label").load()
    assert [(e.question, e.gold) for e in examples] == [("What is 2+2?", ("4",)), ("Name a colour", ())]
    text = tmp_path / "qs.txt"
    text.write_text("first question\n\nsecond question\n")
    assert [e.question for e in PromptFile(str(text), limit=1).load()] == ["first question"]


def test_prompt_file_names_the_problem(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "no question field here"}\n')
    with pytest.raises(ValueError, match="question_field"):
        PromptFile(str(rows)).load()
    with pytest.raises(FileNotFoundError, match="PromptFile.path"):
        PromptFile(str(tmp_path / "missing.jsonl")).load()
    monkeypatch.setattr("sys.stdin", io.StringIO('{"question": "broken"\n'))
    with pytest.raises(ValueError, match="stdin line 1"):
        PromptFile("-").load()


@pytest.mark.slow
def test_sampled_predictions_follow_the_evaluation_sampling_options(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Q: 7+5-3 hint: 9\\n", "answer": "9"}\n{"question": "Q: 2+6-1 hint: 7\\n"}\n')
    out = tmp_path / "sampled.jsonl"
    base = [*small_run_args(tmp_path), "--data.predict+=cepo.PromptFile", "--data.predict.path", str(questions),
            "--prediction.output", str(out), "--model.init_args.eval_num_samples", "8"]
    main(["predict", *base, "--model.init_args.generation.eval_temperature", "1.5"])
    records = read_jsonl(out)
    assert [(r["id"], r["sample"]) for r in records] == [(f"q-{i}", s) for i in range(2) for s in range(8)]
    assert len({r["completion"] for r in records[:8]}) > 1, "eight samples at T=1.5 are not all the same"
    # Greedy sampling options are refused rather than silently repeated.
    with pytest.raises(ValueError, match="eval_temperature"):
        main(["predict", *base])
