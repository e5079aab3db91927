"""lm-eval on the zoo's in-memory models, offline: the flip task through a generated YAML."""


import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.errors import InputNotFoundError, UsageError
from bot.evaluate.lm_eval_tasks import lm_eval_scores, write_jsonl_task

LIMIT = 40  # measured on these 40 items: fine-tune 0.975, base 0.125


@pytest.fixture(scope="session")
def zoo(zoo):
    """The zoo's directory (conftest's fixture gives (directory, report))."""
    return zoo[0]


@pytest.fixture(scope="session")
def tasks(zoo, tmp_path_factory):
    """A folder holding the flip task over the zoo's held-out prompts."""
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    write_jsonl_task(directory, "zoo_flip", zoo / "prompts" / "flip_heldout.jsonl")
    return directory


def load(zoo, name):
    directory = zoo / name
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_written_task_reads_the_jsonl_by_absolute_path(zoo, tmp_path):
    data = zoo / "prompts" / "flip_heldout.jsonl"
    path = write_jsonl_task(tmp_path / "t", "my_task", data)
    assert path == tmp_path / "t" / "my_task.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["task"] == "my_task"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(data.resolve())}}
    assert config["test_split"] == "test"
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"]["do_sample"] is False
    assert config["metric_list"][0]["metric"] == "exact_match"


def test_written_task_refuses_bad_names_and_missing_data(zoo, tmp_path):
    with pytest.raises(UsageError, match="must be letters"):
        write_jsonl_task(tmp_path, "../escape", zoo / "prompts" / "flip_heldout.jsonl")
    with pytest.raises(InputNotFoundError, match="does not exist"):
        write_jsonl_task(tmp_path, "missing", tmp_path / "nothing.jsonl")


def test_lm_eval_sees_the_finetune_learn_the_task(zoo, tasks):
    scores = {}
    for name in ("zoo-ft-flip", "zoo-base-it"):
        model, tokenizer = load(zoo, name)
        scores[name] = lm_eval_scores(model, tokenizer, ["zoo_flip"], include_path=tasks,
                                      limit=LIMIT)
        assert set(scores[name]) == {"zoo_flip"}
    assert scores["zoo-ft-flip"]["zoo_flip"] >= 0.8
    assert scores["zoo-base-it"]["zoo_flip"] <= 0.5


def test_weights_changed_in_place_change_the_score(zoo, tasks):
    model, tokenizer = load(zoo, "zoo-ft-flip")
    base, _ = load(zoo, "zoo-base-it")
    before = lm_eval_scores(model, tokenizer, ["zoo_flip"], include_path=tasks, limit=LIMIT)
    expected = lm_eval_scores(base, tokenizer, ["zoo_flip"], include_path=tasks, limit=LIMIT)
    model.load_state_dict(base.state_dict())
    after = lm_eval_scores(model, tokenizer, ["zoo_flip"], include_path=tasks, limit=LIMIT)
    assert before["zoo_flip"] >= 0.8
    assert after == expected
    assert after["zoo_flip"] <= 0.5


def test_unknown_task_names_the_include_path(zoo, tasks):
    model, tokenizer = load(zoo, "zoo-base-it")
    with pytest.raises(UsageError, match="'no_such_task' not found") as caught:
        lm_eval_scores(model, tokenizer, ["no_such_task"], include_path=tasks, limit=1)
    assert str(tasks) in str(caught.value)


def test_unparseable_yaml_is_named(zoo, tmp_path):
    (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\n  bad: [\n")
    model, tokenizer = load(zoo, "zoo-base-it")
    with pytest.raises(UsageError, match="broken.yaml"):
        lm_eval_scores(model, tokenizer, ["broken"], include_path=tmp_path, limit=1)


def test_invalid_task_config_is_named(zoo, tmp_path):
    path = write_jsonl_task(tmp_path, "odd", zoo / "prompts" / "flip_heldout.jsonl")
    path.write_text(path.read_text().replace("generate_until", "guess_until"))
    model, tokenizer = load(zoo, "zoo-base-it")
    with pytest.raises(UsageError, match=r"odd\.yaml.*guess_until"):
        lm_eval_scores(model, tokenizer, ["odd"], include_path=tmp_path, limit=1)
