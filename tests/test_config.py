"""Config loading: YAML and --set values are typed, validated, and errors name the key at fault."""

import re

import pytest

from flatspec_jax.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("written", ["3e-5", "3.0e-5", "0.00003"])
def test_float_fields_accept_yaml_exponents_without_a_dot(tmp_path, written):
    config = load_config(write(tmp_path, f"train:\n  learning_rate: {written}\n"))
    assert config.train.learning_rate == pytest.approx(3e-5)
    assert isinstance(config.train.learning_rate, float)


def test_set_override_is_typed():
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == pytest.approx(1e-3)


def test_non_numeric_string_for_a_float_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: expected a number, got 'fast'"):
        load_config(write(tmp_path, "train:\n  learning_rate: fast\n"))


def test_unknown_key_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.learning_rat\b"):
        load_config(write(tmp_path, "train:\n  learning_rat: 0.1\n"))


def test_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(write(tmp_path, "train:\n  learning_rate: -1\n"))


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_a_file_that_is_not_utf8_text_is_named(tmp_path):
    path = tmp_path / "scores.yaml"
    path.write_bytes(b"PAR1\xba\xff\x00")
    with pytest.raises(ConfigError, match=rf"^{path}: not a UTF-8 text file"):
        load_config(path)


@pytest.mark.parametrize("override, field, value", [
    ("data.source=*.jsonl", "source", "*.jsonl"),  # a relative glob: a YAML alias, were it parsed
    ("eval.prompts=@prompts.jsonl", "prompts", "@prompts.jsonl"),  # '@' is reserved in YAML
])
def test_a_set_value_that_is_not_yaml_is_taken_as_text(override, field, value):
    config = load_config(None, [override])
    assert getattr(getattr(config, override.partition(".")[0]), field) == value


@pytest.mark.parametrize("override, value", [
    ("model.path=/models/llama #2", "/models/llama #2"),  # YAML: a comment, the path cut to /models/llama
    ("data.source=/data/a: b.jsonl", "/data/a: b.jsonl"),  # YAML: a mapping
    ("data.selection=~", "~"),  # YAML: null, i.e. train on all data
    ("data.source='my data.jsonl'", "my data.jsonl"),  # quoted: the quotes go
    ("eval.prompts=null", None),
])
def test_a_set_text_value_is_taken_as_written(override, value):
    key, _, _ = override.partition("=")
    section, field = key.split(".")
    if value is None:  # eval.prompts is a str: null is refused by its type check
        with pytest.raises(ConfigError, match=r"eval\.prompts: expected a string, got None"):
            load_config(None, [override])
        return
    assert getattr(getattr(load_config(None, [override]), section), field) == value


@pytest.mark.parametrize("text", ["1:30", "0x10", "1e3", "12.0"])
def test_a_set_integer_is_decimal_digits_only(text):
    """YAML 1.1 reads 010 as 8, 1:30 as 90 and 0x10 as 16."""
    with pytest.raises(ConfigError, match=rf"train\.steps: expected an integer, got '{re.escape(text)}'"):
        load_config(None, [f"train.steps={text}"])
    assert load_config(None, ["train.steps=010"]).train.steps == 10
    assert load_config(None, ["train.steps=+12"]).train.steps == 12
    assert load_config(None, ["data.limit=null"]).data.limit is None


@pytest.mark.parametrize("override", ["model.path=", "data.limit= ", "data.selection="])
def test_an_empty_set_value_is_refused(override):
    """As from an unset shell variable (--set data.selection=$SEL): none is written null."""
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: empty value \(write {key}=null"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.steps=", "run_dir="])
def test_an_empty_set_value_of_a_field_that_takes_no_none_suggests_no_null(override):
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: empty value$"):
        load_config(None, [override])


def test_a_set_value_that_is_not_yaml_meets_the_fields_type_check():
    with pytest.raises(ConfigError, match=r"^--set train\.steps=\[1: train\.steps: expected an integer, got '\[1'"):
        load_config(None, ["train.steps=[1"])


