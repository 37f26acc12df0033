"""Chat formats: message lists, and how each model reads them (docs/architecture.md, "Data
formats and chat templates").

A data field holds a string or a list of ``{"role": ..., "content": ...}`` messages.
``data.chat_template`` says when a tokenizer's chat template renders them:

- ``auto``: when the field holds message lists and the tokenizer has a template;
- ``true``: always (a string is one user turn); a tokenizer without a template is refused;
- ``false``: never; message lists are rendered plainly (``render_plain``).

Strings with ``auto`` or ``false`` are used exactly as before (no chat at all). Pure
functions of a tokenizer and the data: no ray, no torch.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def message_problem(value) -> str | None:
    """Why ``value`` is not a usable message list (None when it is one)."""
    if not isinstance(value, list) or not value:
        return "must be a non-empty string or a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return (
                "must be a non-empty string or a list of {role, content} messages "
                f"(message {i} is not a {{role, content}} mapping)"
            )
        if m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} ({m['role']}): content must be a string"
    if not any(m["role"] == "user" for m in value):
        return "the messages have no user turn"
    return None


def value_problem(value, allow_messages: bool = True) -> str | None:
    """Why ``value`` is neither a non-empty string nor (``allow_messages``) a message list."""
    if isinstance(value, str):
        return None if value.strip() else "must be a non-empty string"
    if isinstance(value, list) and allow_messages:
        return message_problem(value)
    return "must be a non-empty string" + (
        " or a list of {role, content} messages" if allow_messages else ""
    )


def is_messages(value) -> bool:
    return isinstance(value, list)


def as_messages(value, role: str = "user") -> list[dict]:
    """A message list: ``value`` itself, or a string as one turn of ``role``. Only ``role``
    and ``content`` are kept (Arrow struct columns may add keys holding None)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_mode(mode, any_messages: bool) -> bool:
    """Whether data is read as chat at all: with ``chat_template=true``, or when a field holds
    message lists."""
    return mode is True or any_messages


def uses_template(mode, tokenizer, any_messages: bool) -> bool:
    """Whether ``tokenizer``'s template renders the data (``mode``: ``data.chat_template``)."""
    if mode is True:
        return True
    return mode == "auto" and any_messages and has_template(tokenizer)


def template_missing(mode, tokenizer, name: str) -> str | None:
    """The refusal when ``chat_template=true`` and ``tokenizer`` (``name``) has no template."""
    if mode is True and not has_template(tokenizer):
        return (
            f"data.chat_template=true, but the tokenizer of {name} has no chat template "
            f"(set data.chat_template=auto or false, or give it a chat_template)"
        )
    return None


def render_plain(messages: list[dict], add_generation_prompt: bool) -> str:
    """A message list as text without a template: ``role: content`` lines, and with
    ``add_generation_prompt`` a final ``assistant:`` the response continues."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + "\nassistant:" if add_generation_prompt else text


def render(tokenizer, messages: list[dict], template: bool, add_generation_prompt: bool) -> str:
    if template:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_plain(messages, add_generation_prompt)


def prompt_text(tokenizer, value, template: bool, chat: bool) -> str:
    """The text the policy continues: a string as given when not ``chat``; else the
    messages rendered with the generation prompt."""
    if not chat:
        return value
    return render(tokenizer, as_messages(value), template, add_generation_prompt=True)


def response_messages(value) -> list[dict]:
    """A response: a string is one assistant turn; a message list is taken as it is."""
    return as_messages(value, role="assistant")


def conversation_text(tokenizer, prompt, response, template: bool) -> str:
    """A whole conversation (prompt messages, then the response turns) as a reward model
    reads it: rendered with its template, or plainly."""
    messages = as_messages(prompt) + response_messages(response)
    return render(tokenizer, messages, template, add_generation_prompt=False)


def sft_segments(tokenizer, messages: list[dict], template: bool) -> list[tuple[str, bool]]:
    """A conversation cut into text segments, each with whether it is an assistant turn's
    text (the tokens SFT trains on): for assistant turn ``k`` the context is the conversation
    before it rendered with the generation prompt, and the turn is what rendering it adds.
    Raises ValueError when the template does not render turns as prefixes of one another."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context = render(tokenizer, messages[:k], template, add_generation_prompt=True)
        full = render(tokenizer, messages[: k + 1], template, add_generation_prompt=False)
        if not context.startswith(done) or not full.startswith(context):
            raise ValueError(
                f"the chat template does not render assistant turn {k} after the "
                f"conversation before it (each rendering must extend the previous one)"
            )
        segments.append((context[len(done) :], False))
        segments.append((full[len(context) :], True))
        done = full
    if not segments:
        raise ValueError("the conversation has no assistant turn to train on")
    return segments


def sft_tokens(tokenizer, prompt, response, template: bool, chat: bool):
    """(ids, labels) of one demonstration; labels are -100 except on assistant tokens.

    Not ``chat`` (string prompt and response): ``prompt`` tokenised as the generators
    tokenise prompts, then ``response + EOS`` (trained). ``chat``: the conversation
    (``prompt`` messages, or a whole ``messages`` conversation when ``response`` is None)
    rendered and cut by :func:`sft_segments`; plainly rendered turns end with EOS."""
    eos = tokenizer.eos_token_id
    if not chat:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        return p + a, [-100] * len(p) + a
    messages = as_messages(prompt)
    if response is not None:
        messages += response_messages(response)
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(sft_segments(tokenizer, messages, template)):
        seg = tokenizer(text, add_special_tokens=(i == 0 and not template))["input_ids"]
        if trained and not template:
            seg = seg + [eos]
        ids += seg
        labels += seg if trained else [-100] * len(seg)
    return ids, labels


def record_template(mode, tokenizer, *values) -> tuple[bool, bool]:
    """(chat, template) for one SFT or RM record whose fields are ``values``: chat when
    ``chat_template=true`` or a field holds messages; the template when chat and ``true``,
    or ``auto`` and the tokenizer has one."""
    chat = chat_mode(mode, any(is_messages(v) for v in values))
    template = chat and (mode is True or (mode == "auto" and has_template(tokenizer)))
    return chat, template


def reward_input(tokenizer, prompt, response, mode) -> tuple[str, bool]:
    """What a reward model reads for ``prompt`` and ``response``, and whether the tokenizer
    adds its special tokens: strings outside chat mode as ``models.reward_text`` joins them;
    else the conversation rendered with the reward model's own template (which carries its
    special tokens), or plainly."""
    chat, template = record_template(mode, tokenizer, prompt, response)
    if not chat:
        from rlhf_dist.models import reward_text

        return reward_text(prompt, response), True
    return conversation_text(tokenizer, prompt, response, template), not template


def encode(tokenizer, texts: list[str], add_special_tokens: list[bool], **kwargs):
    """Tokenise ``texts`` into one padded batch of tensors, each text with its own
    ``add_special_tokens``."""
    flags = set(add_special_tokens)
    if len(flags) <= 1:
        flag = flags.pop() if flags else True
        return tokenizer(
            texts, add_special_tokens=flag, return_tensors="pt", padding=True, **kwargs
        )
    ids = [
        tokenizer(t, add_special_tokens=f, **kwargs)["input_ids"]
        for t, f in zip(texts, add_special_tokens)
    ]
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")
