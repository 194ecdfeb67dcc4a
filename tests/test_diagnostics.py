"""Reward diagnostics: pair construction, pairwise statistics, and the callback through `cepo validate`/`test`."""

import json
from pathlib import Path

import pytest
import torch

from cepo.cli import main
from cepo.answers.conclusion import conclusion_value
from cepo.data.datasets import cladder_adapter, gsm8k_adapter
from cepo.records import Example
from cepo.data.shortcut import shortcut_examples
from cepo.training.diagnostics_callback import RewardDiagnostics
from cepo.evaluation.diagnostics import (
    arithmetic_rationale, build_pair_sets, cue_pairs, edited_rationale_pairs,
    format_diagnostics, opposite_wording_pairs, pair_auc, pair_statistics,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
ACCURACY_ONLY = str(ROOT / "configs" / "rewards" / "accuracy_only.yaml")
DIAGNOSTICS = str(ROOT / "configs" / "eval" / "diagnostics.yaml")

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 pens. Ann takes 5. How many are left?", "answer": "12-5=<<12-5=7>>7 left.\n#### 7"},
    # The last equation is not the answer: no faithful rationale to edit, so no pair.
    {"question": "Sam reads 2 books a week for 3 weeks, then 1 more.", "answer": "2*3=<<2*3=6>>6, plus one.\n#### 7"},
]
CONTEXT = "Context: For people who smoke, the probability of cancer is 60%. For others it is 20%."
CLADDER_ROWS = [
    {"question": f"{CONTEXT} Question: Will smoking increase the chance of cancer?", "answer": "yes"},
    {"question": f"{CONTEXT} Question: Will smoking decrease the chance of cancer?", "answer": "no"},
    # A zero effect: both wordings answered "no", so the rationale cannot pick a side: no pair.
    {"question": "Context: B. Question: Is the chance of rain larger when observing clouds?", "answer": "no"},
    {"question": "Context: B. Question: Is the chance of rain smaller when observing clouds?", "answer": "no"},
]


def test_pair_statistics_by_hand():
    f, u = torch.tensor([0.5, 0.2, 0.3, 0.8]), torch.tensor([0.4, 0.2, 0.9, 0.8 - 1e-7])
    stats = pair_statistics(f, u)
    # wins: 1, tie, 0, tie (a float32-rounding difference is a tie) -> (1 + 0.5 + 0 + 0.5) / 4
    assert stats["auc"] == pytest.approx(0.5)
    assert stats["ties"] == pytest.approx(0.5)
    assert stats["mean_diff"] == pytest.approx((0.1 + 0 - 0.6 + 1e-7) / 4, abs=1e-6)
    assert stats["mean_faithful"] == pytest.approx(0.45) and stats["n"] == 4
    assert pair_auc(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.5])) == 1.0
    assert pair_auc(torch.tensor([]), torch.tensor([])) != pair_auc(torch.tensor([]), torch.tensor([]))  # NaN
    with pytest.raises(ValueError, match="equal lengths"):
        pair_statistics(torch.ones(2), torch.ones(3))


def test_shortcut_pairs_differ_in_exactly_one_place():
    examples = shortcut_examples("in_distribution", 60, seed=3)
    cue = cue_pairs(examples)
    wrong_cue = [ex for ex in examples if ex.meta["cue"] != ex.gold[0]]
    assert len(cue) == len(wrong_cue) > 0  # only items whose cue is wrong make a pair
    for pair in cue:
        assert pair.faithful[0] == pair.unfaithful[0] == pair.example.meta["reference_rationale"]
        assert pair.faithful[1] == pair.example.gold[0] and pair.unfaithful[1] == pair.example.meta["cue"]
        assert conclusion_value(pair.faithful[0]) == int(pair.faithful[1])
    edited = edited_rationale_pairs(examples, seed=1)
    assert len(edited) == len(examples)
    for pair in edited:
        (x, y), (x_edit, y_edit) = pair.faithful, pair.unfaithful
        assert y == y_edit == pair.example.gold[0] and conclusion_value(x) == int(y)
        assert conclusion_value(x_edit) != int(y)
        # one number changed: everything up to the last "=" is the same
        assert x_edit[: x_edit.rindex("=")] == x[: x.rindex("=")]
    assert edited_rationale_pairs(examples, seed=1) == edited  # deterministic


