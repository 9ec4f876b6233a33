"""Chat templates: turning a prompt (text or chat) and a completion into the exact strings a model sees.

Instruction-tuned models were trained on their chat template; feeding them raw text works poorly, so
prompts go through `tokenizer.apply_chat_template` when the tokenizer has one. A completion is
trained as the assistant turn: the completion text is whatever the template puts after the prompt
(content plus the template's end-of-turn marker), so the model learns to stop where it would in chat.
"""

from __future__ import annotations

from typing import Any

Prompt = str | list[dict[str, str]]


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A text prompt is one user turn; a chat is used as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def prompt_plain_text(prompt: Prompt) -> str:
    """The prompt without any template: the text, or the chat's turns joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt if m["content"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


def format_prompt(prompt: Prompt, tokenizer: Any = None, apply_chat_template: bool = True) -> str:
    """The text to generate from: the chat template with the assistant turn opened
    (add_generation_prompt=True), or the plain prompt when templating is off or unavailable."""
    if not (apply_chat_template and has_chat_template(tokenizer)):
        return prompt_plain_text(prompt)
    return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)


def eos_text(tokenizer: Any) -> str:
    return (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""


def format_completion(
    prompt: Prompt, completion: str, tokenizer: Any = None, apply_chat_template: bool = True
) -> str:
    """The text that follows `format_prompt(prompt)` when `completion` is the assistant's answer.

    With a template: render the whole chat and keep what comes after the prompt text, so the
    template's own end-of-turn tokens are included. If the template does not reproduce the prompt
    as a prefix (some rewrite earlier turns), or there is no template: completion + EOS token.
    """
    prompt_text = format_prompt(prompt, tokenizer, apply_chat_template)
    if apply_chat_template and has_chat_template(tokenizer):
        chat = prompt_messages(prompt) + [{"role": "assistant", "content": completion}]
        full = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        if full.startswith(prompt_text) and len(full) > len(prompt_text):
            return full[len(prompt_text) :]
    return completion + eos_text(tokenizer)


def format_prompt_completion(
    prompt: Prompt, completion: str, tokenizer: Any = None, apply_chat_template: bool = True
) -> tuple[str, str]:
    """(prompt text, completion text); their concatenation is the full training text."""
    return (
        format_prompt(prompt, tokenizer, apply_chat_template),
        format_completion(prompt, completion, tokenizer, apply_chat_template),
    )
