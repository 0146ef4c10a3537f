"""Pillow drawing: the offline sample inputs and the visibly emulated inpainting output."""

from __future__ import annotations

import colorsys
from io import BytesIO

from PIL import Image, ImageDraw, ImageFont, ImageOps

SAMPLE_SIZE_PX = 512
MAX_SIDE_PX = 1024
BANNER_TEXT = "EMULATED - not a model output"
TARGET_SIZES_PX: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SAMPLE_MASK_BOX = (176, 230, 336, 430)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample_image() -> bytes:
    """Draw a 512x512 landscape (sky, sun, hills, a house) as PNG bytes."""
    size = SAMPLE_SIZE_PX
    horizon = 320
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(horizon):
        shade = y / horizon
        draw.line(
            [(0, y), (size, y)],
            fill=(int(40 + 120 * shade), int(90 + 120 * shade), int(200 + 50 * shade)),
        )
    draw.ellipse((350, 60, 450, 160), fill=(255, 214, 60))
    draw.rectangle((0, horizon, size, size), fill=(70, 150, 60))
    draw.ellipse((-120, 260, 260, 420), fill=(90, 170, 70))
    draw.ellipse((240, 280, 640, 440), fill=(60, 135, 55))
    draw.rectangle((196, 290, 316, 400), fill=(200, 60, 50))
    draw.polygon([(186, 292), (256, 236), (326, 292)], fill=(110, 60, 40))
    draw.rectangle((240, 340, 272, 400), fill=(80, 50, 30))
    draw.rectangle((208, 308, 232, 330), fill=(230, 230, 250))
    draw.rectangle((280, 308, 304, 330), fill=(230, 230, 250))
    return _png_bytes(image)


def make_sample_mask() -> bytes:
    """Draw the matching mask: white (repaint) over the house, black (keep) elsewhere."""
    mask = Image.new("L", (SAMPLE_SIZE_PX, SAMPLE_SIZE_PX), 0)
    ImageDraw.Draw(mask).rectangle(SAMPLE_MASK_BOX, fill=255)
    return _png_bytes(mask)


def target_size(source_size: tuple[int, int], image_size: str) -> tuple[int, int]:
    """Return the output size for `image_size`; `auto` keeps the input size, capped."""
    if image_size in TARGET_SIZES_PX:
        return TARGET_SIZES_PX[image_size]
    width, height = source_size
    scale = min(1.0, MAX_SIDE_PX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _tint_for_seed(seed: int) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb((seed * 0.137 + 0.83) % 1.0, 0.9, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def _draw_banner(image: Image.Image) -> Image.Image:
    width, height = image.size
    banner_height = max(18, height // 12)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, height - banner_height, width, height), fill=(0, 0, 0, 190))
    font_size = max(8, int(banner_height * 0.6))
    font = ImageFont.load_default(size=font_size)
    while font_size > 8 and draw.textlength(BANNER_TEXT, font=font) > width - 12:
        font_size -= 1
        font = ImageFont.load_default(size=font_size)
    draw.text(
        (width / 2, height - banner_height / 2),
        BANNER_TEXT,
        fill=(255, 255, 255, 255),
        font=font,
        anchor="mm",
    )
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def render_emulated_output(
    image_bytes: bytes,
    mask_bytes: bytes,
    *,
    image_size: str,
    output_format: str,
    seed: int,
) -> bytes:
    """Tint and invert the masked region of the input, stamp the banner, encode."""
    with Image.open(BytesIO(image_bytes)) as opened:
        source = ImageOps.exif_transpose(opened).convert("RGB")
    with Image.open(BytesIO(mask_bytes)) as opened:
        mask = opened.convert("L")
    if mask.size != source.size:
        mask = mask.resize(source.size)
    size = target_size(source.size, image_size)
    if size != source.size:
        source = ImageOps.fit(source, size)
        mask = ImageOps.fit(mask, size)
    tint = Image.new("RGB", size, _tint_for_seed(seed))
    repainted = Image.blend(ImageOps.invert(source), tint, 0.45)
    output = _draw_banner(Image.composite(repainted, source, mask))
    buffer = BytesIO()
    save_options = {} if output_format == "png" else {"quality": 90}
    output.save(buffer, format=PILLOW_FORMATS[output_format], **save_options)
    return buffer.getvalue()
