"""Multi-turn episodes: exact token ids, the loss mask, chat-template rendering, and environments that fail."""

from __future__ import annotations

import time

import pytest
import torch

from reopold import core
from reopold.environments import Observation
from reopold.environments.tools import ToolEnvironment
from reopold.rollout.batch import Rollout, completion_mask_from
from reopold.rollout.episodes import EpisodeEngine, EpisodeSetup
from reopold.rollout.turns import ChatTemplateFormat, PlainFormat, TemplateRewritesHistory
from reopold.tasks import build_tokenizer
from reopold.tasks.arithmetic import Problem

ALPHABET = "0123456789*+=;:[](){}cal"


def calc(expression: str) -> str:
    """Multiply or add two integers.

    Args:
        expression: "a*b" or "a+b"
    """
    a, op, b = expression.partition("*") if "*" in expression else expression.partition("+")
    if not (a.isdigit() and b.isdigit()):
        raise ValueError(f"cannot compute {expression!r}")
    return str(int(a) * int(b) if op == "*" else int(a) + int(b))


class ScriptedEngine:
    """A RolloutEngine whose turns are fixed texts, looked up by the episode's problem and turn number (the number
    of earlier calls that had the problem: a problem's samples advance together). Records every call's batch size."""

    def __init__(self, tokenizer, script: dict[str, list[str]], *, cut: set[tuple[str, int]] = frozenset()):
        self.tokenizer, self.script, self.cut = tokenizer, script, cut
        self.calls: list[int] = []
        self.turn_of: dict[str, int] = {}

    def generate(self, prompt_ids, problems, *, num_samples=1) -> Rollout:
        self.calls.append(len(prompt_ids))
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        turns, now = [], {}
        for prompt in dict.fromkeys(p.prompt for p in problems):
            now[prompt] = self.turn_of.get(prompt, 0)
            self.turn_of[prompt] = now[prompt] + 1
        for problem in problems:
            turn = now[problem.prompt]
            text = self.script[problem.prompt][turn]
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            turns.append(encoded if (problem.prompt, turn) in self.cut else encoded + [eos])
        width, length = max(map(len, prompt_ids)), max(map(len, turns))
        completion = torch.tensor([t + [pad] * (length - len(t)) for t in turns])
        lengths = torch.tensor([len(t) for t in turns])
        mask = completion_mask_from(completion, eos) & (torch.arange(length) < lengths[:, None])
        prompt = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        return Rollout(torch.cat([prompt, completion], 1), torch.ones(len(turns), width + length, dtype=torch.long),
                       mask, width, list(problems), [])

    def sync_weights(self, model):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ALPHABET)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_for(tokenizer, script, *, max_turns=3, cut=frozenset(), environment=None, **kwargs):
    turn_engine = ScriptedEngine(tokenizer, script, cut=cut)
    make = environment or (lambda: ToolEnvironment([calc], format_error=lambda message: ""))
    engine = EpisodeEngine(turn_engine, tokenizer, make, PlainFormat(tokenizer), max_turns=max_turns, **kwargs)
    return engine, turn_engine


SCRIPT = {
    "47*86*29=": ["[calc(47*86)]", "[calc(4042*29)]", ":117218"],
    "11*12*13=": [":1716"],  # answers without the tool: one turn
    "10*10*10=": ["[calc(10*10)]", "[calc(100*10)]", "[calc(1000*1)]"],  # still calling at the last turn
}
PROBLEMS = [Problem("47*86*29=", "117218"), Problem("11*12*13=", "1716"), Problem("10*10*10=", "1000")]


def test_ids_are_the_sampled_turns_and_rendered_observations(tokenizer):
    engine, _ = engine_for(tokenizer, SCRIPT)
    rollout = engine.generate([encode(tokenizer, p.prompt) for p in PROBLEMS], PROBLEMS)
    eos = tokenizer.eos_token_id
    # Row 0: three turns, two observations; the ids equal one rendering of the whole transcript.
    expected = (encode(tokenizer, "[calc(47*86)]") + [eos] + encode(tokenizer, "{4042}")
                + encode(tokenizer, "[calc(4042*29)]") + [eos] + encode(tokenizer, "{117218}")
                + encode(tokenizer, ":117218") + [eos])  # fmt: skip
    row = rollout.input_ids[0, rollout.prompt_length :]
    assert row[: len(expected)].tolist() == expected
    assert rollout.input_ids[0, : rollout.prompt_length].tolist()[-9:] == encode(tokenizer, "47*86*29=")
    # The loss mask is 1 exactly on the student's tokens: not on "{4042}" or "{117218}".
    sampled = [True] * 14 + [False] * 6 + [True] * 16 + [False] * 8 + [True] * 8
    assert rollout.completion_mask[0, : len(expected)].tolist() == sampled
    assert not rollout.completion_mask[0, len(expected) :].any()
    assert rollout.attention_mask[0, rollout.prompt_length :].sum() == len(expected)
    assert rollout.texts == [":117218", ":1716", "[calc(1000*1)]"]
    from reopold.evaluation.heldout import transcripts

    assert transcripts(rollout, tokenizer)[0] == "[calc(47*86)]{4042}[calc(4042*29)]{117218}:117218"
    # Row 1 answered in one turn: its response is that turn only.
    assert rollout.attention_mask[1, rollout.prompt_length :].sum() == len(":1716") + 1
    assert rollout.episode_stats["turns_mean"] == pytest.approx(7 / 3)
    assert rollout.episode_stats["tool_calls_mean"] == pytest.approx(5 / 3)


