"""Chat templating and the assistant loss mask (SmolLM2's tokenizer), and the GGUF tokenizer cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from flatspec_jax.data.chat import (  # noqa: E402
    ChatTemplateError, answered_turns, render_prompt, tokenize_conversation, tokenize_conversations)
from flatspec_jax.data.conversations import Conversation, Message  # noqa: E402
from flatspec_jax.data.sources import load_conversations  # noqa: E402
from flatspec_jax.data.tokenizer import build_gguf_tokenizer, default_model_path, gguf_cache_dir, load_tokenizer  # noqa: E402

TOKENIZER_LOGGER = "flatspec_jax.data.tokenizer"
NO_TRUNCATION = 1 << 20
DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\n")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer through the real cache (cold once per machine, ~0.5 s after)."""
    return load_tokenizer(default_model_path())


def conversation(*turns: tuple[str, str], cid: str = "test") -> Conversation:
    return Conversation(cid, tuple(Message(role, content) for role, content in turns))


TWO_TURNS = conversation(("user", "What is 2+2?"), ("assistant", "2+2 equals 4."),
                         ("user", "And 3+3?"), ("assistant", "3+3 equals 6."))


def reference_ids(tokenizer, conv: Conversation) -> list[int]:
    return list(tokenizer.apply_chat_template(conv.as_dicts(), tokenize=True)["input_ids"])


