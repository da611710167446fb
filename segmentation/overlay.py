"""Pictures a person looks at: an image blended with its predicted class colours, with a legend."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segmentation.voc import IGNORE_LABEL, PALETTE

LEGEND_WIDTH = 150
LEGEND_ROW = 18


def overlay_image(image_rgb: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.55) -> Image.Image:
    """The HxWx3 RGB image with every non-background pixel blended with its class colour (background and
    255 left as they are), and a legend panel on the right listing the classes present with their colours."""
    if image_rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {image_rgb.shape[:2]} and labels {labels.shape} differ in size")
    colours = PALETTE[labels].astype(np.float32)
    blend = (labels != 0) & (labels != IGNORE_LABEL)
    mixed = np.where(blend[..., None], (1 - alpha) * image_rgb.astype(np.float32) + alpha * colours, image_rgb)
    picture = Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(labels) if c != IGNORE_LABEL]
    height, width = labels.shape
    canvas = Image.new("RGB", (width + LEGEND_WIDTH, max(height, LEGEND_ROW * len(present) + 8)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, cls in enumerate(present):
        top = 4 + row * LEGEND_ROW
        draw.rectangle([width + 6, top, width + 20, top + 12], fill=tuple(int(v) for v in PALETTE[cls]), outline=(0, 0, 0))
        name = names[cls] if cls < len(names) else f"class_{cls}"
        draw.text((width + 26, top), name, fill=(0, 0, 0), font=font)
    return canvas
