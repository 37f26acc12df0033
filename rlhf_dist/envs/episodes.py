"""Multi-turn rollouts: the trajectories of one chunk advance as one batch per turn.

Each trajectory is one buffer of token ids (``Trajectory``): its prompt, then every turn's
sampled tokens exactly as sampled (with their behaviour log-probs), then the tokens its
observation adds (``render.TokenDelta``: never a re-render of the history). Per turn the
engine samples the active trajectories together (``sample``: any engine's, HF or vLLM); each
one's text goes to its environment's ``step`` (guarded: a time-out or an exception ends the
trajectory, never the rollout); finished trajectories leave the batch.

Guards (``Limits``): at most ``max_turns`` turns, ``turn_tokens`` sampled per turn,
``total_tokens`` in the response region (sampled and observation tokens), an observation's
content cut to ``observation_tokens`` tokens, ``timeout_s`` for a reset or a step, and at most
``max_invalid`` invalid tool calls in a row (the environment marks a call invalid in its
``info``). A trajectory that fails (time-out, error, too many invalid calls) or overruns (its
turns or tokens run out before it is done) is ended and counted, and rewarded 0, or with
``on_failure="mask"`` left out of the loss as well.

The policy loss, KL and entropy see the sampled tokens only: the batch's ``response_mask`` is 1
on them and 0 on observation tokens, which stay in the attention mask (the context). A turn's
reward, with ``turn_rewards``, sits on that turn's last sampled token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rlhf_dist import chat
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.envs.base import load_env
from rlhf_dist.envs.guards import guarded
from rlhf_dist.envs.render import TokenDelta

# (token lists, max new tokens) -> per list: (new token ids, their log-probs, ended at a stop)
Sampler = Callable[[list[list[int]], int], list[tuple[list[int], list[float], bool]]]

ENDINGS = ("done", "max_turns", "token_cap", "timeout", "error", "invalid_calls")
FAILURES = ("max_turns", "token_cap", "timeout", "error", "invalid_calls")


@dataclass
class Limits:
    max_turns: int = 4
    turn_tokens: int = 32
    total_tokens: int = 128
    observation_tokens: int = 64
    timeout_s: float = 10.0
    max_invalid: int = 2
    on_failure: str = "zero"  # or "mask"
    turn_rewards: bool = False


@dataclass
class EpisodeSettings:
    """What a generator needs for multi-turn rollouts: the environment (``rollout.env``), the
    guards, and whether the policy's chat template renders the turns
    (``data.chat_template``)."""

    env: str
    limits: Limits
    chat_template: bool | str = "auto"
    tools: str = ""  # ``rollout.tools``: functions as tools, the environment made from them

    def env_class(self) -> type:
        """The environment class each trajectory gets an instance of."""
        return env_class(self.env, self.tools, self.limits.timeout_s)


def env_class(env: str, tools: str, timeout_s: float) -> type:
    """``rollout.env``'s class, or the one ``rollout.tools`` makes (EnvError saying why not)."""
    if tools:
        from rlhf_dist.envs.tools import tool_env

        return tool_env(tools, timeout_s)
    return load_env(env)


def episode_settings(cfg) -> EpisodeSettings | None:
    """The generators' multi-turn settings from the config (None: single-turn)."""
    r = cfg.rollout
    if not r.multi_turn:
        return None
    limits = Limits(
        max_turns=r.max_turns,
        turn_tokens=r.max_new_tokens,
        total_tokens=r.max_total_tokens,
        observation_tokens=r.max_observation_tokens,
        timeout_s=r.env_timeout_s,
        max_invalid=r.max_invalid_tool_calls,
        on_failure=r.on_env_failure,
        turn_rewards=r.turn_rewards,
    )
    return EpisodeSettings(r.env, limits, cfg.data.chat_template, r.tools)


@dataclass
class Trajectory:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)  # (token index, r)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncations: int = 0  # observations cut to Limits.observation_tokens
    invalid_streak: int = 0
    ended: str = ""

    @property
    def failed(self) -> bool:
        return self.ended in FAILURES

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.tokens += ids
        self.sampled += [logprobs is not None] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def run_episodes(
    sample: Sampler,
    tokenizer,
    delta: TokenDelta,
    envs: Sequence,
    rows: Sequence[dict],
    limits: Limits,
) -> list[Trajectory]:
    """Roll out one trajectory per (environment, row) to its end."""
    trajs = []
    for env, row in zip(envs, rows):
        out = guarded(env.reset, row, timeout_s=limits.timeout_s)
        first = chat.as_messages(out.value) if out.ok else [{"role": "user", "content": ""}]
        traj = Trajectory(delta.prompt(first))
        if not out.ok:
            traj.ended = "timeout" if out.timed_out else "error"
        trajs.append(traj)
    while active := [i for i, t in enumerate(trajs) if not t.ended]:
        budgets = {
            i: min(limits.turn_tokens, limits.total_tokens - len(trajs[i].tokens)) for i in active
        }
        outs = sample([trajs[i].prompt + trajs[i].tokens for i in active], max(budgets.values()))
        for i, (ids, logprobs, stopped) in zip(active, outs):
            if len(ids) > budgets[i]:  # another trajectory's budget was larger: cut to its own
                ids, logprobs, stopped = ids[: budgets[i]], logprobs[: budgets[i]], False
            _take_turn(trajs[i], envs[i], tokenizer, delta, ids, logprobs, stopped, limits)
    for t in trajs:
        if t.failed:
            t.reward, t.turn_rewards = 0.0, []
    return trajs


