"""MoBACore's settings: attn.block_size and attn.topk are checked where the layer is built, so a
bad value is one ValueError naming the key (not a ZeroDivisionError in the FLOP count or gate)."""
import pytest

from attn.moba import MoBACore


@pytest.mark.parametrize("options,message", [
    ({"block_size": 0}, "attn.block_size=0 must be an integer >= 1"),
    ({"block_size": -8}, "attn.block_size=-8 must be an integer >= 1"),
    ({"block_size": 2.5}, "attn.block_size=2.5 must be an integer >= 1"),
    ({"block_size": True}, "attn.block_size=True must be an integer >= 1"),
    ({"topk": 0}, "attn.topk=0 must be an integer >= 1"),
    ({"topk": "3"}, "attn.topk='3' must be an integer >= 1"),
])
def test_bad_block_size_and_topk_name_the_key(options, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "$"):
        MoBACore(32, 4, 2, **options)


def test_smallest_settings_are_accepted():
    core = MoBACore(32, 4, 2, block_size=1, topk=1)
    assert (core.block_size, core.topk) == (1, 1)
    assert core.attention_flops_per_token(8) > 0
