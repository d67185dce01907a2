import pytest
import torch

from stitching.models.formats import (FORMATS, FormatError, channels_after, convert, from_image, is_token,
                                      prefix_tokens, spatial_shape, to_image, token_format)


def test_round_trips_without_class_token_are_exact():
    x = torch.randn(2, 5, 3, 4)
    for fmt in ("image", "bhwc", "tokens"):
        y = from_image(x, fmt)
        assert torch.equal(to_image(y, fmt, grid=(3, 4)), x)
        for other in ("image", "bhwc", "tokens"):
            z = convert(y, fmt, other, grid=(3, 4))
            assert torch.equal(convert(z, other, fmt, grid=(3, 4)), y)


def test_layouts_are_row_major():
    x = torch.arange(2 * 3 * 4).float().reshape(1, 2, 3, 4)
    assert torch.equal(from_image(x, "bhwc")[0, 1, 2], x[0, :, 1, 2])
    tokens = from_image(x, "tokens")
    assert tokens.shape == (1, 12, 2)
    assert torch.equal(tokens[0, 1 * 4 + 2], x[0, :, 1, 2])


def test_into_tokens_cls_class_token_is_mean_of_tokens():
    x = torch.randn(2, 6, 4, 4)
    t = convert(x, "image", "tokens_cls")
    assert t.shape == (2, 17, 6)
    torch.testing.assert_close(t[:, 0], t[:, 1:].mean(dim=1))
    torch.testing.assert_close(convert(from_image(x, "tokens"), "tokens", "tokens_cls"), t)


def test_out_of_tokens_cls_concatenates_class_token_onto_every_token():
    t = torch.randn(2, 1 + 9, 8)
    img = convert(t, "tokens_cls", "image")
    assert img.shape == (2, 16, 3, 3)
    assert channels_after("tokens_cls", "image", 8) == 16 and channels_after("tokens_cls", "tokens_cls", 8) == 8
    torch.testing.assert_close(img[:, :8].flatten(2).transpose(1, 2), t[:, 1:])
    torch.testing.assert_close(img[:, 8:, 2, 1], t[:, 0])
    assert convert(t, "tokens_cls", "bhwc").shape == (2, 3, 3, 16)


def test_non_grid_token_count_is_an_error_not_a_truncation():
    with pytest.raises(FormatError, match="square"):
        to_image(torch.randn(1, 10, 4), "tokens")
    with pytest.raises(FormatError, match="3x4"):
        to_image(torch.randn(1, 13, 4), "tokens", grid=(3, 4))
    with pytest.raises(FormatError, match="unknown tensor format"):
        convert(torch.randn(1, 4), "image", "nchw")
    assert set(FORMATS) == {"image", "bhwc", "tokens", "tokens_cls", "tokens+P"}
    for bad in ("tokens+1", "tokens+0", "tokens+x", "tokens_reg"):   # one prefix token is spelled tokens_cls
        with pytest.raises(FormatError, match="unknown tensor format"):
            prefix_tokens(bad)


def test_token_format_spells_the_prefix_count():
    assert [token_format(p) for p in (0, 1, 2, 5)] == ["tokens", "tokens_cls", "tokens+2", "tokens+5"]
    assert [prefix_tokens(token_format(p)) for p in (0, 1, 2, 5)] == [0, 1, 2, 5]
    assert [prefix_tokens(f) for f in ("image", "bhwc")] == [0, 0]
    assert all(is_token(token_format(p)) for p in (0, 1, 5)) and not is_token("bhwc")


def test_out_of_a_prefixed_sequence_keeps_the_class_token_and_drops_the_others():
    t = torch.randn(2, 5 + 9, 8)                     # class token, 4 registers, 3x3 grid
    img = convert(t, "tokens+5", "image")
    assert img.shape == (2, 16, 3, 3) and channels_after("tokens+5", "image", 8) == 16
    torch.testing.assert_close(img[:, :8].flatten(2).transpose(1, 2), t[:, 5:])
    torch.testing.assert_close(img[:, 8:, 1, 2], t[:, 0])
    torch.testing.assert_close(convert(t, "tokens+5", "tokens"), torch.cat(
        [t[:, 5:], t[:, :1].expand(-1, 9, -1)], dim=2))


def test_into_a_prefixed_sequence_fills_missing_prefix_tokens():
    x = torch.randn(2, 6, 3, 3)
    t = convert(x, "image", "tokens+2")              # no prefix at the source: every prefix token is the mean
    assert t.shape == (2, 11, 6)
    torch.testing.assert_close(t[:, 0], t[:, 2:].mean(dim=1))
    torch.testing.assert_close(t[:, 1], t[:, 0])
    cls = torch.randn(2, 1 + 9, 6)                   # ViT -> DeiT: the distillation token is the class token
    deit = convert(cls, "tokens_cls", "tokens+2")
    assert deit.shape == (2, 11, 6) and torch.equal(deit[:, :2], cls[:, [0, 0]])
    assert torch.equal(deit[:, 2:], cls[:, 1:])
    reg = torch.randn(2, 5 + 9, 6)                   # registers -> DeiT: class token kept, then the first register
    assert torch.equal(convert(reg, "tokens+5", "tokens+2"), torch.cat([reg[:, :2], reg[:, 5:]], dim=1))
    assert torch.equal(convert(reg, "tokens+5", "tokens_cls"), torch.cat([reg[:, :1], reg[:, 5:]], dim=1))
    assert channels_after("tokens+5", "tokens_cls", 6) == 6 and channels_after("tokens", "tokens+2", 6) == 6
    assert spatial_shape(reg, "tokens+5") == (6, 3, 3)