def masked_runs(sample) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of masked tokens."""
    padded = np.concatenate([[0], sample.loss_mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def decode_runs(tokenizer, sample) -> list[str]:
    return [tokenizer.decode(sample.input_ids[a:b].tolist()) for a, b in masked_runs(sample)]


def test_two_turn_mask_matches_hand_checked_spans(tokenizer):
    sample = tokenize_conversation(tokenizer, TWO_TURNS, max_length=512, verify=True)
    ids = sample.input_ids
    assert ids.dtype == np.int32 and sample.loss_mask.dtype == np.int8
    assert ids.tolist() == reference_ids(tokenizer, TWO_TURNS)
    assert (sample.n_tokens_untruncated, sample.truncated, sample.n_trained) == (70, False, 16)

    # Hand-checked against the token dump: 0-20 default system prompt, 21-32 user turn,
    # 33-36 "<|im_start|>assistant\n", 37-44 "2+2 equals 4.<|im_end|>", 45 "\n", 46-56 user,
    # 57-60 header, 61-68 "3+3 equals 6.<|im_end|>", 69 "\n".
    assert masked_runs(sample) == [(37, 45), (61, 69)]
    assert decode_runs(tokenizer, sample) == ["2+2 equals 4.<|im_end|>", "3+3 equals 6.<|im_end|>"]
    decode = lambda a, b: tokenizer.decode(ids[a:b].tolist())  # noqa: E731
    assert decode(0, 21) == DEFAULT_SYSTEM
    assert decode(21, 33) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert decode(33, 37) == "<|im_start|>assistant\n"
    assert decode(45, 61) == "\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(69, 70) == "\n"


def test_explicit_system_message_replaces_the_default(tokenizer):
    conv = conversation(("system", "Be terse."), ("user", "Capital of France?"), ("assistant", "Paris."),
                        ("user", "And of Italy?"), ("assistant", "Rome."))
    sample = tokenize_conversation(tokenizer, conv, max_length=512, verify=True)
    text = tokenizer.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n")
    assert "SmolLM" not in text
    assert decode_runs(tokenizer, sample) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    unmasked = tokenizer.decode(sample.input_ids[sample.loss_mask == 0].tolist())
    assert unmasked == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
                        "<|im_start|>assistant\n\n")


@pytest.mark.parametrize(("max_length", "runs", "n_trained"), [
    (70, [(37, 45), (61, 69)], 16),  # exactly the full length: nothing cut
    (65, [(37, 45), (61, 65)], 12),  # inside the second reply
    (44, [(37, 44)], 7),  # the first reply without its <|im_end|>
    (37, [], 0),  # ends with the first assistant header: nothing to train on
    (8, [], 0),
])
def test_truncation_keeps_the_start(tokenizer, max_length, runs, n_trained):
    full = tokenize_conversation(tokenizer, TWO_TURNS, max_length=NO_TRUNCATION)
    sample = tokenize_conversation(tokenizer, TWO_TURNS, max_length=max_length)
    assert sample.input_ids.tolist() == full.input_ids[:max_length].tolist()
    assert sample.loss_mask.tolist() == full.loss_mask[:max_length].tolist()
    assert masked_runs(sample) == runs and sample.n_trained == n_trained
    assert sample.n_tokens_untruncated == 70
    assert sample.truncated == (max_length < 70)


def test_empty_assistant_reply_is_not_trained(tokenizer):
    conv = conversation(("user", "Say nothing."), ("assistant", ""), ("user", "Now say hi."), ("assistant", "Hi!"))
    sample = tokenize_conversation(tokenizer, conv, max_length=512, verify=True)
    assert decode_runs(tokenizer, sample) == ["Hi!<|im_end|>"]
    blank = conversation(("user", "Say nothing."), ("assistant", " \n "), ("user", "Now say hi."), ("assistant", "Hi!"))
    assert decode_runs(tokenizer, tokenize_conversation(tokenizer, blank, max_length=512)) == ["Hi!<|im_end|>"]


def test_other_templates_mask_content_and_their_end_marker(tokenizer):
    plain = load_tokenizer(default_model_path())  # a second instance (cache hit), so the fixture is untouched
    plain.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n\n"
                           "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")
    sample = tokenize_conversation(plain, TWO_TURNS, max_length=512, verify=True)
    assert tokenizer.decode(sample.input_ids[:4].tolist()).startswith("### user")
    assert decode_runs(plain, sample) == ["2+2 equals 4.<|endoftext|>", "3+3 equals 6.<|endoftext|>"]

    padded = conversation(("user", "hi"), ("assistant", "  hello there \n"), cid="padded-42")
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
    assert decode_runs(plain, tokenize_conversation(plain, padded, max_length=512)) == [" hello there"]
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="padded-42.*rewrites"):
        tokenize_conversation(plain, padded, max_length=512)


def test_a_conversation_the_template_refuses_is_named():
    strict = load_tokenizer(default_model_path())
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    twice = conversation(("user", "a"), ("user", "b"), ("assistant", "c"), cid="sharegpt-7")
    with pytest.raises(ChatTemplateError, match=r"conversation sharegpt-7: the chat template refuses it "
                                                r"\(roles must alternate\)"):
        list(tokenize_conversations(strict, [TWO_TURNS, twice], max_length=512))


def test_a_tokenizer_that_tokenizes_chats_its_own_way_is_caught():
    odd = load_tokenizer(default_model_path())
    original = odd.apply_chat_template

    def with_bos(conversation, tokenize=True, **kwargs):
        out = original(conversation, tokenize=tokenize, **kwargs)
        if tokenize:
            out["input_ids"] = [odd.bos_token_id] + list(out["input_ids"])
        return out

    odd.apply_chat_template = with_bos
    with pytest.raises(ChatTemplateError, match="conversation test: .*apply_chat_template"):
        tokenize_conversation(odd, TWO_TURNS, max_length=512)  # checked without verify: first conversation


def test_render_prompt_ends_with_the_assistant_header(tokenizer):
    ids = render_prompt(tokenizer, [Message("user", "Hi there")])
    assert ids.dtype == np.int32
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                             add_generation_prompt=True)["input_ids"]
    assert ids.tolist() == list(expected)
    expected = DEFAULT_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids.tolist()) == expected
    as_dicts = render_prompt(tokenizer, [{"role": "user", "content": "Hi there"}], add_generation_prompt=False)
    assert tokenizer.decode(as_dicts.tolist()).endswith("Hi there<|im_end|>\n")


def test_real_sharegpt_conversations(tokenizer):
    """Over real data: ids are apply_chat_template's and each masked run is one reply plus <|im_end|>."""
    convs, _ = load_conversations("sharegpt", limit=50)
    samples = list(tokenize_conversations(tokenizer, convs, max_length=NO_TRUNCATION, verify=True, batch_size=16))
    assert [s.id for s in samples] == [c.id for c in convs]
    for conv, sample in zip(convs, samples):
        assert sample.input_ids.tolist() == reference_ids(tokenizer, conv), conv.id
        replies = [m.content + "<|im_end|>" for m in conv.messages if m.role == "assistant" and m.content]
        assert decode_runs(tokenizer, sample) == replies, conv.id
        assert not sample.truncated
    truncated = list(tokenize_conversations(tokenizer, convs, max_length=256))
    for full, cut in zip(samples, truncated):
        assert cut.input_ids.tolist() == full.input_ids[:256].tolist()
        assert cut.loss_mask.tolist() == full.loss_mask[:256].tolist()
        assert cut.truncated == (full.n_tokens_untruncated > 256)


