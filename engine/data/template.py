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
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(text)


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