def _take_turn(traj, env, tokenizer, delta, ids, logprobs, stopped, limits) -> None:
    traj.add(ids, logprobs)
    traj.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out = guarded(env.step, text, timeout_s=limits.timeout_s)
    if not out.ok:
        traj.ended = "timeout" if out.timed_out else "error"
        return
    obs, reward, done, info = out.value
    info = info or {}
    traj.tool_calls += int(info.get("tool_calls", 0))
    traj.tool_errors += int(info.get("tool_errors", 0))
    if limits.turn_rewards and traj.sampled and float(reward):
        traj.turn_rewards.append((len(traj.tokens) - 1, float(reward)))
    else:
        traj.reward += float(reward)
    traj.invalid_streak = traj.invalid_streak + 1 if info.get("invalid") else 0
    if done:
        traj.ended = "done"
    elif traj.invalid_streak > limits.max_invalid:
        traj.ended = "invalid_calls"
    elif traj.turns >= limits.max_turns:
        traj.ended = "max_turns"
    if traj.ended:
        return
    messages = _truncated(
        chat.as_messages(obs, role="user") if obs else [], tokenizer, traj, limits
    )
    follow = delta.observation(messages, stopped)
    if len(traj.tokens) + len(follow) >= limits.total_tokens:
        traj.ended = "token_cap"
        return
    traj.add(follow, None)


def _truncated(messages, tokenizer, traj, limits) -> list[dict]:
    """Each message's content cut to ``observation_tokens`` tokens (counted)."""
    out = []
    for m in messages:
        ids = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        if len(ids) > limits.observation_tokens:
            traj.truncations += 1
            m = {**m, "content": tokenizer.decode(ids[: limits.observation_tokens]) + " ..."}
        out.append(m)
    return out


def to_batch(trajs: list[Trajectory], tokenizer, version: int, prompt_ids, limits) -> RolloutBatch:
    """The trajectories as one batch: each prompt left-padded to the widest, the response
    region (every token after the prompt) right-padded; ``response_mask`` 1 on the sampled
    tokens only (0 on observations and on a masked failure), the attention mask 1 on every
    real token. ``scores`` holds the environments' rewards (0 for a failed trajectory)."""
    pad = tokenizer.pad_token_id
    P = max(len(t.prompt) for t in trajs)
    R = max(max(len(t.tokens) for t in trajs), 1)
    B = len(trajs)
    seq = torch.full((B, P + R), pad, dtype=torch.long)
    am = torch.zeros(B, P + R, dtype=torch.long)
    mask = torch.zeros(B, R)
    blp = torch.zeros(B, R)
    token_rewards = torch.zeros(B, R)
    for b, t in enumerate(trajs):
        seq[b, P - len(t.prompt) : P] = torch.tensor(t.prompt)
        am[b, P - len(t.prompt) : P + len(t.tokens)] = 1
        if t.tokens:
            seq[b, P : P + len(t.tokens)] = torch.tensor(t.tokens)
            keep = not (t.failed and limits.on_failure == "mask")
            mask[b, : len(t.tokens)] = torch.tensor(t.sampled, dtype=torch.float) * keep
            blp[b, : len(t.tokens)] = torch.tensor(t.logprobs) * mask[b, : len(t.tokens)]
        for pos, r in t.turn_rewards:
            token_rewards[b, pos] += r
    batch = RolloutBatch(
        sequences=seq,
        attention_mask=am,
        response_mask=mask,
        behaviour_logprobs=blp,
        prompt_len=P,
        prompts=[tokenizer.decode(t.prompt, skip_special_tokens=False) for t in trajs],
        responses=[tokenizer.decode(t.tokens, skip_special_tokens=True) for t in trajs],
        prompt_ids=list(prompt_ids),
        versions=torch.full((B,), version, dtype=torch.long),
        truncated=torch.tensor([t.ended == "token_cap" for t in trajs]),
        scores=torch.tensor([t.reward for t in trajs], dtype=torch.float),
        generated_tokens=sum(sum(t.sampled) for t in trajs),
        episodes=[_episode(t) for t in trajs],
    )
    if limits.turn_rewards:
        batch.token_rewards = token_rewards
    return batch


def _episode(t: Trajectory) -> dict:
    """What the ledger and the metrics read of one trajectory."""
    return {
        "turns": t.turns,
        "tool_calls": t.tool_calls,
        "tool_errors": t.tool_errors,
        "truncations": t.truncations,
        "ended": t.ended,
        "tokens": len(t.tokens),
        "sampled_tokens": sum(t.sampled),
    }
