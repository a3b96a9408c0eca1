"""The model's own turn format: one stop rule for SFT, rollout, eval and the judge, whether
the template opens a thought, and SFT targets the RL reward scores 1."""
from __future__ import annotations

import json

import pytest

from engine.data import synthetic
from engine.data.template import (end_of_turn_id, opens_thinking, resolve_think, sft_target, stop_token_ids)
from engine.rewards import HybridReward, RewardItem
from engine.train import sft_examples

# DeepSeek-R1-Distill's turn layout (its generation prompt opens a thought), in SmolLM2's vocabulary
R1_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>User: {{ m['content'] }}"
            "{% else %}<|im_start|>Assistant: {{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>Assistant: <think>\n{% endif %}")


@pytest.fixture
def fresh_tokenizer(smollm):
    from transformers import AutoTokenizer
    return lambda: AutoTokenizer.from_pretrained(str(smollm[0].checkpoint_dir))


def test_stop_rule_reads_generation_config_and_the_end_of_turn(tmp_path, smollm, fresh_tokenizer):
    model, tok = smollm
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok, model.checkpoint_dir) == [tok.convert_tokens_to_ids("<|im_end|>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert stop_token_ids(tok, tmp_path)[:2] == [5, 7]
    r1 = fresh_tokenizer()
    r1.chat_template = R1_STYLE
    endoftext = r1.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(r1) == endoftext  # the turn's end comes from the template, not a list of names
    assert endoftext in stop_token_ids(r1)


def test_opens_thinking_and_the_default_think_setting(smollm, fresh_tokenizer):
    _, tok = smollm
    assert not opens_thinking(tok) and resolve_think("auto", tok) == "auto"
    r1 = fresh_tokenizer()
    r1.chat_template = R1_STYLE
    assert opens_thinking(r1) and resolve_think("auto", r1) == "required"
    assert not opens_thinking(r1, chat=False)
    assert resolve_think("off", r1) == "off"


def test_generator_stops_at_the_end_of_turn_by_default(smollm):
    from engine.data.template import encode_prompt
    from engine.rollout import Generator, SamplingParams

    model, tok = smollm
    prompt = encode_prompt(tok, "Reply with one word: what colour is the sky on a clear day?")
    gen = Generator(model, tok)
    (default,), = gen.generate([prompt], params=SamplingParams(max_new_tokens=48, temperature=0.0))
    assert default.finish_reason == "stop" and default.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    (ignored,), = gen.generate([prompt], params=SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 48
    assert ignored.token_ids[:len(default.token_ids)] == default.token_ids


def _targets(records, tok, think):
    """The SFT target text of each record, decoded from the loss-flagged tokens (without the
    end-of-turn token), as the policy would produce it after the prompt."""
    out = []
    for ids, flags in sft_examples(records, tok, max_input_tokens=0, think=think):
        target = [t for t, f in zip(ids, flags) if f][:-1]
        out.append(tok.decode(target, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("template,think", [("smollm", "auto"), ("smollm", "required"), ("r1", "auto"),
                                            ("r1", "required")])
def test_sft_target_scores_one_under_the_rl_reward(smollm, fresh_tokenizer, template, think):
    tok = fresh_tokenizer()
    if template == "r1":
        tok.chat_template = R1_STYLE
    records = synthetic.generate(8, 80, seed=5)
    assert {r.task for r in records} >= {"qa", "choice"} and all(r.reasoning for r in records)
    reward = HybridReward(think=resolve_think(think, tok))
    texts = _targets(records, tok, think)
    scored = reward([RewardItem(t, r.answers, r.task, r.question) for t, r in zip(texts, records)])
    assert [s.reward for s in scored] == [1.0] * len(records), texts
    if template == "r1":  # the prompt opened the thought: the target closes it, never reopens it
        assert all("</think>" in t and "<think>" not in t for t in texts)
        assert all(r.reasoning.split()[0] in t for t, r in zip(texts, records))


def test_sft_target_formats():
    rec = synthetic.generate(1, 60, seed=1, kinds=("lookup",))[0]
    plain = sft_target(rec, opens_thought=False)
    assert plain.endswith(f"Therefore, the answer is {rec.answers[0]}.") and plain.startswith(rec.reasoning)
    opened = sft_target(rec, opens_thought=True)
    assert opened.startswith(rec.reasoning) and "\n</think>\n\nTherefore" in opened
    full = sft_target(rec, opens_thought=False, think="required")
    assert full.startswith("<think>\n") and "</think>" in full


def test_checkpoints_keep_the_generation_config(tmp_path, tiny_checkpoint):
    from engine.model import load_model, save_model

    path, _ = tiny_checkpoint("qwen2")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4], "do_sample": True}))
    model, _ = load_model(path, device="cpu", dtype="float32")
    out = save_model(model, None, tmp_path / "copy")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 4]
    assert stop_token_ids(None, out) == [3, 4]
