"""The prompt a model sees for one (document, question) pair, and middle truncation.

`qwenlong` is QwenLong-L1's zero-shot template (the model card of Tongyi-Zhiwen/QwenLong-L1-32B;
also what its DocMath and Frames evaluations use). The answer format it asks for,
"Therefore, the answer is ...", is what the rule reward extracts.
"""
from __future__ import annotations

TEMPLATES = {
    "qwenlong": (
        "Please read the following text and answer the question below.\n\n"
        "<text>\n{context}\n</text>\n\n{question}\n\n"
        'Format your response as follows: "Therefore, the answer is (insert answer here)".'
    ),
    "plain": "{context}\n\nQuestion: {question}\nAnswer:",
}


def render_prompt(context: str, question: str, template: str = "qwenlong") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r} unknown; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(context=context.strip(), question=question.strip())


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, chat-templated (with the generation prompt) when asked and
    when the tokenizer has a template."""
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat (system / user messages) with the generation prompt; without a
    chat template, the contents joined by blank lines."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


def build_prompt_ids(tokenizer, context: str, question: str, *, template: str = "qwenlong",
                     max_tokens: int = 0, chat: bool = True) -> tuple[list[int], bool]:
    """-> (prompt token ids, truncated?). When the prompt exceeds max_tokens (0: no limit),
    the document loses tokens from its middle: its head and tail stay, and so do the
    template and the question, which surround it."""
    ids = encode_prompt(tokenizer, render_prompt(context, question, template), chat)
    if max_tokens <= 0 or len(ids) <= max_tokens:
        return ids, False
    overhead = len(encode_prompt(tokenizer, render_prompt("", question, template), chat))
    if overhead >= max_tokens:
        raise ValueError(f"the question and template alone take {overhead} tokens, over the "
                         f"{max_tokens}-token input limit")
    doc = tokenizer.encode(context.strip(), add_special_tokens=False)
    keep = max_tokens - overhead
    while keep > 0:
        head = keep // 2
        cut = tokenizer.decode(doc[:head]) + " ... " + tokenizer.decode(doc[len(doc) - (keep - head):])
        ids = encode_prompt(tokenizer, render_prompt(cut, question, template), chat)
        if len(ids) <= max_tokens:
            return ids, True
        keep -= len(ids) - max_tokens  # decode/encode round trips can merge or split tokens
    raise ValueError(f"cannot fit the prompt into {max_tokens} tokens")


# ---- the model's own turn format: where a turn ends, whether it opens a thought ----------
_MARK = "\u2063longrl-mark\u2063"


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>,
    <|eot_id|>, <｜end▁of▁sentence｜>, ...): the first special token the template writes after
    an assistant message. None without a template or when the template writes none."""
    text = _chat_text(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}], False)
    if text is None or _MARK not in text:
        return None
    after = tokenizer.encode(text.split(_MARK, 1)[1], add_special_tokens=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    return next((t for t in after if t in special), None)


def opens_thinking(tokenizer, chat: bool = True) -> bool:
    """True when the chat template's generation prompt opens a thinking block (ends in
    `<think>`, as R1-Distill and QwenLong-L1 do): the model's turn starts inside a thought."""
    if not chat:
        return False
    text = _chat_text(tokenizer, [{"role": "user", "content": "q"}], True)
    return text is not None and text.rstrip().endswith("<think>")


def resolve_think(think: str, tokenizer, chat: bool = True) -> str:
    """The reward's think setting: "auto" becomes "required" when the template opens a
    thinking block (an answer outside a closed thought is no answer), else stays "auto"."""
    if think != "auto":
        return think
    return "required" if opens_thinking(tokenizer, chat) else "auto"


def _eos_ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value or [] if isinstance(v, int)]


def stop_token_ids(tokenizer, checkpoint_dir=None) -> list[int]:
    """The one stop rule of SFT, rollout, eval and the judge: the eos ids of the checkpoint's
    generation_config.json (else config.json), the tokenizer's eos, and the chat template's
    end-of-turn token — what transformers' generate stops at, plus the turn's end."""
    import json
    from pathlib import Path

    ids: list[int] = []
    if checkpoint_dir is not None:
        for name in ("generation_config.json", "config.json"):
            path = Path(checkpoint_dir) / name
            if path.is_file():
                try:
                    ids += _eos_ids(json.loads(path.read_text()).get("eos_token_id"))
                except (json.JSONDecodeError, AttributeError):
                    pass
                if ids:
                    break
    if tokenizer is not None:
        ids += _eos_ids(getattr(tokenizer, "eos_token_id", None))
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            ids.append(eot)
    return [t for t in dict.fromkeys(ids) if t >= 0]


def answer_sentence(answer: str, task: str) -> str:
    """The sentence the rule reward reads the answer from."""
    if task == "choice":
        return f"The correct answer is ({answer})."
    return f"Therefore, the answer is {answer}."


def sft_target(record, *, opens_thought: bool, think: str = "auto") -> str:
    """The assistant text warm-up SFT teaches for a record, in the model's own format, so that
    the RL reward with the same `think` setting scores it 1.

    - the generation prompt opened `<think>` (R1-Distill, QwenLong-L1): the reasoning trace,
      `</think>`, then the answer sentence;
    - think = "required" on a template that opens no thought: `<think>` reasoning `</think>`
      then the answer sentence;
    - otherwise the reasoning (when the record has one) as plain text, then the answer sentence."""
    sentence = answer_sentence(record.answers[0], record.task)
    reasoning = (getattr(record, "reasoning", None) or "").strip()
    if opens_thought:
        return f"{reasoning}\n</think>\n\n{sentence}" if reasoning else f"\n</think>\n\n{sentence}"
    if think == "required":
        return f"<think>\n{reasoning}\n</think>\n\n{sentence}"
    return f"{reasoning}\n\n{sentence}" if reasoning else sentence
