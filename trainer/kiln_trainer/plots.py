"""Pictures of a run as PNG files: loss, accuracy and learning-rate curves over the epochs, and the
confusion matrix. Drawn with Pillow (torchvision already needs it), so the trainer image needs no plotting
library; plain axes, lines and labels, enough to see a run at a glance."""

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from kiln.api import constants
from kiln_trainer import evaluate

WIDTH, HEIGHT, MARGIN = 480, 320, 48
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
Series = tuple[str, Sequence[float]]


def line_chart(path: Path, title: str, xs: Sequence[int], series: Sequence[Series]) -> Path:
    """One chart: each series a polyline with a legend, the y range from the data."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    values = [v for _, ys in series for v in ys]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    left, top, right, bottom = MARGIN, MARGIN // 2 + 8, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 4), title, fill="black")
    draw.text((4, top), f"{high:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.3g}", fill="black")
    x_low, x_high = (xs[0], xs[-1]) if xs else (0, 1)
    draw.text((left, bottom + 6), f"epoch {x_low}", fill="black")
    draw.text((right - 60, bottom + 6), f"epoch {x_high}", fill="black")

    def point(x: int, y: float) -> tuple[float, float]:
        fx = (x - x_low) / (x_high - x_low) if x_high > x_low else 0.5
        return left + fx * (right - left), bottom - (y - low) / (high - low) * (bottom - top)

    for index, (name, ys) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [point(x, y) for x, y in zip(xs, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((right - 110, top + 6 + 14 * index), name, fill=colour)
    image.save(path, format="PNG")
    return path


def confusion_matrix(path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> Path:
    """Rows are true classes, columns predictions; darker cells hold more images (each row scaled to its
    own total, so rare classes show), counts written in the cells when they fit."""
    n = len(class_names)
    cell = max(8, min(48, 480 // max(n, 1)))
    side = MARGIN + cell * n
    image = Image.new("RGB", (side + 8, side + 8), "white")
    draw = ImageDraw.Draw(image)
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (MARGIN + j * cell, MARGIN + i * cell, MARGIN + (j + 1) * cell, MARGIN + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            if cell >= 24:
                draw.text((box[0] + 3, box[1] + 3), str(count), fill="black" if shade > 128 else "white")
        if cell >= 16:
            draw.text((2, MARGIN + i * cell + 3), class_names[i][:6], fill="black")
    draw.text((MARGIN, 4), "confusion matrix (rows: true, columns: predicted)", fill="black")
    image.save(path, format="PNG")
    return path


def write_plots(
    output_dir: Path,
    history: Sequence[evaluate.EpochRecord],
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
) -> list[Path]:
    """loss.png, accuracy.png, learning-rate.png and confusion-matrix.png under ``output_dir/plots``."""
    folder = output_dir / constants.PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [h.epoch for h in history]
    rates = [h.learning_rate for h in history if h.learning_rate is not None]
    return [
        line_chart(
            folder / "loss.png",
            "loss",
            epochs,
            [("train", [h.train_loss for h in history]), ("validation", [h.val_loss for h in history])],
        ),
        line_chart(
            folder / "accuracy.png",
            "accuracy",
            epochs,
            [("train", [h.train_accuracy for h in history]), ("validation", [h.val_accuracy for h in history])],
        ),
        line_chart(
            folder / "learning-rate.png",
            "learning rate",
            epochs[: len(rates)],
            [("learning rate", rates)],
        ),
        confusion_matrix(folder / "confusion-matrix.png", matrix, class_names),
    ]