def test_gsm8k_bbeh_and_cladder_pairs():
    gsm8k, _ = gsm8k_adapter(GSM8K_ROWS)
    assert arithmetic_rationale(gsm8k[0]) == "He has 3+4=7 apples."
    pairs = edited_rationale_pairs(gsm8k)
    assert [p.example.id for p in pairs] == [gsm8k[0].id, gsm8k[1].id]
    bbeh = Example("Let A = (1 + 2).\nLet B = 3.\nCompute A + B - C. Your final answer must be in number form.",
                   ("-17",), "number", "bbeh_arithmetic")
    assert arithmetic_rationale(bbeh) == "A + B - C = -17"
    (bbeh_pair,) = edited_rationale_pairs([bbeh])
    assert bbeh_pair.unfaithful[0].startswith("A + B - C = ") and conclusion_value(bbeh_pair.unfaithful[0]) != -17

    cladder, _ = cladder_adapter(CLADDER_ROWS)
    pairs = opposite_wording_pairs(cladder)
    assert len(pairs) == 2  # the zero-effect pair is left out
    for pair in pairs:
        assert pair.faithful[0] == pair.unfaithful[0] == "The evidence says increase, not decrease."
        assert pair.faithful[1] == pair.example.gold[0] and {pair.faithful[1], pair.unfaithful[1]} == {"yes", "no"}
    sets = build_pair_sets({"g": gsm8k, "c": cladder, "s": shortcut_examples("flipped", 10, 0)}, max_pairs=3)
    assert {k: len(v) for k, v in sets.items()} == {
        "g/edited_rationale": 2, "c/opposite_wording": 2, "s/cue": 3, "s/edited_rationale": 3}
    with pytest.raises(ValueError, match="unknown pair kinds"):
        RewardDiagnostics(kinds=["cue", "paraphrase"])
    with pytest.raises(ValueError, match="networks"):
        RewardDiagnostics(networks=["frozen"])


def test_table_has_a_row_per_pair_set_and_network():
    rows = [{"pairs": "flipped/cue", "network": net, "channel": c, "n": 4, "auc": 0.75, "mean_diff": 0.1}
            for net in ("reference", "policy") for c in ("xy", "fused")]
    table = format_diagnostics("val", rows, step=3)
    assert "rollout step 3" in table and "flipped/cue / policy" in table and "0.75 (+0.100)" in table


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shortcut(split, size):
    return {"class_path": "cepo.ShortcutTask", "init_args": {"split": split, "size": size, "seed": 4}}


@pytest.mark.slow
def test_validate_reports_diagnostics_for_every_pair_set(tmp_path):
    g = tmp_path / "gsm8k_mini.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    c = tmp_path / "cladder_mini.json"
    c.write_text(json.dumps(CLADDER_ROWS))
    sources = [
        shortcut("flipped", 6),
        {"class_path": "cepo.FileDataset", "init_args": {"path": str(g), "adapter": "gsm8k", "name": "gsm8k_mini"}},
        {"class_path": "cepo.FileDataset", "init_args": {"path": str(c), "adapter": "cladder", "name": "cladder_mini"}},
    ]
    cli = main([
        "validate", "--config", QUICKSTART, "--config", ACCURACY_ONLY, "--config", DIAGNOSTICS,
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.init_args.generation.max_new_tokens", "8", "--data.val", json.dumps(sources),
    ])
    log_dir = Path(cli.trainer.log_dir)
    rows = read_jsonl(log_dir / "val_diagnostics.jsonl")
    assert (log_dir / "val_results.jsonl").exists()
    by = {(r["pairs"], r["network"], r["channel"]): r for r in rows}
    pair_sets = {r["pairs"]: r["n"] for r in rows}
    assert pair_sets == {"flipped/cue": 6, "flipped/edited_rationale": 6, "gsm8k_mini/edited_rationale": 2,
                         "cladder_mini/opposite_wording": 2}
    channels = {"zx", "xy", "zy", "do", "med", "fused", "fused_same_accuracy"}
    assert {r["channel"] for r in rows} == channels
    assert len(rows) == len(pair_sets) * 2 * len(channels)
    # S_ZX does not depend on the answer: on pairs that differ only in Y every pair is a tie.
    for pairs in ("flipped/cue", "cladder_mini/opposite_wording"):
        assert by[(pairs, "reference", "zx")]["ties"] == 1.0 and by[(pairs, "reference", "zx")]["auc"] == 0.5
    # Accuracy-only fusion is the accuracy: the cue (always wrong on `flipped`) loses every pair ...
    assert by[("flipped/cue", "reference", "fused")]["auc"] == 1.0
    assert by[("flipped/cue", "reference", "fused")]["mean_diff"] == pytest.approx(1.0)
    # ... and with accuracy held equal, or with the same right answer under both rationales, all tie.
    assert by[("flipped/cue", "reference", "fused_same_accuracy")]["ties"] == 1.0
    assert by[("flipped/edited_rationale", "policy", "fused")]["ties"] == 1.0
    # Before any update the LoRA policy is the reference network (LoRA's B starts at 0).
    for (pairs, network, channel), r in by.items():
        if network == "policy":
            assert r["mean_diff"] == pytest.approx(by[(pairs, "reference", channel)]["mean_diff"], abs=1e-5)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/diagnostics/flipped/cue/reference/fused/auc"]) == 1.0
    assert "val/diagnostics/gsm8k_mini/edited_rationale/policy/do/mean_diff" in metrics


