"""densecap_core.render: boxes and captions drawn into a copy of an image."""

from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from densecap_core import render
from densecap_core.render import PALETTE, colour_for, draw_regions, text_colour_on
from densecap_core.schema import Region

GREY = (128, 128, 128)


def _canvas(size=(200, 150), colour=GREY) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_input_is_not_mutated_and_a_new_image_is_returned():
    image = _canvas()
    before = image.copy()
    out = draw_regions(image, [Region((10, 20, 50, 40), "a box", 1.0)])
    assert out is not image
    assert ImageChops.difference(image, before).getbbox() is None
    assert ImageChops.difference(out, before).getbbox() is not None


def test_box_edges_are_drawn_in_the_box_colours_and_the_inside_is_untouched():
    image = _canvas()
    regions = [Region((10, 20, 50, 40), "", 2.0), Region((100, 60, 60, 50), "", 1.0)]
    out = draw_regions(image, regions, box_width=3)
    first, second = PALETTE[0], PALETTE[1]
    # Box [10, 20, 50, 40] covers pixels 10..59 x 20..59; a 3 px outline lies on its inner edge.
    for x, y in [(10, 20), (59, 59), (12, 40), (57, 30), (30, 22), (30, 57)]:
        assert out.getpixel((x, y)) == first, (x, y)
    for x, y in [(100, 60), (159, 109), (130, 60), (100, 80)]:
        assert out.getpixel((x, y)) == second, (x, y)
    for x, y in [(13, 40), (35, 40), (9, 20), (60, 20), (130, 85)]:
        assert out.getpixel((x, y)) == GREY, (x, y)


def test_boxes_outside_the_image_are_clipped_or_skipped():
    image = _canvas((100, 80))
    regions = [
        Region((-30, -30, 60, 60), "", 4.0),      # overlaps the top-left corner
        Region((80, 70, 100, 100), "", 3.0),      # runs off the bottom-right
        Region((500, 500, 20, 20), "", 2.0),      # entirely outside
        Region((10, 10, 0, 30), "", 1.0),         # no area
        Region((float("nan"), 0, 10, 10), "", 0.5),
        Region((0, 0, float("inf"), 10), "", 0.4),
    ]
    out = draw_regions(image, regions, box_width=2)
    assert out.size == (100, 80)
    assert out.getpixel((0, 10)) == colour_for(0)   # clipped box drawn along the image border
    assert out.getpixel((29, 10)) == colour_for(0)  # its right edge (x + w = 30)
    assert out.getpixel((99, 79)) == colour_for(1)
    assert out.getpixel((80, 75)) == colour_for(1)
    assert out.getpixel((10, 20)) == GREY           # the zero-width box left nothing
    assert out.getpixel((50, 50)) == GREY


def test_num_to_draw_limits_and_colours_follow_rank():
    image = _canvas((300, 60))
    regions = [Region((20 * i + 2, 5, 15, 50), "", 10 - i) for i in range(14)]
    out = draw_regions(image, regions, num_to_draw=3, box_width=1)
    for rank in range(3):
        assert out.getpixel((20 * rank + 2, 30)) == colour_for(rank)
    assert out.getpixel((20 * 3 + 2, 30)) == GREY
    assert draw_regions(image, regions, num_to_draw=0).tobytes() == image.tobytes()
    assert colour_for(len(PALETTE)) == PALETTE[0]  # the palette wraps around


def test_caption_strip_is_filled_with_the_box_colour_and_holds_contrasting_text():
    image = _canvas((300, 200), (255, 255, 255))
    region = Region((40, 100, 120, 60), "a caption", 1.0)
    boxes_only = draw_regions(image, [region], captions=False)
    with_text = draw_regions(image, [region], text_size=2)
    diff = ImageChops.difference(boxes_only, with_text).getbbox()
    assert diff is not None
    left, top, right, bottom = diff
    assert bottom <= 100 + 2, "the strip sits above the box when there is room"
    assert left >= 40 and bottom - top >= 12, "about 16 px text at text_size 2"
    strip = with_text.crop(diff)
    colours = {c for _, c in strip.getcolors(maxcolors=100_000)}
    assert colour_for(0) in colours and (255, 255, 255) in colours  # red strip, white text on it
    bigger = ImageChops.difference(boxes_only, draw_regions(image, [region], text_size=4)).getbbox()
    assert bigger[3] - bigger[1] > bottom - top


def test_caption_stays_inside_the_image():
    image = _canvas((160, 120))
    long_text = "a very long caption that cannot possibly fit across this small image at all"
    regions = [Region((150, 0, 10, 10), long_text, 1.0)]  # top-right corner: no room above or to the right
    out = draw_regions(image, regions, text_size=2)
    left, top, right, bottom = ImageChops.difference(out, image).getbbox()
    # Shifted left and cut to fit the width; without room above, it starts at the top edge of the image.
    assert left < 20 and right == 160 and top == 0 and bottom < 30
    assert out.getpixel((left + 1, 1)) == colour_for(0)


def test_non_rgb_input_gives_rgb_output_and_is_kept():
    image = Image.new("L", (50, 50), 30)
    out = draw_regions(image, [Region((5, 5, 20, 20), "x", 1.0)])
    assert out.mode == "RGB" and image.mode == "L"


@pytest.mark.parametrize("background, expected", [((0, 0, 0), (255, 255, 255)), ((255, 238, 51), (0, 0, 0)),
                                                  ((173, 35, 25), (255, 255, 255)), ((233, 222, 187), (0, 0, 0))])
def test_text_colour_contrasts(background, expected):
    assert text_colour_on(background) == expected


def test_font_falls_back_to_pillows_default(monkeypatch):
    render.load_font.cache_clear()
    monkeypatch.setattr(render, "_FONT_CANDIDATES", ("/nonexistent/NoSuchFont.ttf",))
    try:
        font = render.load_font(20)
        out = draw_regions(_canvas(), [Region((10, 40, 50, 40), "fallback font", 1.0)])
        assert out.getpixel((10, 40)) == colour_for(0)
        assert getattr(font, "size", 20) == 20
    finally:
        render.load_font.cache_clear()
