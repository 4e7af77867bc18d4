"""Fp8Config: what it reads from a checkpoint's quantization_config and refuses."""

import pytest

from ember.layers.quantization.fp8 import Fp8Config


def test_online_and_checkpoint_configs():
    online = Fp8Config.from_config({})
    assert not online.is_checkpoint_fp8_serialized and not online.raw_checkpoint
    assert online.activation_scheme == "dynamic" and online.weight_block_size is None
    ds = Fp8Config.from_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]})
    assert ds.raw_checkpoint and ds.weight_block_size == (128, 128)
    static = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "static",
                                    "ignored_layers": ["lm_head", "model.layers.0.mlp.gate"]})
    assert static.activation_scheme == "static" and static.weight_block_size is None
    assert static.is_ignored("lm_head") and static.is_ignored("model.layers.0.mlp.gate")
    assert not static.is_ignored("model.layers.0.mlp.gate_up_proj")


@pytest.mark.parametrize("config, field", [
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt"),
    ({"quant_method": "fp8", "activation_scheme": "per_token"}, "activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "weight_block_size"),
])
def test_bad_configs_name_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        Fp8Config.from_config(config)
