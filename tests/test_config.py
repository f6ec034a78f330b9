"""nanoft/config.py: the CLI derived from TrainConfig, config files, overrides, validation.

python -m pytest tests/test_config.py -q
"""

import json
from dataclasses import fields, replace

import pytest

from nanoft.config import TrainConfig, build_parser, parse_config, save_config
from nanoft.errors import UserError


def test_defaults_are_the_playbook():
    config = parse_config([])
    assert (config.method, config.lora_r, config.lora_alpha, config.lora_targets) == (
        "lora",
        16,
        32,
        ["q_proj", "v_proj"],
    )
    assert (config.batch_size, config.grad_accum, config.epochs, config.warmup_frac) == (4, 8, 3, 0.03)
    assert (config.eval_every, config.grad_clip, config.optim, config.lr) == (
        50,
        1.0,
        "adamw",
        None,
    )  # lr by method


def test_every_field_is_a_kebab_case_flag_with_help():
    actions = {action.dest: action for action in build_parser()._actions if action.dest != "help"}
    assert set(actions) == {f.name for f in fields(TrainConfig)}
    for name, action in actions.items():
        assert f"--{name.replace('_', '-')}" in action.option_strings
        assert action.help and len(action.help) > 10, name
    required = (
        "model data val_data out method lora_r lora_alpha lora_dropout lora_targets lr batch_size grad_accum"
    )
    required += (
        " seq_len epochs max_steps warmup_frac eval_every save_every seed dtype resume overwrite config quant"
    )
    required += " pack dedup val_frac optim weight_decay grad_clip activation_checkpointing compile keep_last"
    required += " patience merge data_format train_on_everything"
    assert set(required.split()) <= set(actions)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        parse_config(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in text for f in fields(TrainConfig))
    text = " ".join(text.split())  # argparse wraps the help
    # Numbers show as numbers (0 == False and 1.0 == True once made them "off" and "on"); flags as on/off.
    for shown in ("initialisation, dropout (default: 0)", "(0: off) (default: 1.0)", "(default: on)"):
        assert shown in text, shown
    assert "(default: off)" in text and "--seed SEED random seed" in text


def test_flag_types_lists_and_booleans():
    config = parse_config(
        "--lr 3e-4 --lora-r 8 --lora-targets q_proj,k_proj v_proj --no-dedup --pack".split()
    )
    assert config.lr == 3e-4 and config.lora_r == 8
    assert config.lora_targets == ["q_proj", "k_proj", "v_proj"]
    assert config.dedup is False and config.pack is True
    assert parse_config(["--data", "a.jsonl", "b.jsonl"]).data == ["a.jsonl", "b.jsonl"]


def test_toml_sets_fields_and_flags_override(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text(
        'lora_r = 32\nlora-alpha = 64\nlr = 1\nlora_targets = "all-linear"\ndata = ["x.jsonl"]\n'
        "pack = true\nepochs = 2\n".replace("lr = 1", "lr = 0.0001")
    )
    config = parse_config(["--config", str(file), "--lora-r", "8"])
    assert config.lora_r == 8  # the flag wins
    assert (config.lora_alpha, config.lr, config.lora_targets, config.data) == (
        64,
        1e-4,
        ["all-linear"],
        ["x.jsonl"],
    )
    assert config.pack is True and config.epochs == 2.0 and isinstance(config.epochs, float)


def test_saved_config_repeats_the_run_and_resume_reads_it(tmp_path):
    config = parse_config("--lr 5e-4 --lora-r 4 --out runs/x --seq-len 256".split())
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "resume" not in saved and "overwrite" not in saved
    assert parse_config(["--config", str(tmp_path / "config.json")]) == replace(
        config, config=str(tmp_path / "config.json")
    )
    resumed = parse_config(["--out", str(tmp_path), "--resume", "--max-steps", "99"])
    assert (resumed.lr, resumed.lora_r, resumed.seq_len, resumed.max_steps) == (5e-4, 4, 256, 99)
    assert resumed.resume and resumed.out == str(tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--method full --quant nf4", "--method full"),
        ("--quant nf4", "--method qlora"),
        ("--method full --merge", "--merge"),
        ("--batch-size 0", "--batch-size 0"),
        ("--warmup-frac 1.5", "--warmup-frac"),
        ("--lr 2", "--lr 2"),
        ("--resume --overwrite --out x", "pass one of them"),
        ("--resume", "--resume needs --out"),
        ("--dtype fp8", "invalid choice"),
        ("--nonsense", "unrecognized arguments"),
        ("--lora-targets ,", "--lora-targets is empty"),
        ("--epochs nan", "--epochs nan: must be a finite number"),
        ("--epochs inf", "--epochs inf: must be a finite number"),
        ("--weight-decay inf", "--weight-decay inf: must be a finite number"),
        ("--grad-clip nan", "--grad-clip nan: must be a finite number"),
        ("--device tpu", "invalid choice: 'tpu'"),
    ],
)
def test_bad_settings_are_one_line_user_errors(argv, message):
    with pytest.raises(UserError, match=message) as error:
        parse_config(argv.split())
    assert "\n" not in str(error.value)


def test_bad_config_files(tmp_path):
    file = tmp_path / "run.toml"
    for text, message in [
        ("lora_rank = 8", "unknown setting 'lora_rank'"),
        ("lora_r = 'big'", "'lora_r' must be int"),
        ("lr = ", "not valid TOML"),
        ("method = 'magic'", "--method magic"),
    ]:
        file.write_text(text)
        with pytest.raises(UserError, match=message):
            parse_config(["--config", str(file)])
    with pytest.raises(UserError, match="not found"):
        parse_config(["--config", str(tmp_path / "missing.toml")])