def test_finished_episodes_stop_using_compute(tokenizer):
    engine, turn_engine = engine_for(tokenizer, SCRIPT)
    engine.generate([encode(tokenizer, p.prompt) for p in PROBLEMS], PROBLEMS, num_samples=2)
    assert turn_engine.calls == [6, 4, 4]  # the two episodes of "11*12*13=" finish after their first turn


def test_select_keeps_observations_between_turns(tokenizer):
    engine, _ = engine_for(tokenizer, SCRIPT)
    rollout = engine.generate([encode(tokenizer, p.prompt) for p in PROBLEMS], PROBLEMS)
    sub = rollout.select([0])
    assert sub.input_ids.shape[1] == rollout.prompt_length + 52  # 38 sampled tokens + 14 observation tokens
    assert torch.equal(sub.completion_mask[0], rollout.completion_mask[0, :52])


def test_a_turn_cut_by_the_length_limit_is_closed_outside_the_loss_mask(tokenizer):
    engine, _ = engine_for(tokenizer, SCRIPT, cut={("47*86*29=", 0)})
    rollout = engine.generate([encode(tokenizer, PROBLEMS[0].prompt)], PROBLEMS[:1])
    response = rollout.input_ids[0, rollout.prompt_length :].tolist()
    turn = encode(tokenizer, "[calc(47*86)]")
    assert response[: len(turn) + 1] == turn + [tokenizer.eos_token_id]  # closed with EOS ...
    assert rollout.completion_mask[0, : len(turn) + 1].tolist() == [True] * len(turn) + [False]  # ... not sampled
    assert rollout.episode_stats["cut_turn_frac"] == 1.0


def test_bad_tool_calls_become_counted_error_observations(tokenizer):
    script = {"47*86*29=": ["[calc(47)]", "[cal(1)]", ":0"]}  # no operator; an unknown tool
    engine, _ = engine_for(tokenizer, script)
    rollout = engine.generate([encode(tokenizer, "47*86*29=")], [Problem("47*86*29=", "117218")])
    observations = rollout.input_ids[0, rollout.prompt_length :][~rollout.completion_mask[0]]
    assert tokenizer.decode(observations, skip_special_tokens=True) == "{}{}"  # format_error: the empty result
    assert rollout.episode_stats["tool_error_frac"] == 1.0
    assert rollout.episode_stats["turns_mean"] == 3


def test_tool_adapter_messages():
    env = ToolEnvironment([calc], timeout=0.5)
    env.reset(Problem("1*2*3=", "6"))
    assert env.step("[calc(6*7)]").messages == [{"role": "tool", "name": "calc", "content": "42"}]
    unknown = env.step("[zoom(6)]")
    assert unknown.tool_errors == 1 and "unknown tool 'zoom'" in unknown.messages[0]["content"]
    bad = env.step("[calc(6/7)]")
    assert bad.tool_errors == 1 and bad.messages[0]["content"].startswith("error: cannot compute")
    json_env = ToolEnvironment([calc], call_format="json")
    good = json_env.step('<tool_call>{"name": "calc", "arguments": {"expression": "2+2"}}</tool_call>')
    assert good.messages[0]["content"] == "4" and good.tool_errors == 0
    wrong = json_env.step('<tool_call>{"name": "calc", "arguments": {"expr": "2+2"}}</tool_call>')
    assert wrong.tool_errors == 1 and "has no argument 'expr'" in wrong.messages[0]["content"]
    broken = json_env.step("<tool_call>{not json</tool_call>")
    assert broken.tool_errors == 1 and env.step("no call here").done


def test_a_tool_that_hangs_hits_its_timeout():
    def slow(seconds: int) -> str:
        time.sleep(seconds)
        return "done"

    env = ToolEnvironment([slow], timeout=0.2)
    started = time.perf_counter()
    observation = env.step("[slow(5)]")
    assert time.perf_counter() - started < 2
    assert observation.tool_errors == 1 and "timed out after 0.2s" in observation.messages[0]["content"]


class Raising:
    def reset(self, problem):
        return [{"role": "user", "content": problem.prompt}]

    def step(self, reply):
        raise RuntimeError("the simulator crashed")


