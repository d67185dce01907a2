import pytest
import torch

from stitching.models.formats import FORMATS, FormatError, channels_after, convert, from_image, to_image


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
    assert set(FORMATS) == {"image", "bhwc", "tokens", "tokens_cls"}