# --- the GGUF tokenizer cache, on a tiny GGUF so a cold conversion takes ~0.1 s ---

TINY_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def write_tiny_gguf(path: Path) -> Path:
    """A GGUF holding only a byte-level BPE tokenizer: 3 special tokens, 256 bytes, 3 merges."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def assert_same_tokenizer(a, b) -> None:
    texts = ["the cat sat on the mat", "héllo wörld 你好 🙂", "<|im_start|>user\nthe<|im_end|>\n"]
    for text in texts:
        assert a(text)["input_ids"] == b(text)["input_ids"]
    chat = TWO_TURNS.as_dicts()
    assert a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(chat, tokenize=False)
    assert a.apply_chat_template(chat)["input_ids"] == b.apply_chat_template(chat)["input_ids"]
    assert (a.eos_token, a.bos_token, len(a)) == (b.eos_token, b.bos_token, len(b))


def test_gguf_tokenizer_is_cached_and_identical(tiny_gguf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=TOKENIZER_LOGGER)
    fresh = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    entry = gguf_cache_dir(tiny_gguf)
    assert entry.parent == tmp_path / "cache" / "tokenizers" and entry.name.startswith("tiny-")

    cold = load_tokenizer(tiny_gguf)
    assert "built the tokenizer" in caplog.text
    assert (entry / "tokenizer.json").is_file() and (entry / "flatspec_tokenizer.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary directory left behind

    caplog.clear()
    cached = load_tokenizer(str(tiny_gguf))
    assert "built the tokenizer" not in caplog.text
    assert_same_tokenizer(fresh, cold)
    assert_same_tokenizer(fresh, cached)
    sample = tokenize_conversation(cached, TWO_TURNS, max_length=512, verify=True)
    assert decode_runs(cached, sample) == ["2+2 equals 4.<|im_end|>", "3+3 equals 6.<|im_end|>"]


@pytest.mark.parametrize("damage", ["garbage tokenizer.json", "wrong marker", "missing marker", "a file"])
def test_broken_cache_entry_is_rebuilt(tiny_gguf, caplog, damage):
    fresh = load_tokenizer(tiny_gguf)
    entry = gguf_cache_dir(tiny_gguf)
    if damage == "garbage tokenizer.json":
        (entry / "tokenizer.json").write_text("{not json")
    elif damage == "wrong marker":
        marker = json.loads((entry / "flatspec_tokenizer.json").read_text())
        (entry / "flatspec_tokenizer.json").write_text(json.dumps({**marker, "vocab_size": 7}))
    elif damage == "missing marker":
        (entry / "flatspec_tokenizer.json").unlink()
    else:
        for child in entry.iterdir():
            child.unlink()
        entry.rmdir()
        entry.write_text("not a directory")

    caplog.set_level(logging.INFO, logger=TOKENIZER_LOGGER)
    rebuilt = load_tokenizer(tiny_gguf)
    assert "is broken" in caplog.text and "built the tokenizer" in caplog.text
    assert_same_tokenizer(fresh, rebuilt)
    assert_same_tokenizer(fresh, load_tokenizer(tiny_gguf))  # the rebuilt entry loads
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def python_output(code: str) -> str:
    """What a fresh Python process running ``code`` prints (stripped); it must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_gguf_tokenizer_builds_without_torch(tiny_gguf):
    """torch is test-only: `flatspec` on a demo install must build a GGUF tokenizer without it."""
    printed = python_output("import sys; sys.modules['torch'] = None\n"
                            "from flatspec_jax.data.tokenizer import load_tokenizer\n"
                            f"tok = load_tokenizer({str(tiny_gguf)!r})\n"
                            "print(tok('the cat')['input_ids'])")
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert printed == str(reference("the cat")["input_ids"])


