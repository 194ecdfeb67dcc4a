import csv
import json
import sys
import types

import pytest

import cepo.data.readers as readers_module
from cepo.data.datasets import (
    ADAPTERS,
    FAMILY_BY_ADAPTER as REGISTERED_FAMILIES,
    PAPER_TRAIN_FILES,
    LoadedDataset,
    Row,
    cladder_query_type,
    load_examples,
    load_records,
    paper_training_mix,
    register_adapter,
    reject,
)
from cepo.records import Example
from cepo.data.prompts import FAMILY_BY_ADAPTER, PromptTemplate, family_for, render_prompt
from cepo.data.sources import FileDataset
from cepo.answers.matching import answers_match
from cepo.answers.parsing import AnswerParser


def write_json(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return str(path)


def casehold_question(options, context="See Smith v. Jones, 1 U.S. 1 (<HOLDING>)."):
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCDE", options))
    return f"{context}\n\nOptions:\n{lines}\n\nQuestion: Select the correct holding. Answer with the option text."


def logiqa_question(options):
    return f"Some premise.\nQuestion: Which one follows?\nOptions: {options!r}"


def cladder_row(context, question, answer):
    return {"question": f"Context: {context} Question: {question}", "answer": answer}


# ---------------------------------------------------------------------------------------------------
# load_records


def test_load_records_formats(tmp_path):
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    assert load_records(write_json(tmp_path / "a.json", rows)) == rows
    assert load_records(write_json(tmp_path / "b.json", {"data": rows})) == rows
    assert load_records(write_json(tmp_path / "c.json", {"test": rows}), split="test") == rows
    assert load_records(write_jsonl(tmp_path / "d.jsonl", rows)) == rows
    with (tmp_path / "e.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    assert load_records(str(tmp_path / "e.csv")) == rows
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "test.jsonl", rows)
    assert load_records(str(tmp_path / "folder"), split="test") == rows
    assert load_records(str(tmp_path / "folder")) == rows  # the only split needs no name


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_records("./data/nope")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="JSON list"):
        load_records(write_json(tmp_path / "obj.json", {"meta": 1}))


def test_hub_name_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'cepo\[hub\]'"):
        load_records("openai/gsm8k", "test", config_name="main")