class Garbage(Raising):
    def step(self, reply):
        return {"done": True}


class Hanging(Raising):
    def step(self, reply):
        time.sleep(5)


@pytest.mark.parametrize("environment", [Raising, Garbage, Hanging])
def test_a_failing_environment_stops_its_episode_not_the_run(tokenizer, environment):
    engine, _ = engine_for(tokenizer, SCRIPT, environment=environment, step_timeout=0.3)
    with pytest.warns(UserWarning, match="an episode stopped"):
        rollout = engine.generate([encode(tokenizer, p.prompt) for p in PROBLEMS], PROBLEMS)
    assert rollout.episode_stats["env_error_frac"] == 1.0
    assert rollout.episode_stats["turns_mean"] == 1  # every episode stopped after its first turn
    assert rollout.completion_mask.any(-1).all()


def test_observation_tokens_never_enter_the_loss_or_the_threshold():
    """Mask-0 positions (observations) get exactly zero gradient, and changing the teacher's or the entropy's values
    there changes neither the loss nor tau_beta."""
    torch.manual_seed(0)
    B, T = 3, 12
    mask = torch.rand(B, T) > 0.4
    student = torch.randn(B, T, requires_grad=True)
    old, teacher, entropy = student.detach() + 0.1 * torch.randn(B, T), torch.randn(B, T) - 1, torch.rand(B, T) * 3

    def loss_of(teacher, entropy, student):
        loss, metrics = core.reopold_loss(student, old, teacher, entropy, mask, phase="refinement", lam=0.3, beta=0.5)
        return loss, metrics

    loss, metrics = loss_of(teacher, entropy, student)
    loss.backward()
    assert torch.all(student.grad[~mask] == 0)
    assert student.grad[mask].abs().sum() > 0
    noise = torch.where(mask, 0.0, 50 * torch.randn(B, T))
    loss2, metrics2 = loss_of(teacher + noise, entropy + noise.abs(), student)
    assert torch.equal(loss, loss2)
    assert metrics["kept_frac"] == metrics2["kept_frac"]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>;{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
# Like Qwen3's: the reasoning of every assistant turn but the last is dropped (it rewrites history).
DROPS_THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{% if m['role'] == 'assistant' and not loop.last "
                  "%}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>;"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")


def chat_tokenizer(template: str):
    tok = build_tokenizer("0123456789*+=;:[](){}<>/abcdefghijklmnopqrstuvwxyzWHI?.,'\"_")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    return tok


def test_chat_template_observations_are_the_difference_of_two_renderings():
    tok = chat_tokenizer(CHATML)
    fmt = ChatTemplateFormat(tok)
    problem = Problem("2*3=", "6")
    script = {"2*3=": ["[calc(2*3)]", ":6"]}
    env = lambda: ToolEnvironment([calc], first_messages=lambda p: [{"role": "user", "content": p.prompt}])
    turn_engine = ScriptedEngine(tok, script)
    engine = EpisodeEngine(turn_engine, tok, env, fmt, max_turns=3)
    rollout = engine.generate([[0]], [problem])
    ids = rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist()
    conversation = [{"role": "user", "content": "2*3="}, {"role": "assistant", "content": "[calc(2*3)]"},
                    {"role": "tool", "name": "calc", "content": "6"}, {"role": "assistant", "content": ":6"}]
    single = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert ids == single[: len(ids)]  # token ids after 2 turns == one rendering of the whole conversation
    assert len(single) - len(ids) == 1  # the template's ";" after the last <|im_end|>, which nobody samples


def test_a_template_that_rewrites_history_is_refused():
    with pytest.raises(TemplateRewritesHistory, match="rewrites earlier turns"):
        ChatTemplateFormat(chat_tokenizer(DROPS_THINKING))


def test_episode_setup_wraps_any_engine(tokenizer):
    setup = EpisodeSetup(lambda: ToolEnvironment([calc]), PlainFormat(tokenizer), max_turns=2)
    engine = setup.wrap(ScriptedEngine(tokenizer, SCRIPT), tokenizer)
    rollout = engine.generate([encode(tokenizer, PROBLEMS[0].prompt)], PROBLEMS[:1])
    assert rollout.episode_stats["turns_mean"] == 2 and rollout.texts == ["[calc(4042*29)]"]


def test_environment_rewards_reach_the_rollout(tokenizer):
    class Graded(Raising):
        def step(self, reply):
            return Observation(done=True, reward=1.0 if reply == ":1716" else 0.25)

    engine, _ = engine_for(tokenizer, SCRIPT, environment=Graded)
    rollout = engine.generate([encode(tokenizer, p.prompt) for p in PROBLEMS], PROBLEMS)
    assert rollout.rewards.tolist() == [0.25, 1.0, 0.25]
    assert rollout.select([1, 2]).rewards.tolist() == [1.0, 0.25]
