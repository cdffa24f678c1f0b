"""Config machinery over a small two-level schema defined here, not the real one, so these tests pin the
machinery (parsing, overrides, messages) and survive schema changes."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from reopold.config.loader import (
    ConfigError,
    add_arguments,
    check_schema,
    config_help,
    from_dict,
    load_config,
    option,
    parse_overrides,
    save_config,
    to_dict,
)


@dataclass
class Algo:
    name: Literal["reopold", "gkd"] = option("reopold", "objective to optimise")
    lam: float = option(0.3, "lam: mixture weight of the reward floor")
    beta: float = option(0.1, "beta: coefficient of the KL term")

    def __post_init__(self):
        if not 0 < self.lam < 1:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}; set algo.lam to e.g. 0.3")


@dataclass
class Train:
    steps: int = option(100, "optimizer steps")
    lr: float = option(1e-5, "peak learning rate")
    tags: list[str] = option([], "free-form labels for the run")
    milestones: list[int] = option([10, 20], "steps at which to decay the learning rate")
    weights: list[float] = option([1.0], "per-task loss weights")
    compile: bool = option(False, "wrap the model in torch.compile")
    precision: str = option("bf16", "parameter dtype", choices=("bf16", "fp32"))
    grad_clip: float = option(1.0, "clip the gradient norm to this; 100% of it is kept below")


@dataclass
class Top:
    algo: Algo = option(Algo, "which objective and its weights")
    train: Train = option(Train, "optimisation schedule")
    seed: int = option(0, "random seed")
    out: str | None = option(None, "output directory; null writes nothing")


ALL_KEYS = ["algo", "algo.name", "algo.lam", "algo.beta", "train", "train.steps", "train.lr", "train.tags",
            "train.milestones", "train.weights", "train.compile", "train.precision", "train.grad_clip",
            "seed", "out"]


def test_to_dict_is_plain_nested_and_round_trips():
    cfg = Top(algo=Algo(name="gkd", lam=0.5), train=Train(tags=["a"]), seed=3, out="runs/x")
    data = to_dict(cfg)
    assert data == {
        "algo": {"name": "gkd", "lam": 0.5, "beta": 0.1},
        "train": {"steps": 100, "lr": 1e-5, "tags": ["a"], "milestones": [10, 20], "weights": [1.0],
                  "compile": False, "precision": "bf16", "grad_clip": 1.0},
        "seed": 3,
        "out": "runs/x",
    }
    assert from_dict(Top, data) == cfg
    data["train"]["tags"].append("b")  # to_dict copies lists, so editing the dict leaves the config alone
    assert cfg.train.tags == ["a"]


def test_yaml_round_trip_keeps_awkward_strings_and_writes_help(tmp_path):
    # Each of these tags would load as a non-string (or break the file) if written unquoted.
    tags = ["yes", "3e-5", "a: b", "# not a comment", "", "null", "2024", "it's", "two\n  lines", " é∂", "[x]"]
    cfg = Top(algo=Algo(lam=0.25), train=Train(tags=tags, lr=3e-5, steps=7), out="0123")
    path = tmp_path / "sub" / "run.yaml"
    save_config(cfg, path)
    assert load_config(Top, path) == cfg
    text = path.read_text()
    assert "algo:\n  # objective to optimise\n  name: reopold\n  # lam: mixture weight" in text
    assert "  lam: 0.25\n" in text
    assert "  milestones: [10, 20]\n" in text
    assert text.index("algo:") < text.index("train:") < text.index("seed:")  # declaration order


def test_yaml_reads_exponent_without_dot_as_float(tmp_path):
    # PyYAML alone reads `3e-5` as the string '3e-5'.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-5\n  steps: 1e4\n")
    cfg = load_config(Top, path)
    assert cfg.train.lr == 3e-5
    assert cfg.train.steps == 10000 and isinstance(cfg.train.steps, int)


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(Top, path) == Top()


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("algo.lam=0.5", lambda c: c.algo.lam, 0.5),
        ("algo.beta=1", lambda c: c.algo.beta, 1.0),
        ("algo.name=gkd", lambda c: c.algo.name, "gkd"),
        ("train.lr=3e-5", lambda c: c.train.lr, 3e-5),
        ("train.steps=7", lambda c: c.train.steps, 7),
        ("train.compile=true", lambda c: c.train.compile, True),
        ("train.tags=[a, b]", lambda c: c.train.tags, ["a", "b"]),
        ("train.milestones=[]", lambda c: c.train.milestones, []),
        ("train.weights=[1, 0.5]", lambda c: c.train.weights, [1.0, 0.5]),
        ("train.precision=fp32", lambda c: c.train.precision, "fp32"),
        ("seed=-3", lambda c: c.seed, -3),
        ("out=runs/a=b", lambda c: c.out, "runs/a=b"),  # only the first '=' splits
        ("out=null", lambda c: c.out, None),
        ("out=2024", lambda c: c.out, "2024"),  # a str field keeps digits as text
        ("algo={lam: 0.7}", lambda c: (c.algo.lam, c.algo.name), (0.7, "reopold")),  # a whole section
    ],
)
def test_override_of_each_type(override, get, expected):
    value = get(load_config(Top, overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_command_line_forms_and_dashes():
    cfg = load_config(Top, overrides=["--algo.lam", "0.5", "--train.steps=9", "seed=4", "--train.grad-clip", "-2"])
    assert (cfg.algo.lam, cfg.train.steps, cfg.seed, cfg.train.grad_clip) == (0.5, 9, 4, -2.0)
    assert load_config(Top, overrides="seed=5").seed == 5  # one string is one override, not characters
    assert parse_overrides(["--a.b", "x y", "--c=1", "d=", "--e-f=[1]"]) == [
        ("a.b", "x y"), ("c", "1"), ("d", ""), ("e_f", "[1]")]


def test_overrides_apply_over_file_in_order_and_validation_runs_after_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  lam: 1.5\n  beta: 0.2\ntrain:\n  steps: 5\n")
    # lam=1.5 in the file is invalid on its own; the override repairs it before __post_init__ runs.
    cfg = load_config(Top, path, ["algo.lam=0.4", "train.steps=6", "train.steps=8"])
    assert (cfg.algo.lam, cfg.algo.beta, cfg.train.steps) == (0.4, 0.2, 8)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"algo": {"lamda": 0.5}}, "unknown key 'algo.lamda'; did you mean 'algo.lam'?"),
        ({"sed": 1}, "unknown key 'sed'; did you mean 'seed'?"),
        ({"trian": {"steps": 1}}, "unknown key 'trian'; did you mean 'train'?"),
        ({"lam": 0.5}, "unknown key 'lam'; did you mean 'algo.lam'?"),  # key put outside its section
        ({"train": {"beta": 0.5}}, "unknown key 'train.beta'; did you mean 'algo.beta'?"),
        ({"algo": {"xyz": 1}}, "unknown key 'algo.xyz'; valid keys here: algo.name, algo.lam, algo.beta"),
        ({"qqqq": 1}, "unknown key 'qqqq'; valid keys here: algo, train, seed, out"),
    ],
)
def test_unknown_key_names_the_nearest(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Top, data)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--algo.lamda", "0.5"], "unknown key 'algo.lamda'; did you mean 'algo.lam'?"),
        (["trian.steps=5"], "unknown key 'trian.steps'; did you mean 'train.steps'?"),
        (["algo.xyz=1"], "unknown key 'algo.xyz'; valid keys here: algo.name, algo.lam, algo.beta"),
        (["nope.steps=1"], "unknown key 'nope.steps'; did you mean 'train.steps'?"),
        (["seed.x=1"], "unknown key 'seed.x'; valid keys here: algo, train, seed, out"),
    ],
)
def test_unknown_override_names_the_nearest(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(Top, overrides=overrides)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"steps": "ten"}}, "train.steps: expected int, got 'ten' (str)"),
        ({"train": {"steps": 2.5}}, "train.steps: expected int, got 2.5 (float)"),
        ({"train": {"steps": True}}, "train.steps: expected int, got True (bool)"),
        ({"algo": {"lam": "high"}}, "algo.lam: expected float, got 'high' (str)"),
        ({"train": {"compile": 1}}, "train.compile: expected bool, got 1 (int)"),
        ({"train": {"tags": "a"}}, "train.tags: expected list[str], got 'a' (str)"),
        ({"train": {"tags": ["a", 1]}}, "train.tags[1]: expected str, got 1 (int)"),
        ({"train": {"weights": [1, "x"]}}, "train.weights[1]: expected float, got 'x' (str)"),
        ({"out": 5}, "out: expected str | None, got 5 (int)"),
        ({"algo": 3}, "algo: expected a mapping of keys to values, got 3"),
        ({"algo": {"name": "ppo"}}, "algo.name: expected one of 'reopold', 'gkd', got 'ppo' (str)"),
        ({"train": {"precision": "fp8"}}, "train.precision: expected one of 'bf16', 'fp32', got 'fp8'"),
    ],
)
def test_wrong_type_or_choice_names_key_value_and_expected(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Top, data)
    assert str(err.value) == message


def test_wrong_type_from_command_line():
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got 'abc' \(str\)$"):
        load_config(Top, overrides=["--train.steps", "abc"])
    with pytest.raises(ConfigError,
                       match=r"^train\.precision: expected one of 'bf16', 'fp32', got 'fp16'; did you mean 'bf16'\?$"):
        load_config(Top, overrides=["train.precision=fp16"])


def test_post_init_error_propagates_with_section_and_advice():
    with pytest.raises(ConfigError) as err:
        from_dict(Top, {"algo": {"lam": 1.5}})
    assert str(err.value) == "algo: lam must be in (0, 1), got 1.5; set algo.lam to e.g. 0.3"
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=r"algo: lam must be in \(0, 1\), got 0.0; set algo.lam"):
        load_config(Top, overrides=["algo.lam=0"])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(Top, path)
    assert str(err.value) == f"config file '{path}' does not exist"


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Top, path)
    assert str(err.value) == f"config file '{path}' must hold a mapping of keys to values at the top level, got {kind}"


def test_invalid_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(Top, path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algo.lam"], "option '--algo.lam' needs a value, e.g. --algo.lam VALUE"),
        (["--algo.lam", "--seed", "1"], "option '--algo.lam' needs a value, e.g. --algo.lam VALUE"),
        (["foo"], "override 'foo' must look like key=value or --key value"),
        (["=3"], "override '=3' must look like key=value or --key value"),
    ],
)
def test_malformed_overrides(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_overrides(argv)
    assert str(err.value) == message


def test_config_help_lists_every_key_with_type_default_and_help():
    text = config_help(Top)
    for key in ALL_KEYS:
        assert f"{key}:" in text or f"[{key}]" in text
    assert "[algo] which objective and its weights\n" in text
    assert "  algo.lam: float = 0.3\n      lam: mixture weight of the reward floor\n" in text
    assert "  algo.name: one of 'reopold', 'gkd' = reopold\n" in text
    assert "  train.tags: list[str] = []\n      free-form labels for the run\n" in text
    assert "  out: str | None = null\n      output directory; null writes nothing\n" in text
    # Top-level keys come first, then each section in declaration order.
    assert text.index("seed:") < text.index("[algo]") < text.index("[train]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reopold train", allow_abbrev=False)
    parser.add_argument("--config", default=None)
    add_arguments(parser, Top)
    return parser


def test_argparse_help_lists_every_key(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # keep argparse from wrapping the lines checked below
    text = _parser().format_help()
    for key in ALL_KEYS:
        if key not in ("algo", "train"):
            assert f"--{key} " in text
    assert "--algo.lam FLOAT" in text and "lam: mixture weight of the reward floor (default: 0.3)" in text
    assert "--algo.name {reopold,gkd}" in text
    assert "--train.precision {bf16,fp32}" in text
    assert "--out STR|NONE" in text and "(default: null)" in text
    assert "100% of it is kept below (default: 1.0)" in text  # '%' in help must not break argparse
    assert "algo keys:\n  which objective and its weights" in text


def test_argparse_collects_known_keys_and_passes_unknown_ones_through(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 9\n")
    args, rest = _parser().parse_known_args(
        ["--config", str(path), "--algo.lam", "0.5", "--train.tags=[x]", "--train.stpes", "3"])
    assert args.overrides == ["algo.lam=0.5", "train.tags=[x]"]
    assert rest == ["--train.stpes", "3"]
    with pytest.raises(ConfigError, match=r"^unknown key 'train\.stpes'; did you mean 'train\.steps'\?$"):
        load_config(Top, args.config, [*args.overrides, *rest])
    cfg = load_config(Top, args.config, args.overrides)
    assert (cfg.seed, cfg.algo.lam, cfg.train.tags) == (9, 0.5, ["x"])
    assert _parser().parse_known_args([])[0].overrides == []


def test_defaults_are_not_shared_between_instances():
    a, b = Top(), Top()
    a.train.tags.append("x")
    a.train.milestones[0] = 99
    a.algo.lam = 0.9
    assert (b.train.tags, b.train.milestones, b.algo.lam) == ([], [10, 20], 0.3)
    assert Top().train.tags == [] and Train().milestones == [10, 20]


def test_option_with_dataclass_instance_default_is_copied():
    @dataclass
    class Holder:
        algo: Algo = option(Algo(lam=0.6), "preset objective")

    first, second = Holder(), Holder()
    first.algo.lam = 0.2
    assert second.algo.lam == 0.6


def test_check_schema_accepts_a_good_schema_and_lists_every_problem():
    assert check_schema(Top) is None

    @dataclass
    class Leaf:
        x: int = option(1, "x")

    @dataclass
    class Mid:
        leaf: Leaf = option(Leaf, "too deep")

    @dataclass
    class Bad:
        mid: Mid = option(Mid, "middle")
        no_help: int = dataclasses.field(default=1)
        wrong: int = option("one", "a default of the wrong type")
        pick: str = option("c", "a default outside its choices", choices=("a", "b"))

    globals().update(Leaf=Leaf, Mid=Mid)  # string annotations resolve against module globals
    try:
        with pytest.raises(TypeError) as err:
            check_schema(Bad)
    finally:
        del globals()["Leaf"], globals()["Mid"]
    assert str(err.value) == (
        "Bad breaks the config rules:\n"
        "  mid.leaf.x: nested more than two levels deep; flatten it into its section\n"
        "  no_help: no help text; declare it with option(default, help)\n"
        "  wrong: default does not fit: wrong: expected int, got 'one' (str)\n"
        "  pick: default does not fit: pick: expected one of 'a', 'b', got 'c'")


def test_missing_required_key():
    @dataclass
    class Needs:
        model: str = dataclasses.field(metadata={"help": "model name"})

    with pytest.raises(ConfigError, match=r"^missing required key 'model'$"):
        from_dict(Needs, {})
    assert from_dict(Needs, {"model": "tiny"}).model == "tiny"
