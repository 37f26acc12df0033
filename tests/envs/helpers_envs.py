"""Environments for the multi-turn tests: scripted turns, and the misbehaving kinds each guard
is for (a step that hangs, one that raises, tool calls for ever, an observation too long)."""

from __future__ import annotations

import time

from rlhf_dist.envs.base import Env


class Echo(Env):
    """Answers each turn with a tool message naming the turn, done after ``turns`` turns;
    reward 1 per turn (the trajectory's reward is their sum)."""

    turns = 3

    def reset(self, row):
        self.n = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.n += 1
        done = self.n >= self.turns
        obs = None if done else [{"role": "tool", "content": "red cat " * self.n}]
        return obs, 1.0, done, {"tool_calls": 1}


class Hangs(Echo):
    def step(self, text):
        time.sleep(30)
        return None, 1.0, True, {}


class Raises(Echo):
    def step(self, text):
        raise RuntimeError("the tool broke")


class CallsForever(Echo):
    """Never done: every turn is an (invalid) tool call."""

    def step(self, text):
        return [{"role": "tool", "content": "error"}], 0.0, False, {"invalid": True}


class Talkative(Echo):
    def step(self, text):
        self.n += 1
        long = " ".join(["red"] * 500)
        return [{"role": "tool", "content": long}], 0.5, self.n >= 2, {}