def test_gguf_tokenizer_does_not_import_torch(tiny_gguf):
    """Building and reloading a GGUF tokenizer leaves torch unimported even where it is installed
    (importing it costs seconds of every `flatspec` command's start)."""
    printed = python_output("import sys\n"
                            "from flatspec_jax.data.tokenizer import load_tokenizer\n"
                            f"load_tokenizer({str(tiny_gguf)!r}); load_tokenizer({str(tiny_gguf)!r})\n"
                            "print('torch' in sys.modules)")
    assert printed == "False"


def test_cache_key_follows_the_file(tiny_gguf):
    before = gguf_cache_dir(tiny_gguf)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_cache_dir(tiny_gguf) != before


def test_hf_directory_and_bad_paths(tiny_gguf, tmp_path):
    directory = tmp_path / "hf"
    load_tokenizer(tiny_gguf).save_pretrained(str(directory))
    assert_same_tokenizer(load_tokenizer(tiny_gguf), load_tokenizer(directory))
    with pytest.raises(FileNotFoundError, match="neither a HF model directory nor a .gguf file"):
        load_tokenizer(tmp_path / "missing.gguf")


def test_default_model_path_is_the_embedded_gguf():
    path = Path(default_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf_conversion(tokenizer):
    """Our torch-free build and its cached copy against transformers' AutoTokenizer(gguf_file=...)."""
    path = Path(default_model_path())
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    built = build_gguf_tokenizer(path)
    convs, _ = load_conversations("sharegpt", limit=100)
    for ours in (built, tokenizer):
        assert_same_tokenizer(reference, ours)
        for conv in convs:
            chat = conv.as_dicts()
            assert reference.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat, tokenize=False)
            assert reference.apply_chat_template(chat)["input_ids"] == ours.apply_chat_template(chat)["input_ids"]


def test_answered_turns_interleaves_replies_and_leaves_the_next_turn_open():
    assert answered_turns(["a", "b"], ["A"]) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]
    assert answered_turns(["a"], ["A"]) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}]
    assert answered_turns([], []) == []


def test_gguf_tokenizer_with_an_older_transformers_converter(tiny_gguf, monkeypatch):
    """transformers 5.17 (a GPU image's) keeps the mapping and converter in ``integrations.ggml``,
    and its converter also returns special tokens; the GGUF's own ids must still name them."""
    import transformers.integrations.ggml as ggml
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    def converter_with_extras(architecture, tokenizer_dict):
        backend, extra = mapping.convert_gguf_tokenizer(architecture, tokenizer_dict)
        return backend, {**extra, "eos_token": "<|im_start|>", "unk_token": "<|im_end|>"}

    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    monkeypatch.setattr(ggml, "GGUF_TOKENIZER_MAPPING", mapping.GGUF_TOKENIZER_MAPPING, raising=False)
    monkeypatch.setattr(ggml, "convert_gguf_tokenizer", converter_with_extras, raising=False)
    monkeypatch.delattr(mapping, "GGUF_TOKENIZER_MAPPING")
    older = build_gguf_tokenizer(tiny_gguf)
    assert (older.eos_token, older.unk_token, older.bos_token, older.pad_token) == (
        "<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert_same_tokenizer(reference, older)