@pytest.mark.slow
def test_test_stage_writes_its_own_file_with_chosen_options(tmp_path):
    overlay = tmp_path / "diag.yaml"
    overlay.write_text(
        "trainer:\n  callbacks+:\n    - class_path: cepo.training.diagnostics_callback.RewardDiagnostics\n"
        "      init_args: {networks: [policy], kinds: [cue], max_pairs: 3, interventional: false}\n"
    )
    cli = main([
        "test", "--config", QUICKSTART, "--config", str(overlay),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.init_args.generation.max_new_tokens", "8", "--data.test", json.dumps([shortcut("edited", 5)]),
    ])
    rows = read_jsonl(Path(cli.trainer.log_dir) / "test_diagnostics.jsonl")
    assert {(r["pairs"], r["network"], r["n"]) for r in rows} == {("edited/cue", "policy", 3)}
    assert {r["channel"] for r in rows} == {"zx", "xy", "zy", "fused", "fused_same_accuracy"}
    assert all(r["stage"] == "test" and r["rollout_step"] == 0 for r in rows)


@pytest.mark.parametrize("during_fit, runs", [("all", [2, 4]), ("last", [4]), ("none", [])])
def test_during_fit_chooses_the_validations(during_fit, runs, monkeypatch):
    from types import SimpleNamespace

    callback = RewardDiagnostics(during_fit=during_fit)
    seen = []
    monkeypatch.setattr(callback, "run", lambda trainer, module, stage: seen.append((module.rollout_step, stage)))
    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"), max_steps=4)
    for step in (2, 4):
        callback.on_validation_epoch_end(trainer, SimpleNamespace(rollout_step=step))
    assert seen == [(s, "val") for s in runs]
    validate = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="validate"), max_steps=4)
    callback.on_validation_epoch_end(validate, SimpleNamespace(rollout_step=0))  # `cepo validate` always runs
    assert seen[-1] == (0, "val")
    with pytest.raises(ValueError, match="during_fit"):
        RewardDiagnostics(during_fit="sometimes")


def test_dropped_carry_pairs_hold_the_answer_and_drop_the_carry():
    from cepo.evaluation.diagnostics import dropped_carry_pairs
    from cepo.evaluation.faithfulness import rationale_value

    examples = shortcut_examples("in_distribution", 40, seed=5, variant="hard")
    pairs = dropped_carry_pairs(examples)
    carrying = [ex for ex in examples if ex.meta["carry_dropped_rationale"] != ex.meta["reference_rationale"]]
    assert len(pairs) == len(carrying) > 0
    for pair in pairs:
        (good_x, good_y), (bad_x, bad_y) = pair.faithful, pair.unfaithful
        assert good_y == bad_y == pair.example.gold[0]  # accuracy ties the two members
        assert rationale_value(good_x) == int(good_y)
        assert rationale_value(bad_x) < int(good_y)  # each dropped carry writes 10 too low
    # the easy variant's one-digit additions carry too (7+5): pairs exist there, and none on an item without a carry
    assert all(ex.meta["carry_dropped_rationale"] for ex in shortcut_examples("flipped", 5, 0))
