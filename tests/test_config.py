"""The config system: inheritance, overrides, type checks and error messages."""
import pytest
import yaml

from beitfast.config import CONFIG_DIR, Config, ConfigError, DVAEConfig, cli_config, load_config


def test_base_matches_the_paper():
    c = load_config("base.yaml")
    assert (c.model.size, c.model.img_size, c.model.patch_size, c.model.vocab_size) == ("base", 224, 16, 8192)
    assert (c.mask.num_patches, c.mask.min_patches, c.mask.min_aspect) == (75, 16, 0.3)
    assert c.optim.lr == 1.5e-3 and c.optim.min_lr == 1e-5 and c.optim.eps == 1e-8
    assert c.optim.betas == (0.9, 0.999) and c.optim.weight_decay == 0.05 and c.optim.clip_grad == 3.0
    assert (c.train.epochs, c.train.global_batch, c.optim.warmup_epochs) == (800, 2048, 10.0)
    assert c.model.drop_path == 0.1 and c.data.crop_scale == (0.08, 1.0)


def test_large_inherits_and_overrides():
    c = load_config("large")
    assert c.model.size == "large" and c.model.layer_scale_init == 1e-5 and c.optim.clip_grad == 1.0
    assert c.optim.lr == 1.5e-3 and c.mask.num_patches == 75  # inherited from base


def test_every_config_file_loads():
    from beitfast.config import FinetuneConfig, SegConfig

    schemas = {"dvae": DVAEConfig, "finetune": FinetuneConfig, "seg": SegConfig}
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        schema = schemas.get(p.name.split("_")[0].split(".")[0], Config)
        assert isinstance(load_config(p, schema=schema), schema), p


def test_overrides_all_spellings():
    c = cli_config(["--cfg", "tiny.yaml", "optim.lr=2e-4", "--train.epochs=5", "--mask.exact", "true",
                    "data.mean=[0.5,0.5,0.5]", "optim.clip_grad=null"])
    assert c.optim.lr == 2e-4 and c.train.epochs == 5 and c.mask.exact is True
    assert c.data.mean == (0.5, 0.5, 0.5) and c.optim.clip_grad is None
    assert c.model.size == "tiny"


def test_int_promoted_to_float_and_sci_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0\n")
    c = load_config(p)
    assert c.optim.lr == 1e-3 and isinstance(c.optim.weight_decay, float)


@pytest.mark.parametrize("text,words", [
    ("optim:\n  lrr: 1.0\n", ["unknown key 'optim.lrr'", "c.yaml"]),
    ("nosuch:\n  a: 1\n", ["unknown key 'nosuch'"]),
    ("train:\n  epochs: ten\n", ["'train.epochs'", "an integer", "c.yaml"]),
    ("train:\n  epochs: 1.5\n", ["'train.epochs'", "an integer"]),
    ("mask:\n  exact: 1\n", ["'mask.exact'", "true or false"]),
    ("model:\n  size: huge\n", ["'model.size'", "'base'"]),
    ("optim:\n  betas: [0.9]\n", ["'optim.betas'", "2 values"]),
    ("model: 3\n", ["'model' must be a section"]),
    ("base: nonexistent_base.yaml\n", ["not found", "nonexistent_base.yaml"]),
    ("- a\n- b\n", ["mapping"]),
    ("model:\n  img_size: 100\n", ["img_size", "multiple"]),
])
def test_errors_name_key_and_file(tmp_path, text, words):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_error_from_base_names_the_base_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("optim:\n  lr: fast\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml.*optim\.lr"):
        load_config(tmp_path / "child.yaml")


def test_cli_error_names_command_line():
    with pytest.raises(ConfigError, match=r"command line.*'optim\.lrr'"):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="command line"):
        load_config("tiny", ["justaword"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dump_round_trips(tmp_path):
    c = load_config("tiny", ["optim.lr=3e-4"])
    c.dump(tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == c
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 3e-4