def test_hub_name_calls_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(readers_module, "_hub_unreachable_reason", lambda endpoint, timeout: None)

    def load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return [{"question": "q", "answer": "Work.\n#### 1,200"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    loaded = load_examples("openai/gsm8k", "gsm8k", split="test", config_name="main")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert loaded.examples[0].gold == ("1200",)


# ---------------------------------------------------------------------------------------------------
# adapters


def test_generic_adapter_fields_and_source(tmp_path):
    rows = [{"prompt": "What is 2+2?", "label": "4"}, {"prompt": "Capital of France?", "label": "Paris"}]
    path = write_json(tmp_path / "my_set.json", rows)
    loaded = load_examples(path, question_field="prompt", answer_field="label")
    assert isinstance(loaded, LoadedDataset)
    assert loaded.source == "my_set" and loaded.skipped == 0
    assert [e.gold for e in loaded.examples] == [("4",), ("Paris",)]
    assert loaded.examples[0] == Example("What is 2+2?", ("4",), "auto", "my_set", "my_set-0", {"row": 0})


def test_gsm8k_adapter(tmp_path):
    rows = [
        {"question": "Eggs?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
        {"question": "Money?", "answer": "It costs 1,000 + 234.\n#### 1,234"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "gsm.jsonl", rows), "gsm8k").examples
    assert [e.gold for e in examples] == [("13",), ("1234",)]
    assert examples[0].answer_kind == "number"
    assert examples[0].meta["solution"] == rows[0]["answer"]
    # the worked solution, parsed by the one parser, matches its own gold
    assert answers_match(AnswerParser()(examples[1].meta["solution"]).answer, examples[1].gold, "number")


def test_malformed_rows_raise_with_index_or_are_skipped(tmp_path):
    rows = [
        {"question": "ok", "answer": "#### 1"},
        {"question": "no marker", "answer": "42"},
        "not a dict",
        {"question": "  ", "answer": "#### 2"},
        {"answer": "#### 3"},
        {"question": "ok too", "answer": "#### 4"},
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(ValueError, match=r"gsm\.jsonl, line 2: answer has no '#### <number>'.*gsm8k adapter.*on_error=\"skip\""):
        load_examples(path, "gsm8k")
    loaded = load_examples(path, "gsm8k", on_error="skip")
    assert loaded.skipped == 4
    assert [e.gold for e in loaded.examples] == [("1",), ("4",)]
    assert [e.meta["row"] for e in loaded.examples] == [0, 5]
    with pytest.raises(ValueError, match="s, record index 2: expected an object"):
        ADAPTERS["generic"]([{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}, 7], source="s")


def test_math_adapter(tmp_path):
    rows = [
        {"question": "Find x.", "answer": "\\frac{1}{2}"},
        {"question": "Roots?", "answer": "-3 or 3"},
        {"question": "Area?", "answer": "So the area is $\\boxed{\\frac{\\sqrt{3}}{4}}$.\n"},
        {"problem": "Sum?", "solution": "First \\boxed{1}, finally \\boxed{2^{10}}.", "answer": "ignored"},
    ]
    examples = load_examples(write_json(tmp_path / "math.json", rows), "math").examples
    assert [e.gold for e in examples] == [("\\frac{1}{2}",), ("-3", "3"), ("\\frac{\\sqrt{3}}{4}",), ("2^{10}",)]
    assert all(e.answer_kind == "math" for e in examples)
    assert examples[3].question == "Sum?" and "solution" in examples[3].meta
    assert answers_match("\\boxed{\\dfrac{\\sqrt3}{4}}", examples[2].gold, "math")
    assert answers_match("3", examples[1].gold, "math")


def test_yes_no_adapters(tmp_path):
    rows = [{"question": "Did A cause B?", "answer": "Yes"}, {"question": "Did C?", "answer": "Ambiguous"}]
    examples = load_examples(write_json(tmp_path / "bbeh.json", rows), "bbeh_causal").examples
    assert [(e.gold, e.answer_kind) for e in examples] == [(("Yes",), "yes_no"), (("Ambiguous",), "text")]
    legal = [{"question": "Context: x. Question: causal?", "answer": "No"}, {"question": "q", "answer": "Maybe"}]
    path = write_json(tmp_path / "legal.json", legal)
    with pytest.raises(ValueError, match=r"legal\.json, item 2 \(line 1\): expected a Yes/No"):
        load_examples(path, "legalbench_causality")
    loaded = load_examples(path, "legalbench_causality", on_error="skip")
    assert loaded.skipped == 1 and loaded.examples[0].gold == ("No",)


def test_casehold_adapter(tmp_path):
    options = ["holding that a contract was void", "holding that the statute applies", "holding x",
               "holding y", "holding z"]
    rows = [
        {"question": casehold_question(options), "answer": options[1]},
        {"question": casehold_question(options), "answer": "D"},
        {"question": casehold_question(options), "answer": "holding something else"},
        {"question": "no options here", "answer": "holding x"},
    ]
    loaded = load_examples(write_json(tmp_path / "casehold.json", rows), "casehold", on_error="skip")
    assert loaded.skipped == 2
    first, second = loaded.examples
    assert first.meta["options"] == options and first.meta["answer_index"] == 1
    assert first.gold == (options[1], "B") and first.answer_kind == "choice"
    assert second.gold == ("holding y", "D")
    for prediction in ("B", "(B)", "B. holding that the statute applies", options[1]):
        assert answers_match(prediction, first.gold, "choice", first.meta["options"])
    assert not answers_match("Because the statute applies", first.gold, "choice", first.meta["options"])
    assert not answers_match("A", first.gold, "choice", first.meta["options"])


def test_ifqa_and_arithmetic_adapters(tmp_path):
    rows = [{"question": "If ...?", "answer": "3 or three"}, {"question": "Who?", "answer": "Clint Eastwood"}]
    examples = load_examples(write_json(tmp_path / "ifqa.json", rows), "ifqa").examples
    assert examples[0].gold == ("3", "three") and examples[0].answer_kind == "auto"
    assert answers_match("three", examples[0].gold) and answers_match("3.0", examples[0].gold)
    assert not answers_match("30", examples[0].gold)
    rows = [{"question": "Compute A.", "answer": "-10038"}, {"question": "Compute B.", "answer": "1.5"}]
    path = write_json(tmp_path / "arith.json", rows)
    with pytest.raises(ValueError, match=r"arith\.json, item 2 \(line 1\): expected an integer"):
        load_examples(path, "bbeh_arithmetic")
    assert load_examples(path, "bbeh_arithmetic", on_error="skip").examples[0].gold == ("-10038",)


def test_logiqa_adapter(tmp_path):
    options = ["It rains.", "It's sunny.", 'He said "no".', "None of these."]
    rows = [
        {"question": logiqa_question(options), "answer": '1, "It\'s sunny."'},
        {"question": logiqa_question(options), "answer": '2, "It rains."'},  # text disagrees with index 2
        {"question": logiqa_question(options), "answer": '7, "x"'},
    ]
    loaded = load_examples(write_json(tmp_path / "logiqa.json", rows), "logiqa", on_error="skip")
    assert loaded.skipped == 2
    (example,) = loaded.examples
    assert example.meta["options"] == options and example.gold == ("It's sunny.", "B", "1")
    for prediction in ("B", "1", "It's sunny.", '1, "It\'s sunny."', "(B)"):
        assert answers_match(prediction, example.gold, "choice", options)
    for prediction in ("A", "0", "It rains.", "2"):
        assert not answers_match(prediction, example.gold, "choice", options)


def test_cladder_pairs_and_query_types(tmp_path):
    ctx = "For husbands that don't set the alarm, the probability of ringing alarm is 42%."
    rows = [
        cladder_row(ctx, "Will alarm set by husband increase the chance of ringing alarm?", "yes"),
        cladder_row(ctx, "Will alarm set by husband decrease the chance of ringing alarm?", "no"),
        cladder_row(ctx, "Will alarm set by husband decrease the chance of ringing alarm?", "no"),
        cladder_row(ctx, "For husbands that set the alarm, would it be less likely to see ringing alarm if the "
                         "husband had not set the alarm?", "yes"),
        cladder_row("The overall probability of X is 50%.",
                    "Is the chance of ringing alarm larger when observing alarm set by husband?", "no"),
        cladder_row("The overall probability of X is 50%.",
                    "Is the chance of ringing alarm smaller when observing alarm set by husband?", "no"),
        cladder_row("Another context.", "Is the chance of ringing alarm larger when observing alarm set by husband?",
                    "yes"),
    ]
    examples = load_examples(write_json(tmp_path / "cladder.json", rows), "cladder").examples
    pair_ids = [e.meta.get("pair_id") for e in examples]
    assert pair_ids[0] == pair_ids[1] is not None
    assert pair_ids[2] is None and pair_ids[3] is None  # same context, different query type: no pair
    assert pair_ids[4] == pair_ids[5] is not None and pair_ids[4] != pair_ids[0]  # zero effect: both "no"
    assert pair_ids[6] is None  # same question, different context
    assert [e.meta["query_type"] for e in examples] == ["ate"] * 3 + ["ett"] + ["correlation"] * 3
    assert examples[4].meta["rung"] == 1 and examples[0].meta["rung"] == 2
    assert examples[0].gold == ("yes",) and examples[0].answer_kind == "yes_no"


@pytest.mark.parametrize(
    "question, kind",
    [
        ("Is lung cancer less likely than absence of lung cancer overall?", "marginal"),
        ("If we disregard the mediation effect through wife, would husband positively affect alarm clock?", "nde"),
        ("Does husband negatively affect alarm clock through wife?", "nie"),
        ("If we look at people who are famous, does it mean that looks does not affect talent?", "collider_bias"),
        ("If we look at people who are famous, does the chance of talent increase when looks?", "exp_away"),
        ("To understand how husband affects alarm clock, is it more correct to use the Method 1 than Method 2?",
         "backadj"),
        ("Would the employee is fired if manager not signing instead of manager signing?", "det_counterfactual"),
        ("What is the weather?", "other"),
    ],
)
def test_cladder_query_type(question, kind):
    assert cladder_query_type(question)[0] == kind


def test_limit_is_a_seeded_sample(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    path = write_json(tmp_path / "many.json", rows)
    first = load_examples(path, limit=10, seed=3).examples
    assert first == load_examples(path, limit=10, seed=3).examples
    assert first != load_examples(path, limit=10, seed=4).examples
    rows_kept = [e.meta["row"] for e in first]
    assert rows_kept == sorted(rows_kept) and len(set(rows_kept)) == 10
    assert len(load_examples(path, limit=500).examples) == 50


def test_unknown_adapter_and_on_error(tmp_path):
    path = write_json(tmp_path / "x.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unknown dataset adapter"):
        load_examples(path, "nope")
    with pytest.raises(ValueError, match="on_error"):
        load_examples(path, on_error="ignore")


# ---------------------------------------------------------------------------------------------------
# the authors' training mixture


def make_paper_root(tmp_path, per_file):
    root = tmp_path / "cepo-paper"
    (root / "train").mkdir(parents=True)
    options = ["holding a", "holding b", "holding c", "holding d", "holding e"]
    makers = {
        "bbeh_causal": lambda i: {"question": f"Did {i} cause it?", "answer": "Yes" if i % 2 else "No"},
        "casehold": lambda i: {"question": casehold_question(options, f"case {i}"), "answer": options[i % 5]},
        "math": lambda i: {"question": f"Compute {i}.", "answer": f"\\frac{{{i}}}{{7}}"},
        "ifqa": lambda i: {"question": f"If {i}?", "answer": f"{i} or number {i}"},
    }
    for adapter, filename in PAPER_TRAIN_FILES.items():
        write_json(root / "train" / filename, [makers[adapter](i) for i in range(per_file)])
    return str(root)


def test_paper_training_mix_is_stratified_disjoint_and_deterministic(tmp_path):
    root = make_paper_root(tmp_path, per_file=30)
    train, val = paper_training_mix(root, per_source=20, val_fraction=0.2, seed=42)
    assert len(train) == 64 and len(val) == 16
    for source in PAPER_TRAIN_FILES:
        assert sum(e.source == source for e in train) == 16
        assert sum(e.source == source for e in val) == 4
    keys = lambda examples: {(e.source, e.id) for e in examples}  # noqa: E731
    assert not keys(train) & keys(val)
    assert {e.meta["split"] for e in train} == {"train"} and {e.meta["split"] for e in val} == {"val"}
    assert (train, val) == paper_training_mix(root, per_source=20, val_fraction=0.2, seed=42)
    assert keys(val) != keys(paper_training_mix(root, per_source=20, val_fraction=0.2, seed=7)[1])


def test_paper_training_mix_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="bbeh_causal_understanding.json"):
        paper_training_mix(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# prompt templates


class FakeChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def test_prompt_families_and_markers():
    math_example = Example("Find x if 2x=4.", ("2",), "math", "math")
    prompt = render_prompt(math_example, marker="boxed")
    assert "Find x if 2x=4." in prompt and "\\boxed{}" in prompt
    assert "<finalanswer>...</finalanswer>" in PromptTemplate().render(math_example, marker="finalanswer")
    yes_no = render_prompt(Example("Context: c. Question: q?", ("yes",), "yes_no", "cladder"))
    assert "Yes or No" in yes_no and "<answer>...</answer>" in yes_no
    choice = Example("Pick one.", ("B",), "choice", "logiqa", meta={"options": ["red", "blue"]})
    assert "A. red\nB. blue" in render_prompt(choice)
    assert render_prompt(Example("raw text", ("1",)), family="raw") == "raw text"
    assert set(ADAPTERS) <= set(FAMILY_BY_ADAPTER)  # every adapter has a family (plus the embedded task)


def test_prompt_chat_template_and_system_prompt():
    example = Example("What is 1+1?", ("2",), "number", "gsm8k")
    wrapped = render_prompt(
        example, tokenizer=FakeChatTokenizer(), use_chat_template=True, system_prompt="Be brief."
    )
    assert wrapped.startswith("<|system|>Be brief.<|user|>") and wrapped.endswith("<|assistant|>")
    assert render_prompt(example, system_prompt="Be brief.").startswith("Be brief.\n\n")
    no_template = types.SimpleNamespace(chat_template=None)
    with pytest.raises(ValueError, match="use_chat_template false"):
        render_prompt(example, tokenizer=no_template, use_chat_template=True)
    with pytest.raises(ValueError, match="unknown prompt family"):
        PromptTemplate("poetry")


# ---------------------------------------------------------------------------------------------------
# the adapter registry


@pytest.fixture()
def clean_registry():
    """Registrations made by a test are removed afterwards (the tables are shared module state)."""
    names, families = set(ADAPTERS), dict(REGISTERED_FAMILIES)
    yield
    for name in set(ADAPTERS) - names:
        ADAPTERS.remove(name)
    REGISTERED_FAMILIES.clear(), REGISTERED_FAMILIES.update(families)


def test_registered_families_are_the_prompt_table():
    # the families each adapter declared, as they were before adapters registered themselves
    assert dict(FAMILY_BY_ADAPTER) == {
        "generic": "open", "gsm8k": "math", "math": "math", "bbeh_arithmetic": "math", "bbeh_causal": "open",
        "ifqa": "open", "casehold": "multiple_choice", "logiqa": "multiple_choice", "cladder": "yes_no",
        "legalbench_causality": "yes_no",
    }
    assert FAMILY_BY_ADAPTER is REGISTERED_FAMILIES  # one table, filled by registration
    assert family_for(Example("Q: 1+1 hint: 2\n", ("2",), "number", "shortcut")) == "raw"


def test_a_new_dataset_is_one_function_and_one_registration(tmp_path, clean_registry):
    @register_adapter("celsius", family="math")
    def celsius_adapter(row: Row) -> Example:
        """Temperatures: the gold is the number before "C"."""
        answer = row.answer()
        if not answer.endswith("C"):
            reject(f"expected an answer like '21C', got {answer!r}")
        return row.example(row.question(), (answer[:-1],), "number", unit="C")

    rows = [{"question": "Boiling point?", "answer": "100C"}, {"question": "Freezing?", "answer": "32F"}]
    path = write_jsonl(tmp_path / "temps.jsonl", rows)
    with pytest.raises(ValueError, match=r"temps\.jsonl, line 2: expected an answer like '21C'.*celsius adapter"):
        load_examples(path, "celsius")
    loaded = load_examples(path, "celsius", on_error="skip")
    assert loaded.examples == [Example("Boiling point?", ("100",), "number", "celsius", "celsius-0",
                                       {"row": 0, "unit": "C"})]
    assert loaded.skips == [(f"{path}, line 2", "expected an answer like '21C', got '32F'")]
    assert FAMILY_BY_ADAPTER["celsius"] == "math"
    assert "Solve the following problem." in render_prompt(loaded.examples[0])
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        assert FileDataset(path, adapter="celsius", on_error="skip").load() == loaded.examples
    assert ADAPTERS["celsius"].__doc__.startswith("Temperatures")


def test_registration_refuses_a_duplicate_name_or_an_unknown_family(clean_registry):
    with pytest.raises(ValueError, match="'gsm8k' is already registered"):
        register_adapter("gsm8k", family="math")(lambda row: None)
    with pytest.raises(ValueError, match="unknown prompt family 'poem'.*choose one of"):
        register_adapter("verse", family="poem")
    with pytest.raises(ValueError, match="FileDataset.adapter: unknown dataset adapter 'gsm9k'; choose one of"):
        FileDataset("x.jsonl", adapter="gsm9k")


def test_adapters_keep_the_records_signature():
    records = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "2"}]
    examples, skipped = ADAPTERS["gsm8k"](records, source="s", on_error="skip")
    assert skipped == 1 and examples[0].gold == ("1",) and examples[0].source == "s"
    examples, skipped = ADAPTERS["generic"]([{"q": "x", "a": "y"}], question_field="q", answer_field="a")
    assert (examples[0].question, examples[0].gold, examples[0].source, skipped) == ("x", ("y",), "generic", 0)