def test_a_set_into_a_non_section_names_the_set_and_where_the_value_came_from(tmp_path):
    path = write(tmp_path, "train: 5\n")
    with pytest.raises(ConfigError, match=rf"^--set train\.steps: needs train to be a section, but {path} gives it "
                                          r"the value 5$"):
        load_config(path, ["train.steps=4"])
    path = write(tmp_path, "train:\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"^--set train\.steps\.x: needs train\.steps to be a section"):
        load_config(path, ["train.steps.x=3"])
    with pytest.raises(ConfigError, match=r"^--set train\.steps\.x: .* but an earlier --set gives it the value 2$"):
        load_config(None, ["train.steps=2", "train.steps.x=3"])


def test_a_rule_between_two_keys_blames_the_set_of_either(tmp_path):
    path = write(tmp_path, "data:\n  max_length: 512\nscore:\n  row_length: 512\n")
    with pytest.raises(ConfigError, match=r"^--set data\.max_length=1000: score\.row_length: must be >= data\.max_len"):
        load_config(path, ["data.max_length=1000"])
    with pytest.raises(ConfigError, match=rf"^{path}: score\.row_length: must be >= data\.max_length \(2000\)"):
        load_config(write(tmp_path, "data:\n  max_length: 2000\n"), [])


def test_numeric_yaml_keys_are_reported_as_unknown(tmp_path):
    path = write(tmp_path, "1: a\nfoo: b\n")
    with pytest.raises(ConfigError, match=r"unknown key 1; valid keys under the top level"):
        load_config(path, [])


def test_draft_vocabulary_smaller_than_top_k_is_refused():
    assert load_config(None, ["decode.draft_vocab=8", "decode.top_k=8"]).decode.draft_vocab == 8
    with pytest.raises(ConfigError, match=r"decode\.draft_vocab"):
        load_config(None, ["decode.draft_vocab=4", "decode.top_k=8"])


def test_a_trained_draft_vocabulary_smaller_than_top_k_is_refused_for_trees_only():
    with pytest.raises(ConfigError, match=r"draft\.vocab: must be 0 or at least decode\.top_k \(8\)"):
        load_config(None, ["draft.vocab=4", "decode.method=tree", "decode.top_k=8"])
    assert load_config(None, ["draft.vocab=4", "decode.method=chain", "decode.top_k=8"]).draft.vocab == 4


def test_tree_limits_name_their_bound_and_do_not_bind_chain_decoding():
    with pytest.raises(ConfigError, match=r"decode\.total_tokens: must be between 2 and .* = 23"):
        load_config(None, ["decode.method=tree", "decode.top_k=2", "decode.depth=5", "decode.total_tokens=63"])
    chain = load_config(None, ["decode.method=chain", "decode.top_k=2", "decode.depth=5", "decode.total_tokens=63",
                               "decode.min_confidence=0.5"])
    assert (chain.decode.top_k, chain.decode.min_confidence) == (2, 0.5)


@pytest.mark.parametrize("override, key", [
    ("score.temperature=.inf", r"score\.temperature: expected a finite number"),
    ("decode.temperature=.nan", r"decode\.temperature: expected a finite number"),
    ("seed=-1", r"seed: must be in \[0, 2\*\*32\)"),
    ("seed=4294967296", r"seed: must be in"),
    ("data.shuffle_seed=-5", r"data\.shuffle_seed: must be in"),
    ("data.source=''", r"data\.source: must name"),
    ("decode.max_cache_length=-5", r"decode\.max_cache_length: must be > 0"),
    ("train.token_weight=-1", r"train\.token_weight: must be >= 0"),
    ("train.unroll=0", r"train\.unroll: must be >= 1"),
    ("train.unroll_decay=0", r"train\.unroll_decay: must be in \(0, 1\]"),
    ("train.unroll_decay=1.5", r"train\.unroll_decay: must be in \(0, 1\]"),
    ("decode.depth=0", r"decode\.depth: must be >= 1"),
    ("decode.draft_vocab=-5", r"decode\.draft_vocab: must be >= 0"),
    ("draft.vocab=2", r"draft\.vocab: must be 0 \(the whole vocabulary\) or at least 3"),
    ("decode.min_confidence=1", r"decode\.min_confidence: must be in \[0, 1\)"),
    ("decode.min_confidence=0.5", r"decode\.min_confidence: applies to chain speculation only"),
    ("eval.batch_size=0", r"eval\.batch_size: must be >= 1"),
    ("mesh.tensor=0", r"mesh\.tensor: must be >= 1 or -1"),
    ("score.row_length=256", r"score\.row_length: must be >= data\.max_length \(512\)"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_a_key_given_twice_in_the_file_is_refused(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\ntrain:\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: duplicate key 'train'"):
        load_config(path)


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"^--set train\.steps=abc: train\.steps: expected an integer"):
        load_config(path, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=rf"^{path}: train\.steps: expected an integer"):
        load_config(write(tmp_path, "train:\n  steps: abc\n"), ["train.log_every=3"])


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", r"unknown key train\.stpes"),  # a mistyped key
    ("trian.steps=5", r"unknown key trian;"),  # a mistyped section
    ("mesh.tensor=0", r"mesh\.tensor: must be"),
    ("mesh.fsdp=-1", r"mesh: at most one axis may be -1"),  # a section-wide check, set through one key
])
def test_a_bad_set_key_is_blamed_on_the_set_not_the_file(tmp_path, override, message):
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: {message}"):
        load_config(write(tmp_path, "train:\n  steps: 5\n"), [override])


@pytest.mark.parametrize("run_dir", ["runs/exp #2", "2026-12-04", "007", "on"])
def test_run_dir_flag_is_taken_as_typed(run_dir):
    """--run-dir is a path: never read as YAML (a comment, a date, a number or a boolean)."""
    from flatspec_jax.cli import build_parser, resolve_config

    assert resolve_config(build_parser().parse_args(["train", "--run-dir", run_dir])).run_dir == run_dir


@pytest.mark.parametrize("flags, quoted", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: decode.max_new_tokens"),
    (["--top-p", "2"], "--top-p 2.0: decode.top_p"),
])
def test_a_bad_verb_flag_is_quoted_as_typed(flags, quoted):
    from flatspec_jax.cli import build_parser, resolve_config

    with pytest.raises(ConfigError, match=rf"^{re.escape(quoted)}"):
        resolve_config(build_parser().parse_args(["generate", "--prompt", "hi", *flags]))


@pytest.mark.parametrize("key", ["model.path", "data.source", "data.selection", "eval.prompts", "run_dir"])
def test_an_empty_path_setting_is_refused(key):
    """An empty string is no path: it would mean the embedded model, or the current directory."""
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(key)}='': {re.escape(key)}: must "):
        load_config(None, [f"{key}=''"])
