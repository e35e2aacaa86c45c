"""Typed configuration: presets, layering, and errors that name the field."""

import pytest

from nanochat.config import ConfigError, available_presets, load_config


def test_presets_named_in_the_spec_exist_and_validate():
    assert {"tiny-cpu", "d12", "d20", "d26"} <= set(available_presets())
    for name in available_presets():
        cfg = load_config(preset=name)
        assert cfg.preset == name
        rows = cfg.train.device_batch_size or cfg.train.workers  # auto (0): whole rows for every worker
        assert cfg.train.total_batch_size % (rows * cfg.train.seq_len) == 0


def test_depth_dial_differs_between_presets():
    depths = {name: load_config(preset=name).model.depth for name in ("d12", "d20", "d26")}
    assert depths == {"d12": 12, "d20": 20, "d26": 26}


def test_set_overrides_parse_yaml_scalars():
    cfg = load_config(overrides=["train.max_steps=7", "model.window_pattern=SSL", "model.qk_norm=false"])
    assert cfg.train.max_steps == 7 and cfg.model.window_pattern == "SSL" and cfg.model.qk_norm is False


def test_config_files_layer_in_order_and_set_wins(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train:\n  max_steps: 10\n  seq_len: 128\n")
    second.write_text("train:\n  max_steps: 20\n")
    cfg = load_config(config_files=[first, second])
    assert (cfg.train.max_steps, cfg.train.seq_len) == (20, 128)
    cfg = load_config(config_files=[first, second], overrides=["train.max_steps=30"])
    assert cfg.train.max_steps == 30


def test_preset_can_be_chosen_from_a_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: d12\n")
    assert load_config(config_files=[f]).model.depth == 12


def test_unknown_key_names_the_field_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.max_step=5"])
    message = str(e.value)
    assert "train.max_step" in message and "max_steps" in message


def test_unknown_section_lists_allowed_sections():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["trian.max_steps=5"])
    assert "trian" in str(e.value) and "train" in str(e.value)


def test_wrong_type_names_the_field_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.depth=deep"])
    assert "model.depth" in str(e.value) and "deep" in str(e.value)


def test_literal_field_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.activation=tanh"])
    assert "model.activation" in str(e.value) and "swiglu" in str(e.value)


def test_batch_divisibility_is_checked():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.total_batch_size=1000"])
    assert "train.total_batch_size" in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        load_config(preset="d99")
    assert "d99" in str(e.value) and "tiny-cpu" in str(e.value)


def test_malformed_set_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["train.max_steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_files=[bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config(config_files=[tmp_path / "missing.yaml"])


def test_a_task_mixture_is_replaced_whole_not_merged():
    cfg = load_config(preset="tiny-cpu", overrides=["mid.tasks={identity: 1}", "mid.max_steps=3"])
    assert cfg.mid.tasks == {"identity": 1.0}
    assert cfg.mid.device_batch_size == load_config(preset="tiny-cpu").mid.device_batch_size  # sections still merge


@pytest.mark.parametrize("override, field", [("model.qk_scale=0", "model.qk_scale"), ("train.recipe=fast", "train.recipe"),
                                             ("mid.weight_decay=-1", "mid.weight_decay")])
def test_recipe_keys_name_the_bad_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert field in str(e.value) and "unknown config key" not in str(e.value)


def test_the_jax_backend_refuses_the_record_recipe():
    with pytest.raises(ConfigError, match="train.recipe='record'"):
        load_config(overrides=["train.backend=jax", "train.recipe=record"])


@pytest.mark.parametrize("key", ["smear", "backout"])
def test_the_jax_backend_refuses_smear_and_backout(key):
    with pytest.raises(ConfigError, match=f"model.{key}=true"):
        load_config(overrides=["train.backend=jax", f"model.{key}=true"])


def test_tiny_cpu_keeps_the_classic_recipe_and_architecture():
    cfg = load_config(preset="tiny-cpu")
    assert (cfg.train.recipe, cfg.model.rope_base, cfg.model.qk_scale) == ("classic", 10000.0, 1.0)
