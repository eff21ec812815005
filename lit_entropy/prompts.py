"""Turning a dataset prompt (plain text or chat messages) into the exact text the policy continues."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_entropy.errors import ConfigError

__all__ = ["render_prompt"]


def _check_messages(messages: list[Any]) -> None:
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConfigError(
                f"prompt message {index} must be a mapping with 'role' and 'content', got {message!r}"
            )


def render_prompt(
    prompt: str | list[dict[str, str]],
    tokenizer: Any,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
) -> str:
    """Renders a prompt to the text given to the model, with the chat template when there is one.

    Args:
        prompt: Plain text (one user turn) or a list of chat messages ``{"role": ..., "content": ...}``.
        tokenizer: A Hugging Face tokenizer; only ``chat_template`` and ``apply_chat_template`` are used.
        chat_template: ``True`` to require the tokenizer's chat template, ``False`` to never use it,
            ``None`` to use it iff ``tokenizer.chat_template`` is set.
        system_prompt: Optional system message: the first message with a template, else text prepended
            to the prompt followed by ``"\\n"``.

    Returns:
        With a template: ``apply_chat_template([system?] + messages, tokenize=False,
        add_generation_prompt=True)``, so the text ends where the assistant's answer starts. Without: the
        prompt itself (after ``system_prompt + "\\n"`` if given).

    Raises:
        ConfigError: ``chat_template=True`` but the tokenizer has no chat template, a list of messages
            without a template, or a malformed message.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise ConfigError(
            f"chat_template=True but the tokenizer ({type(tokenizer).__name__}) has no chat template; "
            "set chat_template to false or None, or use a tokenizer that defines one"
        )
    use_template = has_template if chat_template is None else chat_template
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        _check_messages(prompt)
        messages = [dict(message) for message in prompt]
    else:
        raise ConfigError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")

    if not use_template:
        if not isinstance(prompt, str):
            raise ConfigError(
                "prompt is a list of chat messages but the tokenizer has no chat template "
                "(or chat_template is false); give plain-text prompts or a tokenizer with a chat template"
            )
        return prompt if system_prompt is None else f"{system_prompt}\n{prompt}"

    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        # Defensive: some processors return a list for batched input; we always pass one conversation.
        raise ConfigError(f"tokenizer.apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
