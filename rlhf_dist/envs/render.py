"""Token in, token out: the tokens an observation appends to a trajectory, without ever
rendering (and tokenising) the trajectory's history again.

Re-rendering a whole conversation between turns and tokenising it afresh silently changes
tokens the policy sampled (a BPE merge across a turn boundary, a template that strips or
normalises an assistant turn): the trained tokens then differ from the sampled ones and the
data is off-policy without anyone noticing (TRL #5224; a peer measured 32 of 64 rollouts
changed by a full re-render). Here a trajectory is one buffer of token ids: the prompt's, the
sampled ones exactly as sampled, and for each observation the *delta* its messages add to a
fixed base conversation, rendered once with the template and tokenised on its own.

With a chat template, the base is a user turn and an assistant turn holding a marker; what the
template puts after the assistant's text is the end of a turn: when it starts with a stop
token the policy samples (``<|im_end|>``), a turn that stopped there continues with the rest
(``"\\n"``), and a turn cut at its token cap is closed with the whole of it (those tokens are
not sampled: they are masked like the observation). Then come the observation's messages and
the generation prompt of the next assistant turn: ``render(base + obs, generation prompt)``
minus ``render(base)``. Without a template the turns are plain ``role: content`` lines
(``chat.render_plain``) and an assistant turn ends with the EOS token.
"""

from __future__ import annotations

from rlhf_dist import chat

MARK = "\u2063RLHFDIST\u2063"  # an assistant turn's text no template alters
BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": MARK}]


class TokenDelta:
    def __init__(self, tokenizer, template: bool, stop_ids: list[int], tools=None):
        self.tok, self.template, self.tools = tokenizer, template, tools or None
        self.stop_ids = list(stop_ids)
        if template:
            full = self._render(BASE, False)
            tail = full[full.index(MARK) + len(MARK) :]
            self.base = full
            self.after_stop, closing_text = self._after_stop(tail)
            self.closing = self.encode(closing_text)
        else:  # plain: the turn ends with EOS (as SFT trains it: chat.sft_tokens)
            self.base = chat.render_plain(BASE, add_generation_prompt=False)
            self.after_stop = ""
            self.closing = [tokenizer.eos_token_id]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def _after_stop(self, tail: str) -> tuple[str, str]:
        """(what follows a sampled stop token, the text that closes a turn without one)."""
        for sid in self.stop_ids:
            text = self.tok.decode([sid])
            stripped = tail.lstrip()
            if text and stripped.startswith(text):
                return stripped[len(text) :], tail
        return tail, tail  # the template ends a turn without a stop token: add its end

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def observation(self, messages: list[dict], stopped: bool) -> list[int]:
        """The tokens that follow an assistant turn (``stopped``: it ended with a stop
        token) and ``messages``, up to the next assistant turn's generation prompt."""
        if self.template:
            after = self._render(BASE + messages, True)
            if not after.startswith(self.base):
                raise ValueError(
                    "the chat template does not render a conversation as an extension of "
                    "the conversation before it; the observation's tokens cannot be appended"
                )
            head = self.encode(self.after_stop) if stopped else self.closing
            return head + self.encode(after[len(self.base) :])
        text = "\n" + chat.render_plain(messages, add_generation_prompt=True)
        head = [] if stopped else self.closing
        return head + self.encode(text)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The first prompt's tokens (the generation prompt included; the template holds the
        special tokens, plain text gets the tokenizer's own)."""
        if self.template:
            return self.encode(self._render(messages, True))
        if self.tools:  # no template to render them: their JSON schemas as a system turn
            messages = [{"role": "system", "content": tools_text(self.tools)}, *messages]
        text = chat.render_plain(messages, add_generation_prompt=True)
        return self.tok(text)["input_ids"]


def tools_text(tools: list) -> str:
    """The tools' JSON schemas (as transformers derives them from the functions' signatures
    and docstrings), one a line, for a conversation rendered without a template."""
    import json

    from transformers.utils import get_json_schema

    return "tools:\n" + "\n".join(json.dumps(get_json_schema(f)) for f in tools)
