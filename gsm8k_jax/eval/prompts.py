"""Turning a GSM8K question into the exact prompt text the model sees.

Instruction-tuned Gemma is always prompted through its chat template (raw
prompts cost ~25 points), and the instruction asks for the format that
strict extraction scores: a final `\\boxed{}` answer.
"""

from __future__ import annotations

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n\n"
    "Solve the problem step by step. Put the final answer, a number only, in"
    " \\boxed{} at the end."
)


def format_prompt(
    question: str,
    tokenizer,
    *,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> str:
    """The full prompt text, chat-templated (with its own `<bos>`) when asked.

    `template` must contain `{question}`. A system prompt becomes a system
    turn, which Gemma's template folds into the first user turn.
    """
    if "{question}" not in template:
        raise ValueError("The prompt template must contain '{question}'.")
    user_text = template.replace("{question}", question)
    if not use_chat_template:
        return f"{system_prompt}\n\n{user_text}" if system_prompt else user_text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "This tokenizer has no chat template; pass --nouse_chat_template"
            " (use_chat_template=False from Python) for a base"
            " (pretrained-only) model."
        )
    messages = [{"role": "user", "content": user_text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
